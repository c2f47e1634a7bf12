"""experiments/linear_probe.py: the --smoke run end to end, feature caching, the probe learning a trivially
separable set, the MAE probe pieces, ImageFolder input, any registered pixel encoder, and the encoder zoo."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

pytest.importorskip("sklearn", reason="the experiments extra (scikit-learn) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives at the repository root

from harmon import ENCODERS  # noqa: E402
from experiments import linear_probe  # noqa: E402
from experiments.common import (  # noqa: E402
    LinearProbe,
    bundled_dataset,
    load_encoder,
    load_probe,
    read_csv,
    topk_accuracy,
    train_linear_probe,
    warmup_cosine,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_results(csv_path: Path) -> list[dict[str, str]]:
    rows = read_csv(csv_path)
    assert rows, f"{csv_path} has no rows"
    assert list(rows[0]) == linear_probe.COLUMNS
    for row in rows:
        assert 0.0 <= float(row["top1"]) <= 1.0
        assert 0.0 <= float(row["top5"]) <= 1.0
        assert float(row["top1"]) <= float(row["top5"]) + 1e-9
    return rows


def test_smoke_end_to_end_and_feature_cache(tmp_path):
    out = linear_probe.main(["--smoke", "--output-dir", str(tmp_path), "--no-progress"])
    rows = _check_results(out["results_csv"])
    assert len(rows) == 1 and rows[0]["encoder"] == "mar-tiny" and rows[0]["dataset"] == "digits"
    assert int(rows[0]["feature_dim"]) == 64 and int(rows[0]["num_classes"]) == 10
    assert not out["features_cached"] and out["cache"].is_file()
    table = out["results_md"].read_text()
    assert "| encoder |" in table and "mar-tiny" in table
    probe, record = load_probe(rows[0]["probe_path"])
    assert isinstance(probe, LinearProbe) and record["classes"] == [str(d) for d in range(10)]

    # several heads (base LR x epochs) from the one cached pass of the encoder
    again = linear_probe.main(["--smoke", "--output-dir", str(tmp_path), "--no-progress", "--base-lr", "0.1", "1.0",
                               "--epochs", "2", "4"])
    assert again["features_cached"] and again["cache"] == out["cache"]
    assert len(again["rows"]) == 4
    assert {(r["base_lr"], r["epochs"]) for r in again["rows"]} == {(0.1, 2), (0.1, 4), (1.0, 2), (1.0, 4)}
    for row in again["rows"]:
        assert math.isclose(row["lr"], row["base_lr"] * row["batch_size"] / 256)


def test_probe_learns_a_trivially_separable_generated_set(tmp_path):
    """The class is the quadrant that holds a bright square: a random-init MAR's pooled features separate it."""
    out = linear_probe.main(["--smoke", "--dataset", "quadrants", "--limit", "320", "--output-dir", str(tmp_path),
                             "--no-progress", "--no-cache", "--no-save-probes"])
    (row,) = out["rows"]
    chance = 1 / 4
    assert row["num_classes"] == 4
    assert row["top1"] >= chance + 0.3, f"probe top-1 {row['top1']:.3f} is not clearly above chance {chance}"
    assert row["train_top1"] >= chance + 0.3


def test_train_linear_probe_sgd_and_lars_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 32, generator=generator) * 4
    labels = torch.arange(600) % 6
    features = centers[labels] + torch.randn(600, 32, generator=generator)
    for optimizer, base_lr in (("sgd", 0.5), ("lars", 20.0)):
        result = train_linear_probe(features[:450], labels[:450], features[450:], labels[450:], num_classes=6,
                                    epochs=15, base_lr=base_lr, batch_size=64, optimizer=optimizer,
                                    warmup_epochs=2)
        assert result.top1 > 0.95, (optimizer, result.top1)
        assert result.top5 == 1.0 and math.isclose(result.lr, base_lr * 64 / 256)
    # the probe is MAE's: a parameter-free BatchNorm then a linear layer
    assert not any(p.requires_grad for p in result.probe.norm.parameters())
    assert result.probe.norm.affine is False


def test_schedule_and_topk():
    values = [warmup_cosine(step, 100, 10) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([1, 2]), ks=(1, 2, 5))
    assert acc == {1: 0.5, 2: 0.5, 5: 1.0}


def test_image_folder_input(tmp_path):
    from PIL import Image

    train, val = bundled_dataset("quadrants", seed=0, limit=48)
    for split, name in ((train, "train"), (val, "val")):
        for i, (image, label) in enumerate(split.dataset):
            folder = tmp_path / name / split.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    out = linear_probe.main(["--smoke", "--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
                             "--output-dir", str(tmp_path / "out"), "--no-progress"])
    rows = _check_results(out["results_csv"])
    assert rows[0]["dataset"] == "train+val" and int(rows[0]["n_train"]) == 36 and int(rows[0]["n_val"]) == 12


class _PatchEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 24
    patch: int = 8
    image_size: int = 32


class _PatchEncoder(nn.Module):
    """A minimal pixel VisualEncoder (patchify + position embedding + MLP), as a third-party encoder would be."""

    config_class = _PatchEncoderConfig

    def __init__(self, config: _PatchEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        grid = (config.image_size // config.patch) ** 2
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch, config.patch)
        self.pos = nn.Parameter(torch.randn(1, grid, config.hidden_size))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(pixels).flatten(2).transpose(1, 2) + self.pos)


def test_any_registered_pixel_encoder(tmp_path):
    ENCODERS.add("test-patch-encoder", _PatchEncoder)
    try:
        features = load_encoder("test-patch-encoder")
        assert features.image_size == 32 and features.buffer_size == 0 and features.hidden_size == 24
        out = linear_probe.main(["--smoke", "--encoder", "test-patch-encoder", "--dataset", "quadrants",
                                 "--output-dir", str(tmp_path), "--no-progress"])
        rows = _check_results(out["results_csv"])
        assert rows[0]["encoder"] == "test-patch-encoder" and int(rows[0]["feature_dim"]) == 24
    finally:
        ENCODERS.unregister("test-patch-encoder")


# The encoder zoo (issue 4), each shrunk by config overrides so that the whole --smoke run takes seconds; an encoder
# that is not registered is skipped, saying so.
ZOO = {
    "siglip-tiny": {},
    "siglip-base-patch16-256": {"num_hidden_layers": 1, "image_size": 64},
    "vqgan-f16": {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "image_size": 32, "z_channels": 8,
                  "embed_dim": 8, "n_embed": 64},
    "vae-kl16": {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "image_size": 32},
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_encoder_zoo_smoke(name, tmp_path):
    if name not in ENCODERS:
        pytest.skip(f"{name!r} is not registered (issue 4); registered: {ENCODERS.list()}")
    features = load_encoder(name, overrides=ZOO[name])
    with torch.no_grad():
        tokens = features(torch.rand(2, 3, features.image_size, features.image_size) * 2 - 1)
    assert tokens.shape[0] == 2 and tokens.shape[2] == features.hidden_size
    assert features.pool(tokens).shape == (2, features.hidden_size) and features.buffer_size == 0
    out = linear_probe.main(["--smoke", "--encoder", name, "--encoder-config", json.dumps(ZOO[name]), "--dataset",
                             "quadrants", "--limit", "80", "--output-dir", str(tmp_path), "--no-progress"])
    rows = _check_results(out["results_csv"])
    assert rows[0]["encoder"] == name and int(rows[0]["feature_dim"]) == features.hidden_size


def test_mar_from_the_registry_over_a_vae_folder(tmp_path):
    """A MAR token encoder built from the registry reads the tokens of a KL VAE given by --vae (a diffusers folder);
    its features keep the buffer slots first and the probe pools the image tokens only."""
    from harmon.encoders.vae import KLAutoencoderConfig, build_kl_autoencoder

    build_kl_autoencoder(KLAutoencoderConfig(ch=32)).save_pretrained(tmp_path / "vae")
    features = load_encoder("mar-tiny", vae=str(tmp_path / "vae"), overrides={"depth": 1})
    assert features.image_size == 64 and features.buffer_size == 8
    with torch.no_grad():
        tokens = features(torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, 8 + 16, 64) and features.last_grid == (4, 4)
    torch.testing.assert_close(features.pool(tokens), tokens[:, 8:].mean(dim=1))
    out = linear_probe.main(["--encoder", "mar-tiny", "--encoder-config", '{"depth": 1}', "--vae",
                             str(tmp_path / "vae"), "--dataset", "quadrants", "--limit", "80", "--epochs", "3",
                             "--optimizer", "sgd", "--probe-batch-size", "32", "--output-dir", str(tmp_path / "out"),
                             "--no-progress", "--threads", "1"])
    _check_results(out["results_csv"])


def test_decoupled_harmon_folder(tmp_path):
    """A Harmon pipeline folder with a decoupled SigLIP understanding encoder: --encoder names the encoder it
    understands with; --harmon-encoder generation reaches its MAR; a mismatched name fails clearly."""
    from harmon import HarmonPipeline
    from harmon.testing import tiny_model, tiny_tokenizer

    if "siglip-tiny" not in ENCODERS:
        pytest.skip("siglip-tiny is not registered (issue 4)")
    HarmonPipeline.from_model(tiny_model(understanding_encoder="siglip-tiny"), tiny_tokenizer()).save_pretrained(
        tmp_path / "pipe")
    siglip = load_encoder("siglip-tiny", str(tmp_path / "pipe"))
    assert siglip.info["harmon_encoder"] == "understanding" and siglip.hidden_size == 32
    mar = load_encoder("mar-tiny", str(tmp_path / "pipe"), harmon_role="generation")
    assert mar.buffer_size == 8 and mar.hidden_size == 64
    with pytest.raises(SystemExit, match="SiglipEncoder"):
        load_encoder("mar-tiny", str(tmp_path / "pipe"))

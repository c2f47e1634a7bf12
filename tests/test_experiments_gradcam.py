"""experiments/gradcam.py: the --smoke run end to end (probe and word targets), every registered encoder of the zoo,
a saved Harmon pipeline (with a probe from experiments.linear_probe), and the token-grid reshape transform."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_grad_cam", reason="the experiments extra (grad-cam) is not installed")
pytest.importorskip("sklearn", reason="the experiments extra (scikit-learn) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives at the repository root

from PIL import Image  # noqa: E402

from harmon import ENCODERS  # noqa: E402
from experiments import gradcam, linear_probe  # noqa: E402
from experiments.common import TokenFeatures  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_outputs(out: dict, num_columns: int) -> None:
    cell, rows = out["cell_size"], out["num_images"]
    with Image.open(out["grid"]) as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        assert grid.size == (cell * (1 + num_columns), gradcam.HEADER + cell * rows)
    assert len(out["pngs"]) == num_columns
    for path in out["pngs"].values():
        with Image.open(path) as image:
            image.load()
            assert image.size == (2 * cell, gradcam.HEADER + cell * rows)
    for column in out["columns"]:
        cams = column.cams
        assert cams.shape[0] == rows and np.isfinite(cams).all()
        assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
        # grad-cam scales each map to [0, 1]; a map can be all zero after its ReLU (random models), not all of them
        assert cams.max() > 0.5, f"{column.name}: every map is zero"


def test_smoke_probe_and_word_targets(tmp_path):
    out = gradcam.main(["--smoke", "--output-dir", str(tmp_path)])
    assert [c.name for c in out["columns"]] == ["mar-tiny probe", "mar-tiny '3'"]
    assert out["num_images"] == 4 and out["cell_size"] == 64
    _check_outputs(out, 2)
    record = json.loads((tmp_path / "gradcam.json").read_text())
    assert record["columns"][1]["target"].startswith("log p('3'")
    assert set(np.load(tmp_path / "cams.npz").files) == {"mar-tiny-probe", "mar-tiny-3"}


ZOO = {
    "vae-kl16": {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "image_size": 32},
    "vqgan-f16": {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "image_size": 32, "z_channels": 8,
                  "embed_dim": 8, "n_embed": 64},
    "siglip-base-patch16-256": {"num_hidden_layers": 1, "image_size": 64},
}


def test_every_registered_zoo_encoder(tmp_path):
    names = [name for name in ZOO if name in ENCODERS]
    if not names:
        pytest.skip(f"none of {sorted(ZOO)} is registered (issue 4)")
    configs = [json.dumps(ZOO[name]) for name in names]
    out = gradcam.main(["--smoke", "--target", "probe", "--encoder", *names, "mar-tiny", "--encoder-config", *configs,
                        "{}", "--num-images", "2", "--limit", "120", "--output-dir", str(tmp_path)])
    assert [c.encoder for c in out["columns"]] == [*names, "mar-tiny"]
    _check_outputs(out, len(names) + 1)


def test_saved_pipeline_with_a_trained_probe_and_image_files(tmp_path):
    from harmon import HarmonPipeline
    from harmon.testing import tiny_model, tiny_tokenizer

    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(tmp_path / "pipe")
    probe_run = linear_probe.main(["--smoke", "--encoder", "mar-tiny", "--weights", str(tmp_path / "pipe"),
                                   "--dataset", "quadrants", "--limit", "80", "--output-dir",
                                   str(tmp_path / "probe"), "--no-progress"])
    probe_path = probe_run["rows"][0]["probe_path"]
    files = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (20, 160, 40)]):
        image = np.zeros((40, 56, 3), np.uint8)
        image[5 + 5 * i: 20 + 5 * i, 10:30] = color
        files.append(tmp_path / f"image{i}.png")
        Image.fromarray(image).save(files[-1])
    out = gradcam.main(["--encoder", "mar-tiny", "--weights", str(tmp_path / "pipe"), "--probe", probe_path,
                        "--target", "probe", "word", "--word", "red", "--question", "What color?", "--images",
                        *map(str, files), "--image-size", "64", "--cell-size", "48", "--threads", "1",
                        "--output-dir", str(tmp_path / "cam")])
    assert out["num_images"] == 3
    _check_outputs(out, 2)


def test_decoupled_pipeline_word_target_hooks_the_understanding_encoder(tmp_path):
    from harmon import HarmonPipeline
    from harmon.testing import tiny_model, tiny_tokenizer

    if "siglip-tiny" not in ENCODERS:
        pytest.skip("siglip-tiny is not registered (issue 4)")
    model = tiny_model(understanding_encoder="siglip-tiny")
    HarmonPipeline.from_model(model, tiny_tokenizer()).save_pretrained(tmp_path / "pipe")
    out = gradcam.main(["--encoder", "siglip-tiny", "--weights", str(tmp_path / "pipe"), "--target", "word",
                        "--word", "7", "--dataset", "digits", "--num-images", "2", "--cell-size", "32",
                        "--threads", "1", "--output-dir", str(tmp_path / "cam")])
    _check_outputs(out, 1)
    # the tap that routed the pixel encoder's output is gone again
    assert "encode" not in vars(model.understanding_encoder)


def test_reshape_drops_the_buffer_and_restores_the_grid():
    buffer, m, n, dim = 3, 2, 4, 5
    grid = torch.arange(m * n * dim, dtype=torch.float32).reshape(1, m * n, dim)
    tokens = torch.cat([torch.full((1, buffer, dim), -1.0), grid], dim=1)
    restored = gradcam.grid_reshape(buffer, (16, 32))(tokens)
    assert restored.shape == (1, dim, m, n)
    assert torch.equal(restored[0, :, 1, 2], grid[0, 1 * n + 2])

    features = TokenFeatures(lambda x: tokens.expand(len(x), -1, -1), torch.nn.Linear(1, 1), hidden_size=dim,
                             buffer_size=buffer, image_size=32)
    out = features(torch.zeros(2, 3, 16, 32))
    assert features.last_grid == (m, n)
    assert torch.equal(features.reshape_transform(out), restored.expand(2, -1, -1, -1))
    assert torch.equal(features.pool(out), grid.mean(dim=1).expand(2, -1))

"""experiments/toy_reproduction.py --smoke end to end: every artefact, with sane values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_grad_cam", reason="the experiments extra (grad-cam) is not installed")
pytest.importorskip("sklearn", reason="the experiments extra (scikit-learn) is not installed")
pytest.importorskip("matplotlib", reason="the experiments extra (matplotlib) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives at the repository root

from PIL import Image  # noqa: E402

from experiments import toy_reproduction  # noqa: E402
from experiments.common import read_csv  # noqa: E402
from experiments.gradcam import HEADER  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_reproduction_smoke(tmp_path):
    out = toy_reproduction.main(["--smoke", "--output-dir", str(tmp_path), "--no-progress"])
    encoders = list(toy_reproduction.ENCODER_ORDER)

    runs = read_csv(tmp_path / "runs.csv")
    assert list(runs[0]) == ["seed", "encoder", "feature_dim", "top1", "top5", "train_top1"]
    assert sorted((int(r["seed"]), r["encoder"]) for r in runs) == sorted((s, e) for s in (0, 1) for e in encoders)
    for row in runs:
        assert 0.0 <= float(row["top1"]) <= float(row["top5"]) <= 1.0

    summary = read_csv(tmp_path / "summary.csv")
    assert list(summary[0]) == ["encoder", "feature_dim", "seeds", "top1_mean", "top1_std", "top5_mean", "top5_std",
                                "features"]
    assert [r["encoder"] for r in summary] == encoders
    for row in summary:
        assert int(row["seeds"]) == 2
        assert 0.0 <= float(row["top1_mean"]) <= 1.0 and float(row["top1_std"]) >= 0.0

    training = read_csv(tmp_path / "training.csv")
    assert [int(r["seed"]) for r in training] == [0, 1]
    assert all(0 < int(r["vq_codes_used_val"]) <= int(r["codebook_size"]) for r in training)

    text = (tmp_path / "summary.md").read_text()
    assert "±" in text and "| encoder |" in text and "Ranking by top-1" in text

    with Image.open(tmp_path / "gradcam.png") as grid:  # 4 digits x (image + 4 encoders), 64-px cells
        assert grid.size == (64 * 5, HEADER + 64 * 4)
    with Image.open(tmp_path / "probe_accuracy.png") as plot:
        assert plot.size == (600, 320)
    assert (tmp_path / "config.json").is_file() and out["seconds"] > 0


def test_toy_studies_runs_every_variant_and_resumes(tmp_path, monkeypatch):
    """experiments/toy_studies.py on a few steps: every variant trains from one prepared VAE, is scored, probed and
    tabulated; a second call finds the results and trains nothing."""
    import json

    from experiments import toy_studies

    monkeypatch.setattr(toy_studies, "PROBE_TRAIN", 40)
    monkeypatch.setattr(toy_studies, "PROBE_TEST", 20)
    argv = ["--out", str(tmp_path), "--seeds", "0", "--steps", "3", "--prompts", "2", "--canvases", "2",
            "--mar-steps", "2", "--num-images", "40", "--vae-from", "harmon-toy"]
    assert toy_studies.main(argv) == 0
    import torch
    from diffusers import AutoencoderKL

    from harmon import HarmonModel
    from harmon.toy import pretrained_folder

    shipped = AutoencoderKL.from_pretrained(str(pretrained_folder("harmon-toy") / "vae")).state_dict()
    used = HarmonModel.from_pretrained(tmp_path / "unified-seed0" / "init").vae.state_dict()
    assert all(torch.equal(v.float(), used[k]) for k, v in shipped.items())  # --vae-from: the shipped VAE, not trained
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(toy_studies.VARIANTS)
    for row in rows:
        for key in ("geneval/overall", "understanding/overall", "probe/generation_encoder", "probe/understanding_path"):
            assert 0.0 <= row[key] <= 1.0, (row["variant"], key, row[key])
    decoupled = json.loads((tmp_path / "decoupled-seed0" / "init" / "harmon_config.json").read_text())
    assert decoupled["understanding_encoder"]["name"] == "mar"
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} (n=1)" in table for name in toy_studies.VARIANTS)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(toy_studies, "run_variant", no_training)
    assert toy_studies.main(argv) == 0


def test_toy_encoders_trains_every_encoder_and_quantizes_for_vq(tmp_path, monkeypatch):
    """experiments/toy_encoders.py on a few steps: the three understanding encoders train from one prepared VAE, are
    scored and tabulated; the vq variant's encoder returns codebook vectors only, the vae variant the tokens."""
    import json

    import torch

    from experiments import toy_encoders, toy_studies
    from harmon.pipelines import HarmonPipeline

    monkeypatch.setattr(toy_studies, "PROBE_TRAIN", 40)
    monkeypatch.setattr(toy_studies, "PROBE_TEST", 20)
    argv = ["--out", str(tmp_path), "--seeds", "0", "--steps", "3", "--canvases", "2", "--codebook", "8",
            "--num-images", "40", "--vae-steps", "2"]
    assert toy_encoders.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(toy_encoders.VARIANTS)
    for row in rows:
        for key in ("understanding/overall", "understanding/digit", "probe/understanding_path"):
            assert 0.0 <= row[key] <= 1.0, (row["variant"], key, row[key])
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} (n=1)" in table for name in toy_encoders.VARIANTS)

    tokens = torch.randn(2, 8, 8, 16)
    for variant, quantized in (("vae", False), ("vq", True)):
        pipe = HarmonPipeline.from_pretrained(tmp_path / f"{variant}-seed0" / "train" / "export")
        encoder = pipe.harmon.understanding_encoder
        features = encoder.encode(tokens)
        assert features.shape == (2, 64, 16)
        if quantized:  # every feature is one of the 8 codes, and the codes were fitted (not the zero init)
            codes = encoder.codebook
            assert codes.shape == (8, 16) and codes.abs().sum() > 0
            assert bool((features.reshape(-1, 1, 16) == codes[None]).all(-1).any(-1).all())
        else:
            assert torch.equal(features, tokens.reshape(2, 64, 16))
    assert json.loads((tmp_path / "mar-seed0" / "init" / "harmon_config.json").read_text())[
        "understanding_encoder"] is None

    shared = tmp_path / "shared"  # --one-vae: the first seed's data and VAE serve every seed
    assert toy_encoders.main(["--out", str(shared), "--seeds", "0", "1", "--variants", "vae", "--one-vae",
                              *argv[4:]]) == 0
    assert sorted(p.name for p in shared.glob("prepared-seed*")) == ["prepared-seed0"]
    assert [r["seed"] for r in json.loads((shared / "results.json").read_text())["rows"]] == [0, 1]


def test_toy_samplers_rows_follow_the_chain_and_the_mar_steps_asked_for():
    from experiments.toy_samplers import sampler_rows

    names = [name for name, _ in sampler_rows(1000)]
    assert names == ["exact, 64 MAR steps, 1000 head steps", "fast, 64 MAR steps, 500 head steps",
                     "fast, 64 MAR steps, 250 head steps", "fast, 64 MAR steps, 50 head steps",
                     "fast, 64 MAR steps, 25 head steps", "exact, 32 MAR steps, 1000 head steps",
                     "exact, 16 MAR steps, 1000 head steps"]
    assert [name for name, _ in sampler_rows(100)][1:3] == ["fast, 64 MAR steps, 50 head steps",
                                                             "fast, 64 MAR steps, 25 head steps"]
    rows = sampler_rows(1000, (8, 1), fast=False)
    assert rows == [("exact, 64 MAR steps, 1000 head steps", {"num_inference_steps": 64, "sampler": "exact"}),
                    ("exact, 8 MAR steps, 1000 head steps", {"num_inference_steps": 8, "sampler": "exact"}),
                    ("exact, 1 MAR steps, 1000 head steps", {"num_inference_steps": 1, "sampler": "exact"})]
    message = r"--mar-steps: each must be in \[1, 64\) \(the baseline has 64\), got \[0, 64\]"
    with pytest.raises(ValueError, match=message):
        sampler_rows(1000, (0, 64, 8))

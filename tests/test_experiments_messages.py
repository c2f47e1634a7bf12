"""What the experiments say and record: Grad-CAM ``--smoke`` reports what it wrote; the linear probe's results
name the Harmon folder's own encoder, not the ``--encoder`` flag's."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import gradcam, linear_probe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gradcam_smoke_prints_what_it_did_and_wrote(tmp_path, capsys):
    out = gradcam.main(["--smoke", "--target", "probe", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"Grad-CAM++ of {out['num_images']} images, 1 column(s)" in printed
    assert "random weights" in printed
    for path in (*out["pngs"].values(), out["grid"], tmp_path / "cams.npz", tmp_path / "gradcam.json"):
        assert str(path) in printed and Path(path).is_file()


def test_linear_probe_results_name_the_folders_encoder(tmp_path, capsys):
    folder = tmp_path / "pipe"
    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(str(folder))
    out = linear_probe.main(["--smoke", "--encoder", "mar-h", "--weights", str(folder), "--output-dir",
                             str(tmp_path / "probe"), "--no-progress", "--limit", "80"])
    assert [row["encoder"] for row in out["rows"]] == ["mar-tiny"]
    with open(out["results_csv"]) as handle:
        assert [row["encoder"] for row in csv.DictReader(handle)] == ["mar-tiny"]
    assert "mar-h" not in Path(out["run_csv"]).name
    assert "holds a mar-tiny encoder" in capsys.readouterr().err

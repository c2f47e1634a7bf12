"""The CLI's errors name its flags (``--steps``), not the Python arguments behind them; ``--threads``."""

from __future__ import annotations

import pytest
import torch

from harmon.cli import build_parser, main, name_cli_flags
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flags-pipeline")
    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("message, expected", [
    ("num_inference_steps must be >= 1, got 0", "--steps must be >= 1, got 0"),
    ("num_steps must be between 1 and the number of tokens 16, got 64",
     "--steps must be between 1 and the number of tokens 16, got 64"),
    ("head_steps applies to sampler='fast' only (got sampler='exact')",
     "--head-steps applies to --sampler fast only (got --sampler exact)"),
    ("num_images_per_prompt must be a positive int, got 0", "--num-images must be a positive int, got 0"),
    ("height must be a multiple of 16 in [16, 4096], got 70", "--height must be a multiple of 16 in [16, 4096], got 70"),
    ("negative_prompt must be a string", "negative_prompt must be a string"),  # no flag feeds it: unchanged
])
def test_python_argument_names_become_cli_flags(message, expected):
    assert name_cli_flags(message, "generate") == expected


def test_generate_errors_name_the_cli_flag(pipeline_dir, tmp_path, capsys):
    # the pipeline refuses num_inference_steps=0 / num_images_per_prompt=0; the CLI's message names its own flags
    code = main(["generate", str(pipeline_dir), "--prompt", "x", "--steps", "0", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--steps" in err and "num_inference_steps" not in err and "num_steps" not in err
    code = main(["generate", str(pipeline_dir), "--prompt", "x", "--steps", "1", "--num-images", "0",
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "--num-images" in err and "num_images_per_prompt" not in err


def test_threads_sets_torch_threads_and_is_refused_below_one(pipeline_dir, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["info", str(pipeline_dir), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert build_parser().parse_args(["info", "x"]).threads is None  # default: torch's own choice
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "x", "--threads", bad])
        assert "--threads" in capsys.readouterr().err

"""Class 8 of issue 14: every CLI argument is checked before any work; every error is one line naming the argument
or file, exit status 2, no traceback, and nothing is written."""

from __future__ import annotations

import pytest

from harmon.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from harmon.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("cli-bad-input")
    tiny_pipeline().save_pretrained(str(folder))
    return folder


GENERATE_CASES = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--num-images", "0"], "--num-images"),
    (["--grid", "--num-images", "2", "--grid-columns", "-1"], "--grid-columns"),
    (["--grid-columns", "0"], "--grid-columns"),
    (["--steps", "0"], "--steps"),
    (["--height", "-16"], "--height"),
    (["--width", "0"], "--width"),
    (["--seed", "-1"], "--seed"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--guidance-scale", "inf"], "--guidance-scale"),
    (["--guidance-scale", "0.5"], "--guidance-scale"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--head-steps", "0", "--sampler", "fast"], "--head-steps"),
    (["--batch-size", "two"], "--batch-size"),  # argparse's own type error, made one line
    (["--sampler", "turbo"], "--sampler"),
    (["--prompts-file", "/nonexistent/prompts.json"], "--prompts-file"),
    (["--prompt", "   "], r"--prompt[1] is empty"),
    (["--prompt", "x" * 100_001], r"--prompt[1] has 100001 characters"),
    (["--num-images", "1000000"], "--num-images"),  # the documented limit (harmon.validation), before loading
    (["--num-images", "100", "--batch-size", "3"], "--num-images × --batch-size"),
]


@pytest.mark.parametrize("extra,argument", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_bad_generate_arguments_fail_in_one_line_before_any_work(pipeline_dir, tmp_path, capsys, extra, argument):
    out = tmp_path / "out"
    argv = ["generate", str(pipeline_dir), "--prompt", "a cat", "--steps", "2", "--out", str(out), *extra]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse exits itself
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argument in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()  # nothing was written, not even the output folder


@pytest.mark.parametrize(
    "argv,argument",
    [
        (["describe", "{pipeline}", "--image", "/nonexistent.png"], "--image"),
        (["describe", "{pipeline}", "--image", "{image}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["describe", "{pipeline}", "--image", "{image}", "--seed", "-5"], "--seed"),
        (["describe", "/nonexistent/pipeline", "--image", "{image}"], "pipeline"),
        (["info", "/nonexistent/pipeline"], "pipeline"),
        (["generate", "{pipeline}/model_index.json", "--prompt", "x"], "pipeline"),
        (["convert", "--harmon", "/nonexistent.pth", "--vae", "{image}", "--llm", "{pipeline}", "--preset",
          "harmon-0.5b", "--out", "{out}"], "--harmon"),
        (["convert", "--harmon", "{image}", "--vae", "/nonexistent.ckpt", "--llm", "{pipeline}", "--preset",
          "harmon-0.5b", "--out", "{out}"], "--vae"),
        (["convert", "--harmon", "{image}", "--vae", "{image}", "--llm", "/nonexistent", "--preset",
          "harmon-0.5b", "--out", "{out}"], "--llm"),
        (["convert", "--harmon", "{image}", "--vae", "{image}", "--llm", "{pipeline}", "--config",
          "/nonexistent.json", "--out", "{out}"], "--config"),
        (["generate", "{pipeline}", "--prompt", "x", "--out", "{image}"], "--out"),
        (["demo", "{pipeline}", "--max-images", "0"], "--max-images"),
        (["demo", "{pipeline}", "--max-queue", "-1"], "--max-queue"),
        (["demo", "{pipeline}", "--port", "70000"], "--port"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_other_verbs_validate_files_and_numbers_first(pipeline_dir, tmp_path, capsys, argv, argument):
    image = tmp_path / "image.png"
    image.write_bytes(b"not read before the arguments are checked")
    argv = [a.format(pipeline=pipeline_dir, image=image, out=tmp_path / "out") for a in argv]
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argument in err[0], err
    assert not (tmp_path / "out").exists()

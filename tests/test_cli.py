"""The ``harmon`` CLI end to end on a tiny pipeline, and ``convert`` on the parity fixture's original files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from harmon.cli import main, read_prompts
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_tokenizer

from conftest import assert_close, parity_readme, recorded_image_token_id, replay_recorded_image



@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-pipeline")
    HarmonPipeline.from_model(tiny_model(), tiny_tokenizer()).save_pretrained(str(folder))
    return folder


def test_generate_from_a_json_prompt_list_with_grid(pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle"}, {"prompt": "a blue square"}]))
    out = tmp_path / "out"
    code = main(["generate", str(pipeline_dir), "--prompts-file", str(prompts), "--num-images", "2", "--grid",
                 "--steps", "2", "--seed", "3", "--out", str(out), "--batch-size", "2"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000_0.png", "00000_1.png", "00000_grid.png", "00001_0.png", "00001_1.png", "00001_grid.png"]
    assert PIL.Image.open(out / "00000_grid.png").size == (128, 64)
    assert "00001: a blue square" in capsys.readouterr().out


def test_generate_is_seeded(pipeline_dir, tmp_path):
    for name in ("a", "b"):
        assert main(["generate", str(pipeline_dir), "--prompt", "a cat", "--steps", "2", "--seed", "5",
                     "--out", str(tmp_path / name)]) == 0
    a = PIL.Image.open(tmp_path / "a" / "00000_0.png").tobytes()
    assert a == PIL.Image.open(tmp_path / "b" / "00000_0.png").tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU launch; with CUDA --multi_gpu uses the GPUs")
def test_generate_under_a_two_process_cpu_launch_splits_the_prompts(pipeline_dir, tmp_path):
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m harmon.cli generate``: each process
    writes its share of the prompts (each prompt once), the same files as one process."""
    import os

    prompts = ["a red circle", "a blue square", "a green cross"]
    flags = [arg for p in prompts for arg in ("--prompt", p)] + ["--steps", "2", "--seed", "1"]
    assert main(["generate", str(pipeline_dir), *flags, "--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "harmon.cli", "generate", str(pipeline_dir), *flags, "--out", str(tmp_path / "launched")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # every prompt once, not once per process (counted, not per line: the two processes' lines can interleave)
    assert [result.stdout.count(f"{i:05d}: {p}") for i, p in enumerate(prompts)] == [1, 1, 1], result.stdout
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "launched").iterdir()) == single
    for name in single:  # same seed, same image, up to round-off: a prompt batched with others (one process)
        # or alone (its process's share) goes through other BLAS paths; measured on a 2-core x86 machine: one
        # 8-bit level on 0.008 % of one image's pixels, the other images identical; a wrong seed changes them all
        one = np.asarray(PIL.Image.open(tmp_path / "single" / name), dtype=np.int16)
        launched = np.asarray(PIL.Image.open(tmp_path / "launched" / name), dtype=np.int16)
        assert np.abs(one - launched).max() <= 1 and (one != launched).mean() < 0.01, name


def test_generate_with_the_fast_sampler_and_a_bad_head_steps(pipeline_dir, tmp_path, capsys):
    assert main(["generate", str(pipeline_dir), "--prompt", "a cat", "--steps", "2", "--sampler", "fast",
                 "--head-steps", "3", "--out", str(tmp_path / "fast")]) == 0
    assert (tmp_path / "fast" / "00000_0.png").exists()
    assert main(["generate", str(pipeline_dir), "--prompt", "a cat", "--steps", "2", "--head-steps", "3",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--head-steps applies to --sampler fast only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_describe(pipeline_dir, tmp_path, capsys):
    image = tmp_path / "red.png"
    PIL.Image.new("RGB", (40, 30), (255, 0, 0)).save(image)
    assert main(["describe", str(pipeline_dir), "--image", str(image), "--question", "colour?",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    expected = HarmonPipeline.from_pretrained(pipeline_dir).understand(str(image), "colour?", max_new_tokens=3)
    assert printed == expected + "\n"


def test_info_console_script(pipeline_dir):
    result = subprocess.run([sys.executable, "-m", "harmon.cli", "info", str(pipeline_dir), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["encoder"] == "mar-tiny" and info["backbone"] == "qwen2-tiny"
    assert info["components"]["llm"]["class"] == "Qwen2ForCausalLM"
    assert info["components"]["harmon.encoder"]["parameters"] > 0
    assert info["components"]["vae"]["dtype"] == "float32"


def test_errors_are_reported_not_raised(pipeline_dir, tmp_path, capsys):
    assert main(["generate", str(pipeline_dir), "--prompt", "x", "--height", "70", "--out", str(tmp_path)]) == 2
    assert "height" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit, match="--prompts-file"):
        read_prompts(None, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "no prompt key"}]))
    with pytest.raises(SystemExit, match="item 0"):
        read_prompts(None, str(bad))


def test_convert_the_original_fixture_reproduces_its_tensors(fixture_files, parity_dir, parity_tensors, original_config,
                                                             tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", "--harmon", str(fixture_files["harmon"]), "--vae", str(fixture_files["vae"]),
                 "--llm", str(fixture_files["llm"]), "--config", str(fixture_files["config"]),
                 "--out", str(out)]) == 0
    from harmon.original_config import read_original_config

    written, given = (read_original_config(c).model for c in (out / "original_config.json", original_config))
    assert (written.vae.embed_dim, written.vae.ch_mult, written.vae_scale) == (
        given.vae.embed_dim, given.vae.ch_mult, given.vae_scale)
    for key in ("encoder_embed_dim", "decoder_depth", "buffer_size", "diffloss_w"):
        assert getattr(written.mar, key) == getattr(given.mar, key), key
    assert int(written.mar.num_sampling_steps) == int(given.mar.num_sampling_steps)

    pipe = HarmonPipeline.from_pretrained(out)
    t = parity_tensors
    assert_close(pipe.model.encode_image(t["vae.image"]), t["vae.tokens"], 1e-5, "vae.tokens")
    readme = parity_readme(parity_dir)
    image = replay_recorded_image(pipe, t, readme)
    assert_close(image, t["e2e.image"], 1e-5, "e2e.image")  # as tests/test_parity.py
    # the tokenizer came along from the LLM folder
    from transformers import AutoTokenizer

    folder_tokenizer = AutoTokenizer.from_pretrained(str(fixture_files["llm"]))
    assert pipe.tokenizer.get_vocab() == folder_tokenizer.get_vocab()
    assert pipe.tokenizer.eos_token == folder_tokenizer.eos_token
    with torch.no_grad():
        logits = pipe.llm(inputs_embeds=pipe.model.splice_image_embeddings(
            t["und.input_ids"], pipe.model.image_embeddings(t["vae.image"]),
            recorded_image_token_id(readme, t, pipe.llm.config.vocab_size)
        )).logits[:, -1]
    assert_close(logits, t["und.last_logits"], 1e-5, "und.last_logits")

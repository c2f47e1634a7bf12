"""What the trainer refuses before it builds anything, and the smoke recipe on a fresh clone:

* a fresh run into an ``output_dir`` holding an earlier run (names ``--resume`` / ``--overwrite``; nothing lost);
  ``--overwrite`` replaces it (one run's metrics, not two);
* a multi-process launch whose processes would train alone (``WORLD_SIZE`` ≠ accelerate's process count);
* ``experiments/configs/smoke.yaml`` writes its synthetic data when ``data.root`` is absent (``--check`` does not).

The two-process CPU launch that works (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu``) is run for real in
a subprocess: both processes join one gloo group, train the same replicated weights and resume exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state

from harmon.train import main as train_main
from harmon.training.config import load_config
from harmon.training.guards import LaunchError, OutputDirError, check_launch
from harmon.training.synthetic import shapes_dataset_complete, write_shapes_dataset
from harmon.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "configs" / "smoke.yaml"
TINY_RUN = {"training.max_steps": 2, "training.micro_batch_size": 2, "training.global_batch_size": 4,
            "training.checkpoint_every": 2, "training.log_every": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=16, size=64, seed=0)


def argv(shapes: Path, output_dir: Path, steps: int = 2) -> list[str]:
    overrides = {**TINY_RUN, "training.max_steps": steps, "data.root": shapes, "output_dir": output_dir}
    return ["--config", str(SMOKE), *(x for k, v in overrides.items() for x in ("-o", f"{k}={v}"))]


def test_rerun_into_the_same_output_dir_is_refused_then_overwrite_replaces_it(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(argv(shapes, out)) == 0
    checkpoint = out / "checkpoints" / "step-00000002" / "manifest.json"
    before = checkpoint.read_bytes()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()

    reset_accelerate_state()
    assert train_main(argv(shapes, out)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(out) in err
    assert checkpoint.read_bytes() == before  # nothing lost
    with pytest.raises(OutputDirError, match="--overwrite"):
        reset_accelerate_state()
        Trainer(load_config(SMOKE, overrides={**TINY_RUN, "data.root": str(shapes), "output_dir": str(out)}))

    (out / "notes.txt").write_text("mine")
    reset_accelerate_state()
    assert train_main([*argv(shapes, out, steps=1), "--overwrite"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's only, not appended
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own artefacts are deleted

    with pytest.raises(SystemExit):
        train_main([*argv(shapes, out), "--overwrite", "--resume"])
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("environ, refused", [
    ({}, False), ({"WORLD_SIZE": "1"}, False), ({"WORLD_SIZE": "2"}, True),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "True"}, True), ({"WORLD_SIZE": "x"}, True),
])
def test_check_launch_refuses_a_world_size_accelerate_did_not_join(environ, refused):
    if not refused:
        check_launch(1, environ)
        return
    with pytest.raises(LaunchError, match="WORLD_SIZE") as error:
        check_launch(1, environ)
    if environ.get("WORLD_SIZE") == "2" and "ACCELERATE_USE_CPU" not in environ:
        assert "ACCELERATE_USE_CPU=1" in str(error.value) and "--multi_gpu" in str(error.value)
    check_launch(2, {"WORLD_SIZE": "2"})  # a group of two launched as two


def test_trainer_refuses_world_size_two_in_a_one_process_accelerator(shapes, tmp_path, monkeypatch, capsys):
    # what `accelerate launch --multi_gpu --num_processes 2` gives each process on a machine without CUDA
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_main(argv(shapes, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "ACCELERATE_USE_CPU=1" in err
    assert not (tmp_path / "run").exists()


def test_smoke_recipe_writes_its_data_when_absent(tmp_path, capsys):
    root = tmp_path / "data" / "shapes"
    base = [*argv(root, tmp_path / "run", steps=1)]
    assert train_main([*base, "--check"]) == 0 and not root.exists()  # --check validates, writes nothing
    capsys.readouterr()
    reset_accelerate_state()
    assert train_main(base) == 0
    assert shapes_dataset_complete(root)
    assert len(json.loads((root / "data_info.json").read_text())) == 48  # the recipe's data.synthetic.count
    with pytest.raises(ValueError, match="data.synthetic"):
        load_config(SMOKE, overrides={"data.root": None}, check_files=False)


def _launch(env, cli_args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "harmon.train", *cli_args, "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU launch; with CUDA --multi_gpu uses the GPUs")
def test_two_cpu_processes_train_together_and_resume_exactly(shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("WORLD_SIZE", None)

    broken = _launch(env, argv(shapes, tmp_path / "broken"))  # without ACCELERATE_USE_CPU: refused
    assert broken.returncode != 0 and "ACCELERATE_USE_CPU=1" in broken.stderr, broken.stderr[-2000:]
    assert not (tmp_path / "broken" / "checkpoints").exists()

    env["ACCELERATE_USE_CPU"] = "1"
    straight = _launch(env, argv(shapes, tmp_path / "straight", steps=3))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _launch(env, [*argv(shapes, tmp_path / "resumed", steps=3), "--stop-after", "1"])
    assert first.returncode == 0 and "stopped at step 1" in first.stdout, first.stderr[-3000:]
    second = _launch(env, [*argv(shapes, tmp_path / "resumed", steps=3), "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]

    def state(run):
        path = tmp_path / run / "checkpoints" / "step-00000003"
        assert json.loads((path / "trainer_state.json").read_text())["num_processes"] == 2
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))

    a, b = state("straight"), state("resumed")
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed 2-process run differs from the uninterrupted one by {worst:.2e}"
    losses = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3]


def test_shared_tensor_warning_is_explained_once_not_at_every_checkpoint(shapes, tmp_path, caplog):
    import logging

    from harmon.training.messages import ACCELERATE_LOGGER

    caplog.set_level(logging.INFO)
    overrides = {**TINY_RUN, "training.checkpoint_every": 1, "data.root": str(shapes), "output_dir": str(tmp_path)}
    trainer = Trainer(load_config(SMOKE, overrides=overrides))
    trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2
    assert not [m for m in messages if "while saving" in m]  # accelerate's warning
    notes = [m for m in messages if "tied weights once" in m]
    assert len(notes) == 1 and "model.llm.lm_head.weight is model.llm.model.embed_tokens.weight" in notes[0]
    # a shared tensor the model does not tie is still reported as accelerate reports it
    caplog.clear()
    logging.getLogger(ACCELERATE_LOGGER).warning("Removed shared tensor {'model.other.weight'} while saving. ...")
    assert any("model.other.weight" in r.getMessage() for r in caplog.records)

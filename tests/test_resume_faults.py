"""Class 9 of issue 14: training data and resume faults.

* a recipe with a YAML syntax error, or an override that is not YAML: exit 2 naming the file / override;
* corrupt data found up front (``file:line`` for JSONL, the entry for ``data_info.json``, the file for an
  annotation or an image), or lazily with the same names when a file changes under a run;
* a resume after a kill cuts ``metrics.jsonl`` back to the checkpoint's step (no step logged twice);
* a checkpoint whose RNG state cannot be restored is refused by name (accelerate only logs it), and the check
  leaves the process's random streams as they were.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate_state

from harmon.train import main as train_main
from harmon.training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointManager,
    check_rng_state,
    truncate_metrics,
)
from harmon.training.config import CaptionSource, DataConfig, TextSource, load_config
from harmon.training.data import CaptionRecords, MultiTaskDataset, TextRecords
from harmon.training.synthetic import write_shapes_dataset
from harmon.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "configs" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=16, size=64, seed=0)


# --------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "text",
    ["run_name: smoke\ntraining: {max_steps: 3\n", "model:\n  preset: tiny\n bad_indent: 1\n", "a: [1, 2\n",
     "\tseed: 0\n"],
)
def test_a_yaml_syntax_error_exits_2_naming_the_file(tmp_path, capsys, text):
    recipe = tmp_path / "broken recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=f"{recipe}: not valid YAML"):
        load_config(recipe)
    assert train_main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "not valid YAML" in err and "Traceback" not in err


def test_an_override_that_is_not_yaml_is_named(capsys):
    assert train_main(["--config", str(SMOKE), "-o", "training.max_steps=[1", "--check"]) == 2
    assert "override 'training.max_steps=[1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,field",
    [
        ("optimizer.betas=[.nan, 0.95]", "optimizer.betas"),
        ("optimizer.weight_decay=.inf", "optimizer.weight_decay"),
        ("optimizer.max_grad_norm=.inf", "optimizer.max_grad_norm"),
        ("loss_weights.text=.inf", "loss_weights.text"),
        ("learning_rates.encoder=.nan", "learning_rates.encoder"),
        ("data.cfg_drop_prob=.nan", "data.cfg_drop_prob"),
    ],
)
def test_non_finite_recipe_numbers_are_refused_naming_the_field(capsys, override, field):
    assert train_main(["--config", str(SMOKE), "-o", override, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{field}" in err and "finite number" in err, err


def test_non_finite_model_config_numbers_are_refused():
    from pydantic import ValidationError

    from harmon.configs import HarmonConfig

    for field in ("vae_scale", "visual_grad_scale"):
        with pytest.raises(ValidationError, match=field):
            HarmonConfig.from_preset("tiny", **{field: float("inf")})


# -------------------------------------------------------------------------------------------------- data
def text_source(tmp_path: Path, lines: list[bytes], name: str = "docs.jsonl") -> TextRecords:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = DataConfig(ratios={"text": 1}, text=[{"format": "text", "path": str(path)}])
    return TextRecords(TextSource(path=path), data)


GOOD = b'{"text": "a red circle"}'


@pytest.mark.parametrize(
    "bad,message",
    [
        (b'{"text": "unterminated', "not a JSON line"),
        (b"[1, 2, 3]", "expected a JSON object with a string 'text'"),
        (b'{"body": "no text key"}', "expected a JSON object with a string 'text'"),
        (b'{"text": 42}', "expected a JSON object with a string 'text'"),
        (b'{"text": "\xff\xfe"}', "not UTF-8"),
    ],
)
def test_a_corrupt_jsonl_line_is_found_up_front_naming_file_and_line(tmp_path, bad, message):
    with pytest.raises(ValueError, match=rf"docs.jsonl:4: {message}"):
        text_source(tmp_path, [GOOD, GOOD, b"", bad, GOOD])  # the blank line still counts


def test_a_jsonl_file_changed_under_a_run_is_named_lazily(tmp_path):
    records = text_source(tmp_path, [GOOD, GOOD, GOOD])
    assert records.text(2) == "a red circle"
    (tmp_path / "docs.jsonl").write_bytes(GOOD + b"\n" + GOOD + b"\n" + b'{"text": broken}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:3: not a JSON line"):
        records.text(2)


def test_plain_text_lines_are_kept_and_counted(tmp_path):
    records = text_source(tmp_path, [b"first", b"", b"third"], name="docs.txt")
    assert len(records) == 2 and records.text(1) == "third"


def caption_data(shapes: Path, tmp_path: Path) -> tuple[Path, DataConfig]:
    folder = tmp_path / "captions"
    shutil.copytree(shapes, folder)
    data = DataConfig(root=folder, ratios={"text_to_image": 1},
                      text_to_image=[{"format": "caption", "data_info": "data_info.json"}])
    return folder, data


def test_a_bad_data_info_entry_is_found_up_front_naming_it(shapes, tmp_path):
    folder, data = caption_data(shapes, tmp_path)
    entries = json.loads((folder / "data_info.json").read_text())
    entries[5] = {"image": entries[5]["image"]}
    (folder / "data_info.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"data_info.json: entry 5 must hold 'image' and 'annotation'"):
        MultiTaskDataset(data)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"text": "no caption key"}'])
def test_a_corrupt_annotation_names_its_file(shapes, tmp_path, content):
    folder, data = caption_data(shapes, tmp_path)
    records = CaptionRecords(CaptionSource(data_info=Path("data_info.json")), data)
    annotation = folder / records.entries[2]["annotation"]
    annotation.write_text(content)
    with pytest.raises((ValueError, KeyError), match=str(annotation)):
        records.caption(2)


@pytest.mark.parametrize("damage", ["truncated", "bomb", "text"])
def test_a_bad_training_image_names_its_file(shapes, tmp_path, damage):
    folder, data = caption_data(shapes, tmp_path)
    dataset = MultiTaskDataset(data)
    records = dataset.sources["text_to_image"][0]
    image = folder / records.entries[1]["image"]
    if damage == "truncated":
        image.write_bytes(image.read_bytes()[:60])
    elif damage == "bomb":
        from test_bad_input import png_header_only

        image.write_bytes(png_header_only(60_000, 60_000))
    else:
        image.write_text("not an image")
    with pytest.raises(ValueError, match=str(image)):
        dataset[("text_to_image", 1, 0)]


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"image": ["a.png"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         "entry 1: 'image' must be a path string"),
        ({"image": "a.png", "conversations": "not a list"}, "entry 1: 'conversations' must be a list"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
         "entry 1: 'conversations' must be a list"),
    ],
)
def test_a_bad_llava_entry_is_found_up_front_naming_it(tmp_path, entry, message):
    from harmon.training.config import LlavaSource
    from harmon.training.data import LlavaRecords

    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([good, entry]))
    data = DataConfig(ratios={"image_to_text": 1}, image_to_text=[{"format": "llava", "path": str(path)}])
    with pytest.raises(ValueError, match=rf"llava.json: {message}"):
        LlavaRecords(LlavaSource(path=path), data)


def test_train_check_reads_the_data_up_front(shapes, tmp_path, capsys):
    folder, _ = caption_data(shapes, tmp_path)
    with (folder / "text.jsonl").open("ab") as handle:
        handle.write(b'{"text": oops}\n')
    lines = len((folder / "text.jsonl").read_bytes().splitlines())
    assert train_main(["--config", str(SMOKE), "-o", f"data.root={folder}", "--check"]) == 2
    err = capsys.readouterr().err
    assert f"text.jsonl:{lines}: not a JSON line" in err and "Traceback" not in err
    status = train_main(["--config", str(SMOKE), "-o", f"data.root={folder}", "-o",
                         f"output_dir={tmp_path / 'run'}", "-o", "training.max_steps=1"])
    assert status == 2 and f"text.jsonl:{lines}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ resume
OVERRIDES = {
    "training.max_steps": 5, "training.micro_batch_size": 2, "training.global_batch_size": 2,
    "training.checkpoint_every": 2, "training.keep_last": 5, "training.log_every": 1,
    "training.gradient_checkpointing": False,
}


def config_for(shapes: Path, output_dir: Path, **overrides):
    return load_config(SMOKE, overrides={"data.root": str(shapes), "output_dir": str(output_dir),
                                          **OVERRIDES, **overrides})


def logged_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def killed_run(shapes, tmp_path_factory):
    """A run that logged steps 1-4 with checkpoints at 2 and 4, then 'died' before step 4's checkpoint existed."""
    reset_accelerate_state()
    output_dir = tmp_path_factory.mktemp("killed")
    Trainer(config_for(shapes, output_dir), stop_after=4).train()
    assert logged_steps(output_dir) == [1, 2, 3, 4]
    shutil.rmtree(output_dir / "checkpoints" / "step-00000004")  # the kill came before this save committed
    with (output_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss/to')  # and tore the line it was writing
    return output_dir


def test_resume_after_a_kill_logs_every_step_once(shapes, killed_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(killed_run, output_dir)
    reset_accelerate_state()
    trainer = Trainer(config_for(shapes, output_dir), resume="latest")
    assert trainer.step == 2 and logged_steps(output_dir) == [1, 2]  # cut back before any new step
    trainer.train()
    assert logged_steps(output_dir) == [1, 2, 3, 4, 5]


KILL_AT_STEP_3 = """
import os, signal, sys
from harmon.training.config import load_config
from harmon.training.trainer import Trainer

def kill(trainer, record):
    if record["step"] == 3:  # step 3 is logged; its checkpoint (every 2 steps) never comes
        os.kill(os.getpid(), signal.SIGKILL)

config = load_config(sys.argv[1], overrides=sys.argv[2:])
Trainer(config, callbacks=[kill]).train()
"""


def test_a_real_kill_9_then_resume_logs_every_step_once(shapes, tmp_path):
    import os
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    overrides = [f"data.root={shapes}", f"output_dir={output_dir}", *(f"{k}={v}" for k, v in OVERRIDES.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP_3, str(SMOKE), *overrides], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert logged_steps(output_dir) == [1, 2, 3]
    reset_accelerate_state()
    Trainer(load_config(SMOKE, overrides=overrides), resume="latest").train()
    assert logged_steps(output_dir) == [1, 2, 3, 4, 5]


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5')
    assert truncate_metrics(metrics, 3) == 2
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    assert truncate_metrics(metrics, 3) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest agree with the files again: the damage below is one a checksum cannot catch."""
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[str(path.relative_to(checkpoint))] = {"size": path.stat().st_size,
                                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest["files"] = files
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))


def damage_rng(kind: str):
    def apply(file: Path) -> None:
        if kind == "missing":
            file.unlink()
        elif kind == "garbage":
            file.write_bytes(b"this is not a pickle")
        elif kind == "no-torch-state":
            states = torch.load(file, weights_only=False)
            del states["torch_manual_seed"]
            torch.save(states, file)
        elif kind == "bad-torch-state":
            states = torch.load(file, weights_only=False)
            states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)
            torch.save(states, file)
    return apply


@pytest.mark.parametrize("kind", ["missing", "garbage", "no-torch-state", "bad-torch-state"])
def test_a_checkpoint_whose_rng_state_cannot_be_loaded_is_refused_by_name(shapes, killed_run, tmp_path, kind):
    output_dir = tmp_path / "run"
    shutil.copytree(killed_run, output_dir)
    checkpoint = CheckpointManager(output_dir / "checkpoints").latest()
    rng_file = checkpoint / "random_states_0.pkl"
    damage_rng(kind)(rng_file)
    rewrite_manifest(checkpoint)
    metrics_before = (output_dir / "metrics.jsonl").read_text()
    streams = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with pytest.raises(CheckpointError, match=str(rng_file)):
        check_rng_state(checkpoint, 0)
    assert random.getstate() == streams[0] and np.array_equal(np.random.get_state()[1], streams[1])
    assert torch.equal(torch.get_rng_state(), streams[2])  # the check restored the random streams
    reset_accelerate_state()
    with pytest.raises(CheckpointError, match="random_states_0.pkl"):
        Trainer(config_for(shapes, output_dir), resume=checkpoint)
    assert (output_dir / "metrics.jsonl").read_text() == metrics_before  # a refused resume changes nothing


def test_an_intact_rng_state_passes_and_is_not_consumed(killed_run):
    checkpoint = CheckpointManager(killed_run / "checkpoints").latest()
    state = torch.get_rng_state()
    check_rng_state(checkpoint, 0)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(CheckpointError, match="random_states_1.pkl is missing"):
        check_rng_state(checkpoint, 1)  # a second process: this checkpoint was written by one

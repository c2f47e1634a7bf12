"""Acceptance tests of the trainer (CPU, tiny preset, synthetic shapes written into tmp_path):

* smoke: ``experiments/configs/smoke.yaml`` trains for a few dozen steps — both losses fall, checkpoints are
  written and intact, the export folder holds the trained weights and (when ``harmon.pipelines`` provides
  ``HarmonPipeline``) loads as a pipeline that generates;
* resume: a run stopped after step k and resumed ends with the uninterrupted run's weights; a partial or
  corrupt checkpoint is refused with an error naming the problem;
* freezing: stage I's recipe leaves the LLM (and VAE) bit-identical, and the optimizer carries the configured
  per-module learning rates;
* bad recipes fail before training with a message naming the field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reset_accelerate_state
from pydantic import ValidationError

from harmon.model import HarmonModel
from harmon.training.checkpointing import CheckpointError, CheckpointManager, verify_checkpoint
from harmon.training.config import load_config
from harmon.training.synthetic import write_shapes_dataset
from harmon.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "configs" / "smoke.yaml"
STAGE1 = REPO / "experiments" / "configs" / "stage1_harmon-0.5b.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=48, size=64, seed=0)


def smoke_config(shapes: Path, output_dir: Path, **overrides):
    return load_config(SMOKE, overrides={"data.root": str(shapes), "output_dir": str(output_dir), **overrides})


def task_losses(history: list[dict], task: str) -> list[float]:
    return [record[f"loss/{task}"] for record in history if f"loss/{task}" in record]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------- smoke
@pytest.fixture(scope="module")
def smoke_run(shapes, tmp_path_factory):
    reset_accelerate_state()
    output_dir = tmp_path_factory.mktemp("smoke")
    trainer = Trainer(smoke_config(shapes, output_dir))
    result = trainer.train()
    return trainer, result, output_dir


def test_smoke_run_trains_both_tasks_and_their_losses_fall(smoke_run):
    trainer, result, _ = smoke_run
    max_steps = trainer.config.training.max_steps
    assert result.step == max_steps and len(result.history) == max_steps and not result.stopped_early
    assert trainer.accumulation == 2  # global batch 8 = 4 per micro-batch × 2
    for task in ("text_to_image", "image_to_text"):
        losses = task_losses(result.history, task)
        quarter = max(1, len(losses) // 4)
        first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
        assert last < first, f"{task}: last-quarter mean {last:.4f} is not below first-quarter mean {first:.4f}"
    assert task_losses(result.history, "text"), "the plain-text task never ran"


def test_smoke_run_writes_intact_checkpoints_metrics_and_export(smoke_run):
    trainer, result, output_dir = smoke_run
    training = trainer.config.training
    checkpoints = CheckpointManager(output_dir / "checkpoints").list()
    expected = [s for s in range(training.checkpoint_every, training.max_steps + 1, training.checkpoint_every)]
    assert [int(p.name.split("-")[1]) for p in checkpoints] == expected[-training.keep_last:]
    assert result.checkpoint == checkpoints[-1]
    for path in checkpoints:
        assert verify_checkpoint(path)["step"] == int(path.name.split("-")[1])
    assert len((output_dir / "metrics.jsonl").read_text().splitlines()) == training.max_steps // training.log_every
    export = result.export_dir
    assert export == output_dir / "export" and (export / "export_info.json").is_file()
    exported = HarmonModel.from_pretrained(export / "harmon_model")
    trained = trainer.model.state_dict()
    for key, value in exported.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert (export / "harmon_model" / "tokenizer.json").is_file()


def test_exported_pipeline_loads_and_generates(smoke_run):
    _, result, _ = smoke_run
    try:
        from harmon.pipelines import HarmonPipeline
    except ImportError as error:
        pytest.skip(f"harmon.pipelines.HarmonPipeline is not available ({error}); the export holds harmon_model/ only")
    assert result.export_info["pipeline"]["written"]
    pipe = HarmonPipeline.from_pretrained(result.export_dir)
    output = pipe(
        "a red circle on the left", height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    )
    images = output.images
    assert tuple(images.shape) == (1, 3, 64, 64) and bool(torch.isfinite(images).all())


# -------------------------------------------------------------------------------------------------- resume
RESUME_OVERRIDES = {
    "training.max_steps": 6, "training.micro_batch_size": 2, "training.global_batch_size": 4,
    "training.checkpoint_every": 4, "training.keep_last": 3, "training.log_every": 2,
}


@pytest.fixture(scope="module")
def resume_runs(shapes, tmp_path_factory):
    def run(output_dir, **kwargs):
        reset_accelerate_state()
        trainer = Trainer(smoke_config(shapes, output_dir, **RESUME_OVERRIDES), **kwargs)
        return trainer, trainer.train()

    root = tmp_path_factory.mktemp("resume")
    straight = run(root / "straight")
    interrupted = run(root / "interrupted", stop_after=3)
    resumed = run(root / "interrupted", resume="latest")
    return {"straight": straight, "interrupted": interrupted, "resumed": resumed, "root": root}


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(resume_runs):
    straight_trainer, straight = resume_runs["straight"]
    _, interrupted = resume_runs["interrupted"]
    resumed_trainer, resumed = resume_runs["resumed"]
    assert interrupted.stopped_early and interrupted.step == 3 and interrupted.export_dir is None
    assert interrupted.checkpoint.name == "step-00000003"
    assert resumed_trainer.resumed_from == interrupted.checkpoint
    assert resumed.step == straight.step == 6 and not resumed.stopped_early
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    for a, b in zip(straight.history[3:], resumed.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    expected, actual = straight_trainer.model.state_dict(), resumed_trainer.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)
    optimizer_a = straight_trainer.optimizer.state_dict()["state"]
    optimizer_b = resumed_trainer.optimizer.state_dict()["state"]
    assert optimizer_a.keys() == optimizer_b.keys()
    assert all(int(optimizer_a[k]["step"]) == int(optimizer_b[k]["step"]) == 6 for k in optimizer_a)


def test_partial_and_corrupt_checkpoints_are_refused(resume_runs, shapes, tmp_path):
    source = resume_runs["root"] / "interrupted" / "checkpoints"
    config = smoke_config(shapes, tmp_path / "run", **RESUME_OVERRIDES)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(source, checkpoints)
    newest = CheckpointManager(checkpoints).latest()
    assert newest.name == "step-00000006"

    # an altered byte in the newest checkpoint: --resume latest refuses it (no silent fallback to an older one)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000006 is corrupt.*model.safetensors fails its SHA-256"):
        Trainer(config, resume="latest")

    # a checkpoint whose save never finished (no manifest)
    partial = checkpoints / "step-00000004"
    (partial / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        Trainer(config, resume=partial)

    # a truncated optimizer state
    truncated = checkpoints / "step-00000003"
    optimizer = truncated / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.bin has 100 bytes"):
        Trainer(config, resume=truncated)


# ------------------------------------------------------------------------------------------------- freezing
def test_stage1_recipe_freezes_the_llm_and_sets_per_module_learning_rates(shapes, tmp_path):
    data = yaml.safe_load(SMOKE.read_text())["data"]
    data.update(root=str(shapes), ratios={"text": 0, "image_to_text": 1, "text_to_image": 2})
    config = load_config(STAGE1, overrides={
        "model": {"preset": "tiny"}, "data": data, "output_dir": str(tmp_path / "stage1"),
        "training.max_steps": 3, "training.micro_batch_size": 2, "training.global_batch_size": 4,
        "training.checkpoint_every": 100, "training.log_with": "none", "schedule.warmup_steps": 0,
        "training.gradient_checkpointing": False,
    })
    trainer = Trainer(config)
    llm_before, vae_before = state_of(trainer.model.llm), state_of(trainer.model.vae)
    encoder_before = state_of(trainer.model.encoder)

    rates = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    modules = {g["module"] for g in trainer.optimizer.param_groups}
    assert modules == {"encoder", "decoder", "head", "proj_in", "proj_out"}
    for name, lr in rates.items():
        module = name.split("/")[0]
        assert lr == {"encoder": 1e-5}.get(module, 1e-4), name
    for group in trainer.optimizer.param_groups:
        assert group["weight_decay"] == (0.0 if group["name"].endswith("/no_decay") else 0.02)
    in_optimizer = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert in_optimizer == trainable
    assert not any(p.requires_grad for p in trainer.model.llm.parameters())

    result = trainer.train()
    assert result.step == 3
    for key, value in state_of(trainer.model.llm).items():
        assert torch.equal(value, llm_before[key]), f"frozen LLM parameter {key} changed"
    for key, value in state_of(trainer.model.vae).items():
        assert torch.equal(value, vae_before[key]), f"VAE parameter {key} changed"
    assert any(not torch.equal(v, encoder_before[k]) for k, v in state_of(trainer.model.encoder).items())
    logged = result.history[-1]
    assert logged["lr/encoder"] <= 1e-5 and logged["lr/decoder"] <= 1e-4 and "lr/llm" not in logged


# ------------------------------------------------------------------------------------------------ bad recipes
@pytest.mark.parametrize(
    "override, field, message",
    [
        ({"learning_rates.vision_tower": 1e-4}, "learning_rates", "unknown module 'vision_tower'"),
        ({"frozen_modules": ["llm", "image_encoder"]}, "frozen_modules", "unknown module 'image_encoder'"),
        ({"learning_rates.encoder": -1e-5}, "learning_rates.encoder", "greater than 0"),
        ({"learning_rates.vae": 1e-4}, "learning_rates.vae", "always frozen"),
        ({"learning_rates": {"decoder": 1e-4}}, "learning_rates.encoder", "is needed"),
        ({"data.ratios": {"text": 0, "image_to_text": 0, "text_to_image": 0}}, "data.ratios", "sum to 0"),
        ({"data.text_to_image": [{"format": "caption", "data_info": "nowhere/data_info.json"}]},
         "data.text_to_image[0].data_info", "file not found"),
        ({"data.text": [{"format": "caption", "data_info": "data_info.json"}]}, "data.text[0].format", "cannot feed"),
        ({"training.max_step": 5}, "max_step", "Extra inputs are not permitted"),
        ({"model": {"preset": "harmon-9b"}}, "model.preset", "unknown preset"),
    ],
)
def test_bad_recipes_fail_at_load_naming_the_field(shapes, tmp_path, override, field, message):
    with pytest.raises(ValidationError) as caught:
        smoke_config(shapes, tmp_path / "run", **override)
    text = str(caught.value)
    assert field in text and message in text, text
    assert not (tmp_path / "run").exists()


def test_cli_rejects_a_bad_recipe_before_training(shapes, tmp_path, capsys):
    from harmon.train import main

    status = main([
        "--config", str(SMOKE), "-o", f"data.root={shapes}", "-o", f"output_dir={tmp_path / 'run'}",
        "-o", "data.ratios={text: 0, image_to_text: 0, text_to_image: 0}",
    ])
    assert status == 2
    assert "data.ratios" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["--config", str(SMOKE), "-o", f"data.root={shapes}", "--check"]) == 0


def test_batch_geometry_that_does_not_divide_fails_before_the_model_is_built(shapes, tmp_path):
    config = smoke_config(shapes, tmp_path / "run", **{"training.global_batch_size": 6})
    message = r"training.global_batch_size \(6\) is not a multiple of training.micro_batch_size"
    with pytest.raises(ValueError, match=message):
        Trainer(config)

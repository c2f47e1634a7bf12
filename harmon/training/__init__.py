"""Training Harmon: stage recipes (YAML, pydantic-validated), data (release caption layout, LLaVA conversations,
plain text), task mixing, the accelerate trainer with atomic resumable checkpoints, and export.

Run a recipe with ``accelerate launch -m harmon.train --config experiments/configs/stage1_harmon-0.5b.yaml``
(see ``docs/training.md``). Importing this package is cheap; the trainer loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "harmon.training.config",
    "load_config": "harmon.training.config",
    "TASKS": "harmon.training.config",
    "MODULE_NAMES": "harmon.training.config",
    "HarmonCollator": "harmon.training.collator",
    "MultiTaskDataset": "harmon.training.data",
    "TaskSchedule": "harmon.training.sampler",
    "MultiTaskBatchSampler": "harmon.training.sampler",
    "CheckpointError": "harmon.training.checkpointing",
    "CheckpointManager": "harmon.training.checkpointing",
    "verify_checkpoint": "harmon.training.checkpointing",
    "export_model": "harmon.training.export",
    "Trainer": "harmon.training.trainer",
    "TrainResult": "harmon.training.trainer",
    "train": "harmon.training.trainer",
    "write_shapes_dataset": "harmon.training.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harmon.training' has no attribute {name!r}")

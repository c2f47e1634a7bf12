"""harmon: Harmon-style unified multimodal models (one MAR encoder for image understanding and generation).

The public API is imported lazily (``import harmon`` stays cheap)::

    from harmon import HarmonConfig, HarmonModel, ENCODERS
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HarmonConfig": "harmon.configs",
    "ComponentSpec": "harmon.configs",
    "PRESETS": "harmon.configs",
    "HarmonModel": "harmon.model",
    "mask_schedule": "harmon.model",
    "load_original_harmon": "harmon.conversion",
    "convert_original_harmon_state_dict": "harmon.conversion",
    "ENCODERS": "harmon.registry",
    "DECODERS": "harmon.registry",
    "BACKBONES": "harmon.registry",
    "HEADS": "harmon.registry",
    "Registry": "harmon.registry",
    "load_pretrained": "harmon.registry",
    "GeneratorRandomSource": "harmon.randomness",
    "ReplayRandomSource": "harmon.randomness",
    "CheckpointKeyError": "harmon.checkpoints",
    "HarmonCore": "harmon.core",
    "HarmonPipeline": "harmon.pipelines.pipeline_harmon",
    "HarmonProcessor": "harmon.pipelines.processing_harmon",
    "ADMScheduler": "harmon.schedulers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harmon' has no attribute {name!r}")

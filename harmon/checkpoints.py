"""Reading checkpoints safely and loading them strictly.

Weights are read with safetensors or ``torch.load(weights_only=True)``: nothing executes pickled code. A state
dict that does not fit a model fails with :class:`CheckpointKeyError`, naming every missing, unexpected and
mis-shaped key (by its name in the original file when a converter renamed it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class CheckpointKeyError(ValueError):
    """A checkpoint's tensors do not match the model: missing, unexpected or mis-shaped keys."""


def read_state_dict(path: str | os.PathLike, wrapper_keys: tuple[str, ...] = ("model", "state_dict")) -> dict:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``); a dict wrapped
    under one of ``wrapper_keys`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch checkpoint (weights only): {error}") from error
    if isinstance(data, Mapping):
        for key in wrapper_keys:
            if key in data and isinstance(data[key], Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(data)


def summarise_names(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names and how many more: a wrong architecture mis-fits hundreds of tensors, and one
    line listing them all hides the cause (the sizes) behind 20 KB of names."""
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    original_names: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`CheckpointKeyError` unless ``state_dict`` has exactly ``module``'s keys and shapes.

    ``original_names`` maps module keys to their names in the original file (for present keys, as renamed, and
    for keys the module expects, so that a missing one is named as the file would name it)."""
    original_names = original_names or {}
    expected = module.state_dict()
    missing = sorted(original_names.get(k, k) for k in set(expected) - set(state_dict))
    unexpected = sorted(original_names.get(k, k) for k in set(state_dict) - set(expected))
    misshaped = sorted(
        f"{original_names.get(k, k)} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state_dict) & set(expected)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {summarise_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {summarise_names(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {summarise_names(misshaped)}")
    if problems:
        raise CheckpointKeyError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    original_names: Mapping[str, str] | None = None,
) -> None:
    check_state_dict(module, state_dict, source, original_names)
    module.load_state_dict(state_dict, strict=True)

"""Reading checkpoints safely and loading them strictly.

Weights are read with safetensors or ``torch.load(weights_only=True)``: nothing executes pickled code. A state
dict that does not fit a model fails with :class:`CheckpointKeyError`, naming every missing, unexpected and
mis-shaped key (by its name in the original file when a converter renamed it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
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
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors' SafetensorError (truncated, bad header) is a bare Exception
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
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
    optional: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`CheckpointKeyError` unless ``state_dict`` has exactly ``module``'s keys and shapes.

    ``original_names`` maps module keys to their names in the original file (for present keys, as renamed, and
    for keys the module expects, so that a missing one is named as the file would name it); ``optional`` keys
    (e.g. tied weights, saved once) may be absent."""
    original_names = original_names or {}
    expected = module.state_dict()
    missing = sorted(original_names.get(k, k) for k in set(expected) - set(state_dict) - set(optional))
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


# ------------------------------------------------------------------------------------------- saved folders
class IncompleteFolderError(ValueError):
    """A saved model / pipeline folder lacks a file, or holds one that cannot be read."""


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; a missing, unreadable or corrupt file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise IncompleteFolderError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IncompleteFolderError(f"{path} is not a readable {what} ({error})") from None
    if not isinstance(data, dict):
        raise IncompleteFolderError(f"{path} is not a {what}: it holds a JSON {type(data).__name__}, not an object")
    return data


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _variant_of(name: str, suffix: str) -> str | None:
    """The variant in a weight or index file name (``model.fp16.safetensors``, ``x.safetensors.index.fp16.json``,
    ``x-00001-of-00002.fp16.safetensors``); ``None`` for the default weights."""
    if name.endswith(f"{suffix}.index.json"):
        return None
    marker = f"{suffix}.index."
    if marker in name and name.endswith(".json"):
        return name[name.index(marker) + len(marker): -len(".json")]
    stem = name[: -len(suffix)]
    return stem.rsplit(".", 1)[1] if "." in stem else None


def weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder for ``variant`` (``None``: the default weights): one
    ``*.safetensors`` (else pickled ``*.bin``) file, or the shards its index lists (each checked to exist)."""
    folder = Path(folder)
    for suffix in WEIGHT_SUFFIXES:
        indexes = sorted(f for f in folder.glob(f"*{suffix}.index*.json") if _variant_of(f.name, suffix) == variant)
        if indexes:
            weight_map = read_json_file(indexes[0], "weights index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise IncompleteFolderError(f"{indexes[0]} has no weight_map")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise IncompleteFolderError(f"{file} is missing (listed in {indexes[0].name})")
            return files
        files = sorted(f for f in folder.glob(f"*{suffix}") if _variant_of(f.name, suffix) == variant)
        if files:
            return files
    if variant is not None:
        raise IncompleteFolderError(f"{folder} holds no weights for variant={variant} (*.{variant}.safetensors or .bin)")
    raise IncompleteFolderError(f"{folder} holds no weights file (*.safetensors or *.bin)")


def weight_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor's name → an empty meta tensor of its shape; safetensors from the headers only, pickled ``.bin``
    files through ``torch.load(weights_only=True, mmap=True)``; a truncated or corrupt file raises naming it."""
    from safetensors import safe_open

    shapes: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".bin":
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
                shapes.update({key: torch.empty(value.shape, device="meta") for key, value in state.items()})
                continue
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = torch.empty(handle.get_slice(key).get_shape(), device="meta")
        except Exception as error:  # safetensors' SafetensorError (truncated, bad header) is a bare Exception
            kind = "pickled weights" if file.suffix == ".bin" else "safetensors"
            raise IncompleteFolderError(f"{file} is not a readable {kind} file ({error})") from None
    return shapes


def tied_parameter_names(module: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied weights: saved once)."""
    every = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in module.named_parameters()}


def check_weights_folder(folder: str | os.PathLike, module: nn.Module, variant: str | None = None) -> None:
    """Strict check of a component folder's safetensors against ``module`` (built on the meta device from the
    folder's config): missing, unexpected and mis-shaped tensors raise :class:`CheckpointKeyError` naming the file
    and the keys — transformers would only log a missing tensor and initialise it at random."""
    files = weight_files(folder, variant)
    label = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    check_state_dict(module, weight_shapes(files), label, optional=tied_parameter_names(module))


def _component_class(folder: Path, library: str, class_name: str) -> type:
    import importlib

    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as error:
        raise IncompleteFolderError(f"{folder}: cannot import its class {library}.{class_name} ({error})") from None


def _meta_module(folder: Path, component_class: type) -> nn.Module:
    """``component_class`` (a transformers or diffusers model) built from ``folder``'s config on the meta device:
    no memory, no weights."""
    from transformers import AutoConfig, PreTrainedModel

    config_file = folder / "config.json"
    read_json_file(config_file, "model config")  # missing or corrupt: named here, not deep inside a library
    try:
        with torch.device("meta"):
            if issubclass(component_class, PreTrainedModel):
                return component_class(AutoConfig.from_pretrained(str(folder)))
            return component_class.from_config(component_class.load_config(str(folder)))
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise IncompleteFolderError(f"{config_file} does not describe a {component_class.__name__} ({error})") from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def check_component_folder(
    folder: Path, component_class: type, build: Callable[[Path], nn.Module] | None = None, variant: str | None = None
) -> None:
    """One component folder of a pipeline: every JSON file in it readable; a tokenizer or processor has its
    ``tokenizer_config.json`` and vocabulary (:data:`TOKENIZER_FILES`); a scheduler its ``scheduler_config.json``;
    a model (transformers / diffusers, or what ``build`` returns) exactly the tensors its config builds."""
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

    for json_file in sorted(folder.glob("*.json")):
        read_json_file(json_file, "JSON file")
    if issubclass(component_class, (PreTrainedTokenizerBase, ProcessorMixin)):
        read_json_file(folder / "tokenizer_config.json", "tokenizer config")
        if not any((folder / file).is_file() for file in TOKENIZER_FILES):
            raise IncompleteFolderError(f"{folder} holds no vocabulary (none of {', '.join(TOKENIZER_FILES)})")
    elif issubclass(component_class, SchedulerMixin):
        read_json_file(folder / "scheduler_config.json", "scheduler config")
    if build is not None:
        check_weights_folder(folder, build(folder), variant)
    elif issubclass(component_class, (PreTrainedModel, ModelMixin)):
        check_weights_folder(folder, _meta_module(folder, component_class), variant)


def check_pipeline_folder(
    path: str | os.PathLike,
    class_name: str,
    required: Sequence[str],
    build: Mapping[str, Callable[[Path], nn.Module]] | None = None,
    variant: str | None = None,
) -> None:
    """Check a ``save_pretrained`` pipeline folder (the weights of ``variant``, as ``from_pretrained(variant=)``
    reads them) before anything is loaded from it.

    ``model_index.json`` must be readable and name ``class_name`` and every ``required`` component as
    ``[library, class]``; each component folder must exist and pass :func:`check_component_folder` (a model
    component built by ``build[name](folder)`` when given, else from the class ``model_index.json`` names).
    Errors name the file, the component and the keys."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise IncompleteFolderError(f"{path} is not a pipeline folder: model_index.json is missing")
    index = read_json_file(index_file, "pipeline index")
    found = index.get("_class_name")
    if isinstance(found, list) and found:  # ["module", "Class"]: diffusers' custom-class form
        found = found[-1]
    if found != class_name:
        raise IncompleteFolderError(f"{path} holds a {found!r} pipeline, not a {class_name}")
    build = build or {}
    for name in required:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise IncompleteFolderError(f"{index_file}: component {name!r} is missing or not [library, class]")
        folder = path / name
        if not folder.is_dir():
            raise IncompleteFolderError(f"{path} is not a complete {class_name}: {name}/ is missing")
        check_component_folder(folder, _component_class(folder, *entry), build.get(name), variant)

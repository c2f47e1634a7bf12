"""SigLIP family (Zhai et al. 2023) as an understanding encoder, on transformers' ``SiglipVisionModel``.

Features are the vision tower's last hidden state ``(B, (S/p)², hidden_size)`` (after its final LayerNorm); the
attention-pooling head is not built (Harmon's connector reads every patch). Preprocessing: resize to
``image_size``, mean = std = 0.5, i.e. the [-1, 1] pixels unchanged.

Registered: ``siglip-base-patch16-{224,256,384,512}`` (the paper's decoupled baseline is SigLIP-Base-Patch16 at
256 px), ``siglip-large-patch16-{256,384}``, ``siglip-so400m-patch14-{224,384}``, ``siglip`` (generic, base
defaults) and ``siglip-tiny`` (tests). A preset gives random weights; ``ENCODERS.create(name,
pretrained="<folder>")`` builds it, then loads (:meth:`SiglipEncoder.load_pretrained`) a local transformers folder
(a full ``SiglipModel`` as released, or a ``SiglipVisionModel``) with ``SiglipVisionModel.from_pretrained``,
strictly: the folder's architecture must equal the preset's, and any weight that is missing, or that is neither
vision tower nor deliberately ignored (text tower, ``logit_scale`` / ``logit_bias``, pooling head), is named in a
:class:`~harmon.checkpoints.CheckpointKeyError`. A hub id is tried only when the hub can be reached; offline it
fails at once, saying how to get a local folder.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, Strict, model_validator
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.utils import logging as transformers_logging

from harmon.checkpoints import CheckpointKeyError, check_state_dict
from harmon.encoders.common import (
    IDENTITY_MEAN_STD,
    ConfiguredPixelPreprocessing,
    fail_fast_for_hub_id,
    module_dtype,
)
from harmon.registry import ENCODERS

# tensors of a released SiglipModel that a vision-features encoder does not use, dropped on purpose
IGNORED_SIGLIP_PREFIXES = ("text_model.", "logit_scale", "logit_bias", "head.", "vision_model.head.")
# fields that must agree between a preset and the folder it loads
ARCHITECTURE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    "hidden_act", "num_channels",
)


class SiglipEncoderConfig(BaseModel):
    """SigLIP vision-tower architecture (transformers ``SiglipVisionConfig`` fields) and preprocessing."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    hidden_size: PositiveInt = 768
    intermediate_size: PositiveInt = 3072
    num_hidden_layers: PositiveInt = 12
    num_attention_heads: PositiveInt = 12
    patch_size: PositiveInt = 16
    image_size: PositiveInt = 256
    num_channels: PositiveInt = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = Field(1e-6, gt=0)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    image_mean: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD
    image_std: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD

    @model_validator(mode="after")
    def _check(self) -> SiglipEncoderConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size < self.patch_size:  # a remainder is fine: 384 px at patch 14 gives 27 × 27 patches
            raise ValueError(f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size})")
        return self

    def to_transformers(self) -> SiglipVisionConfig:
        fields = self.model_dump(exclude={"image_mean", "image_std"})
        return SiglipVisionConfig(**fields, vision_use_head=False)


_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=16)
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    "siglip": {},  # generic: SigLIP-Base-Patch16-256 defaults, every field overridable
    "siglip-base-patch16-224": dict(_BASE, image_size=224),
    "siglip-base-patch16-256": dict(_BASE, image_size=256),
    "siglip-base-patch16-384": dict(_BASE, image_size=384),
    "siglip-base-patch16-512": dict(_BASE, image_size=512),
    "siglip-large-patch16-256": dict(_LARGE, image_size=256),
    "siglip-large-patch16-384": dict(_LARGE, image_size=384),
    "siglip-so400m-patch14-224": dict(_SO400M, image_size=224),
    "siglip-so400m-patch14-384": dict(_SO400M, image_size=384),
    "siglip-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        patch_size=16, image_size=64),
}


def _vision_key(key: str) -> str | None:
    """A released SigLIP key → the ``SiglipVisionModel`` key, ``None`` for a tensor ignored on purpose."""
    if key.startswith(IGNORED_SIGLIP_PREFIXES):
        return None
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


def convert_siglip_state_dict(state_dict: dict[str, Tensor], config: SiglipEncoderConfig) -> dict[str, Tensor]:
    """A released SigLIP state dict (``SiglipModel``: ``vision_model.*`` + ``text_model.*`` + ``logit_*``; or a
    ``SiglipVisionModel``) → the state dict of ``SiglipVisionModel(config.to_transformers())``. Strict: missing,
    unexpected and mis-shaped tensors raise :class:`CheckpointKeyError` naming them (by their original name)."""
    converted: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new = _vision_key(key)
        if new is not None:
            converted[new], names[new] = tensor, key
    with torch.device("meta"):
        reference = SiglipVisionModel(config.to_transformers())
    check_state_dict(reference, converted, "SigLIP checkpoint", names)
    return converted


def load_siglip_vision_model(name_or_folder: str | os.PathLike, config: SiglipEncoderConfig) -> SiglipVisionModel:
    """``SiglipVisionModel.from_pretrained`` on a local folder (or a reachable hub id), checked strictly against
    ``config`` (module docstring)."""
    name = str(name_or_folder)
    if not os.path.isdir(name):
        fail_fast_for_hub_id(
            name, "siglip pretrained",
            "Download it first (e.g. `hf download google/siglip-base-patch16-256 --local-dir siglip-b16-256`) and "
            "pass that folder as pretrained=...",
        )
    folder_config = SiglipVisionConfig.from_pretrained(name)
    mismatched = [
        f"{field} {getattr(config, field)!r} (the folder has {getattr(folder_config, field)!r})"
        for field in ARCHITECTURE_FIELDS
        if getattr(folder_config, field) != getattr(config, field)
    ]
    if mismatched:
        raise ValueError(
            f"siglip pretrained: {name} does not have the configured architecture: {'; '.join(mismatched)}; "
            "use the matching siglip-* preset or override these fields"
        )
    # transformers' own load report would list the deliberately dropped text tower as a problem: quiet it, and
    # judge the loading info here instead
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = SiglipVisionModel.from_pretrained(
            name, config=config.to_transformers(), output_loading_info=True, dtype=torch.float32
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    unexpected = sorted(k for k in info["unexpected_keys"] if _vision_key(k) is not None)
    problems = [
        f"{label}: {', '.join(sorted(keys))}"
        for label, keys in (
            ("missing keys", info["missing_keys"]),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", [str(k) for k in info.get("mismatched_keys", ())]),
        )
        if keys
    ]
    if problems:
        raise CheckpointKeyError(f"{name} does not fit SiglipVisionModel: " + "; ".join(problems))
    return model.eval()


class SiglipEncoder(ConfiguredPixelPreprocessing, nn.Module):
    """Pixels → SigLIP patch features ``(B, (image_size / patch_size)², hidden_size)``; ``.model`` is the
    transformers ``SiglipVisionModel``."""

    config_class = SiglipEncoderConfig

    def __init__(self, config: SiglipEncoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = config if config is not None else SiglipEncoderConfig(**kwargs)
        self.config = config
        self.model = SiglipVisionModel(config.to_transformers())  # random: weights are loaded after building

    def load_pretrained(self, folder: str | os.PathLike) -> None:
        """Load a released transformers folder (or a reachable hub id) into the built model, strictly
        (:func:`load_siglip_vision_model`: the folder's architecture must be this config's)."""
        self.model.load_state_dict(load_siglip_vision_model(folder, self.config).state_dict(), strict=True)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, preset: str = "siglip", **overrides: Any) -> "SiglipEncoder":
        """An encoder whose architecture is read from ``folder``'s config, with its weights."""
        vision = SiglipVisionConfig.from_pretrained(str(folder)) if os.path.isdir(folder) else None
        fields = {f: getattr(vision, f) for f in ARCHITECTURE_FIELDS} if vision is not None else {}
        return ENCODERS.create(preset, pretrained=str(folder), **{**fields, **overrides})

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def encode(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → last hidden state ``(B, (S/p)², hidden_size)``."""
        return self.model(pixel_values=pixels.to(module_dtype(self))).last_hidden_state


for _name, _preset in SIGLIP_PRESETS.items():
    ENCODERS.add(_name, SiglipEncoder, **_preset)

__all__ = [
    "IGNORED_SIGLIP_PREFIXES",
    "SiglipEncoder",
    "SiglipEncoderConfig",
    "convert_siglip_state_dict",
    "load_siglip_vision_model",
]

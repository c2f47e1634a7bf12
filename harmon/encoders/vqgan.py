"""VQGAN family (taming-transformers, Esser et al. 2021) as an understanding encoder, on diffusers' ``VQModel``.

Features are the *quantized* latents: pixels → encoder → ``quant_conv`` → nearest codebook entries, as
``(B, m·n, embed_dim)`` with ``m = n = image_size / 16``. Registered as ``vqgan-f16`` (taming's ImageNet f16 model:
``ch=128, ch_mult=(1, 1, 2, 2, 4)``, two ResNet blocks per level, attention at nominal resolution 16,
``z_channels = embed_dim = 256``, 16384 codes) and ``vqgan-f16-1024`` (1024 codes).

The taming layout maps onto stock diffusers parts: the level at nominal resolution 16 is an
``AttnDownEncoderBlock2D`` in the encoder and, unlike MAR's KL VAE, an ``AttnUpDecoderBlock2D`` in the decoder
(taming's decoder also attends inside that level); the codebook is ``quantize.embedding.weight`` in both layouts.
The converter reuses the LDM name routing of :mod:`harmon.encoders.vae` (one tensor at a time, strict); a taming
training checkpoint's ``loss.*`` tensors (LPIPS and the discriminator) are dropped on purpose.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import torch
from diffusers import VQModel
from einops import rearrange
from pydantic import BaseModel, ConfigDict, PositiveInt, Strict, model_validator
from torch import Tensor, nn

from harmon.checkpoints import read_state_dict
from harmon.encoders.common import (
    IDENTITY_MEAN_STD,
    ConfiguredPixelPreprocessing,
    module_dtype,
)
from harmon.encoders.vae import (
    convert_autoencoder_state_dict_to_ldm,
    convert_ldm_autoencoder_state_dict,
    ldm_attention_levels,
)
from harmon.registry import ENCODERS

_NORM_NUM_GROUPS = 32
# taming names outside the VAE name table diffusers ships (same name in both layouts)
_VQ_NAMES = {"quantize.embedding.weight": "quantize.embedding.weight"}
# taming training checkpoints also hold the loss module: LPIPS (loss.perceptual_loss.*) and the discriminator
IGNORED_TAMING_PREFIXES = ("loss.",)


class VQGANEncoderConfig(BaseModel):
    """A taming VQGAN's ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``resolution``, ``z_channels``), ``embed_dim`` and ``n_embed``, plus its use as an understanding encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    ch: PositiveInt = 128
    ch_mult: Annotated[tuple[PositiveInt, ...], Strict(False)] = (1, 1, 2, 2, 4)
    num_res_blocks: PositiveInt = 2
    attn_resolutions: Annotated[tuple[PositiveInt, ...], Strict(False)] = (16,)
    resolution: PositiveInt = 256
    z_channels: PositiveInt = 256
    embed_dim: PositiveInt = 256
    n_embed: PositiveInt = 16384
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    image_size: PositiveInt = 256
    image_mean: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD  # taming reads [-1, 1] pixels
    image_std: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD

    @model_validator(mode="after")
    def _check(self) -> VQGANEncoderConfig:
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % _NORM_NUM_GROUPS]
        if bad:
            raise ValueError(f"level widths ch*ch_mult must be multiples of {_NORM_NUM_GROUPS} (GroupNorm); got {bad}")
        if self.image_size % self.stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VQGAN stride {self.stride}")
        return self

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def stride(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return ldm_attention_levels(self.resolution, self.num_levels, self.attn_resolutions)


VQGAN_PRESETS: dict[str, dict[str, Any]] = {
    "vqgan-f16": {},  # taming vqgan_imagenet_f16_16384
    "vqgan-f16-1024": dict(n_embed=1024),  # taming vqgan_imagenet_f16_1024
}


def build_vqgan(config: VQGANEncoderConfig) -> VQModel:
    """An (untrained) diffusers ``VQModel`` with the architecture of the taming VQGAN ``config``."""
    attn = set(config.attention_levels)
    levels = range(config.num_levels)
    return VQModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if lv in attn else "DownEncoderBlock2D" for lv in levels),
        # diffusers' up_blocks run from the lowest resolution: up_blocks[i] is taming's decoder.up[L-1-i]
        up_block_types=tuple(
            "AttnUpDecoderBlock2D" if config.num_levels - 1 - i in attn else "UpDecoderBlock2D" for i in levels
        ),
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        act_fn="silu",
        latent_channels=config.z_channels,
        sample_size=config.resolution,
        num_vq_embeddings=config.n_embed,
        norm_num_groups=_NORM_NUM_GROUPS,
        vq_embed_dim=config.embed_dim,
        scaling_factor=1.0,
    )


def convert_taming_vqgan_state_dict(state_dict: dict[str, Tensor], config: VQGANEncoderConfig) -> dict[str, Tensor]:
    """taming-transformers VQGAN layout (``encoder.*``, ``decoder.*``, ``quant_conv``, ``quantize.embedding``,
    ``post_quant_conv``; ``loss.*`` ignored) → ``build_vqgan(config)`` state_dict. Strict: every missing,
    unexpected or mis-shaped tensor raises :class:`~harmon.checkpoints.CheckpointKeyError` naming it."""
    with torch.device("meta"):
        reference = build_vqgan(config).state_dict()
    return convert_ldm_autoencoder_state_dict(
        state_dict, reference, config.num_levels, what="the VQGAN config", extra_names=_VQ_NAMES,
        ignored_prefixes=IGNORED_TAMING_PREFIXES,
    )


def convert_vqgan_state_dict_to_taming(state_dict: dict[str, Tensor], config: VQGANEncoderConfig) -> dict[str, Tensor]:
    """Inverse of :func:`convert_taming_vqgan_state_dict` (export in the taming layout)."""
    return convert_autoencoder_state_dict_to_ldm(state_dict, config.num_levels, _VQ_NAMES)


def load_taming_vqgan_checkpoint(path: str | os.PathLike[str], config: VQGANEncoderConfig) -> VQModel:
    """Build the ``VQModel`` for ``config`` and load a taming checkpoint (``{'state_dict': …}`` or bare)."""
    model = build_vqgan(config)
    model.load_state_dict(convert_taming_vqgan_state_dict(read_state_dict(path), config), strict=True)
    return model.eval()


class VQGANEncoder(ConfiguredPixelPreprocessing, nn.Module):
    """Pixels → quantized VQGAN latents ``(B, m·n, embed_dim)`` (the codebook vectors; gradients pass straight
    through the quantizer). The whole diffusers ``VQModel`` is kept as ``.vqgan`` (decoder included), so a taming
    checkpoint loads strictly."""

    config_class = VQGANEncoderConfig

    def __init__(self, config: VQGANEncoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = config if config is not None else VQGANEncoderConfig(**kwargs)
        self.config = config
        self.vqgan = build_vqgan(config)  # random: weights are loaded after building

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a taming checkpoint (``{'state_dict': …}`` or bare; ``loss.*`` ignored) into the built model,
        strictly (:func:`convert_taming_vqgan_state_dict` names bad keys)."""
        self.vqgan.load_state_dict(convert_taming_vqgan_state_dict(read_state_dict(path), self.config), strict=True)

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    def encode(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → ``(B, (S/16)², embed_dim)``: exactly the chosen codebook vectors
        (diffusers' ``z + (z_q - z).detach()`` is off by round-off), with a straight-through gradient to ``z``."""
        latents = self.vqgan.encode(pixels.to(module_dtype(self))).latents  # encoder + quant_conv
        z = rearrange(latents, "b c m n -> b (m n) c")
        codes = self.vqgan.quantize.embedding(self._indices(latents))
        return codes + (z - z.detach())

    def code_indices(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels → codebook indices ``(B, m·n)``."""
        return self._indices(self.vqgan.encode(pixels.to(module_dtype(self))).latents)

    def _indices(self, latents: Tensor) -> Tensor:
        return self.vqgan.quantize(latents)[2][2].reshape(latents.shape[0], -1)  # nearest code per latent cell


for _name, _preset in VQGAN_PRESETS.items():
    ENCODERS.add(_name, VQGANEncoder, **_preset)

__all__ = [
    "IGNORED_TAMING_PREFIXES",
    "VQGANEncoder",
    "VQGANEncoderConfig",
    "build_vqgan",
    "convert_taming_vqgan_state_dict",
    "convert_vqgan_state_dict_to_taming",
    "load_taming_vqgan_checkpoint",
]

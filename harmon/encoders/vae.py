"""The KL-16 image tokenizer of Harmon, as a ``diffusers.AutoencoderKL``.

Harmon (arXiv 2503.21979) encodes images with the continuous KL autoencoder that MAR released as ``kl16.ckpt``:
an LDM-style ("taming"/latent-diffusion ``AutoencoderKL``) VAE with a 16-channel latent at stride 16
(``ch_mult=(1, 1, 2, 2, 4)``, ``ch=128``, two ResNet blocks per level). Its one departure from the autoencoder
diffusers builds for Stable Diffusion is attention *inside an encoder level*: the encoder level whose nominal
resolution is listed in ``attn_resolutions`` (16 for ``resolution=256``, i.e. the last level) runs a single-head
self-attention block after each of its ResNet blocks. The decoder has attention only in its mid block.

Everything here maps onto stock diffusers parts: that encoder level is an ``AttnDownEncoderBlock2D`` (which
diffusers' ``Encoder`` builds through ``get_down_block`` with one head of ``attention_head_dim=channels`` and
``downsample_padding=0``, the LDM ``(0, 1, 0, 1)`` pad + stride-2 conv), the other levels are
``DownEncoderBlock2D`` and the decoder levels ``UpDecoderBlock2D``.

``scaling_factor`` is 1.0: Harmon multiplies the posterior mode by its own ``vae_scale`` (0.2325) outside the VAE.

The checkpoint converter reuses diffusers' LDM -> diffusers VAE renames (``diffusers.loaders.single_file_utils``:
the top-level name table and the resnet / attention helpers, which also turn the 1x1-conv q/k/v/proj_out weights
into linear weights) and routes each original key to them itself, so that encoder-level attention is covered and
every tensor is accounted for: a missing, unexpected or mis-shaped tensor raises :class:`CheckpointKeyError`
naming it. That routing is generic over LDM/taming-style autoencoders (:func:`convert_ldm_autoencoder_state_dict`);
the VQGAN family (:mod:`harmon.encoders.vqgan`) reuses it.

Registered encoder: ``vae-kl16`` (:class:`KLFeatureEncoder`), the VAE's posterior mode as understanding features
``(B, m·n, 16)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    update_vae_attentions_ldm_to_diffusers,
    update_vae_resnet_ldm_to_diffusers,
)
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, Strict, model_validator
from torch import Tensor, nn

from harmon.checkpoints import CheckpointKeyError, read_state_dict, summarise_names
from harmon.encoders.common import (
    IDENTITY_MEAN_STD,
    ConfiguredPixelPreprocessing,
    module_dtype,
)
from harmon.registry import ENCODERS

__all__ = [
    "CheckpointKeyError",
    "KLAutoencoderConfig",
    "KLFeatureEncoder",
    "KLFeatureEncoderConfig",
    "convert_autoencoder_state_dict_to_ldm",
    "convert_ldm_autoencoder_state_dict",
    "build_kl_autoencoder",
    "ldm_attention_levels",
    "convert_ldm_kl_state_dict",
    "convert_kl_state_dict_to_ldm",
    "load_ldm_kl_checkpoint",
]

_NORM_NUM_GROUPS = 32


class KLAutoencoderConfig(BaseModel):
    """Architecture of the LDM-style KL autoencoder (defaults: MAR's released ``kl16``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    embed_dim: PositiveInt = 16
    ch: PositiveInt = 128
    ch_mult: Annotated[tuple[PositiveInt, ...], Strict(False)] = (1, 1, 2, 2, 4)
    num_res_blocks: PositiveInt = 2
    # Encoder levels whose nominal resolution (resolution // 2**level) is listed here get attention.
    attn_resolutions: Annotated[tuple[PositiveInt, ...], Strict(False)] = (16,)
    resolution: PositiveInt = 256
    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    # GroupNorm groups (LDM: 32). Fewer groups for narrow VAEs: at 32 channels 32 groups normalise every channel
    # over the image on its own (instance norm), which loses flat colours (harmon-toy uses 8)
    norm_num_groups: PositiveInt = _NORM_NUM_GROUPS

    @model_validator(mode="after")
    def _check_widths(self) -> KLAutoencoderConfig:
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one level")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"level widths ch*ch_mult must be multiples of norm_num_groups {self.norm_num_groups} (GroupNorm); "
                f"got {bad}"
            )
        return self

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Encoder levels with attention, as the LDM encoder decides it (nominal resolution halves per level)."""
        return ldm_attention_levels(self.resolution, self.num_levels, self.attn_resolutions)

    @classmethod
    def from_original(cls, d: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> KLAutoencoderConfig:
        """From the original config's ``vae`` dict: the original ``AutoencoderKL`` arguments (``embed_dim``,
        ``ch_mult`` required; see :class:`harmon.original_config.OriginalVAEConfig`). Sizes the dict does not state
        (``ch``, ``num_res_blocks``) come from ``state_dict`` (the LDM-layout checkpoint) when given."""
        from harmon.original_config import OriginalVAEConfig, kl_autoencoder_fields

        return cls(**kl_autoencoder_fields(OriginalVAEConfig.model_validate(d), state_dict))


def ldm_attention_levels(resolution: int, num_levels: int, attn_resolutions: tuple[int, ...]) -> tuple[int, ...]:
    """Levels (LDM numbering, highest resolution = 0) whose nominal resolution ``resolution // 2**level`` is
    listed in ``attn_resolutions``: where the LDM/taming encoder (and the taming decoder) put attention."""
    return tuple(level for level in range(num_levels) if resolution // 2**level in attn_resolutions)


def build_kl_autoencoder(config: KLAutoencoderConfig) -> AutoencoderKL:
    """An (untrained) ``diffusers.AutoencoderKL`` with the architecture of ``config``."""
    attn = set(config.attention_levels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple(
            "AttnDownEncoderBlock2D" if level in attn else "DownEncoderBlock2D" for level in range(config.num_levels)
        ),
        up_block_types=("UpDecoderBlock2D",) * config.num_levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.num_res_blocks,
        act_fn="silu",
        latent_channels=config.embed_dim,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution,
        scaling_factor=1.0,
    )


# LDM -> diffusers names, one tensor at a time. The renames inside a resnet (nin_shortcut -> conv_shortcut) and an
# attention block (norm/q/k/v/proj_out -> group_norm/to_q/to_k/to_v/to_out.0, 1x1 conv -> linear weights) and the
# top-level names are diffusers' own. diffusers' whole-dict convert_ldm_vae_checkpoint does not fit: it has no
# encoder-level attention (it passes those keys through unrenamed), silently drops names it does not know, and
# cannot say which original name produced which output; so the routing below (which module a key belongs to, the
# down/upsample conv names and the reversed decoder level order, as that function does them) is written here.
_LDM_TO_DIFFUSERS_TOP = {ldm: new for new, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
_LDM_MID = re.compile(r"(encoder|decoder)\.mid\.(block|attn)_(\d+)\.")
_LDM_LEVEL = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.\d+\.")
_LDM_RESAMPLE = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.([^.]+)")


def _ldm_key_to_diffusers(
    key: str, tensor: Tensor, num_levels: int, extra_names: Mapping[str, str] | None = None
) -> tuple[str, Tensor] | None:
    """Convert ONE original-layout tensor; ``None`` when the name fits no module of the layout. ``extra_names``
    (original -> diffusers) adds top-level names of other LDM-style autoencoders (e.g. a VQ codebook)."""
    if extra_names and key in extra_names:
        return extra_names[key], tensor
    if key in _LDM_TO_DIFFUSERS_TOP:
        return _LDM_TO_DIFFUSERS_TOP[key], tensor
    mapping = None
    if m := _LDM_MID.match(key):
        part, kind, idx = m.groups()
        new = "resnets" if kind == "block" else "attentions"
        mapping = {"old": f"{part}.mid.{kind}_{idx}", "new": f"{part}.mid_block.{new}.{int(idx) - 1}"}
    elif m := _LDM_LEVEL.match(key):
        stage, level, kind = m.groups()
        # decoder: LDM up.L counts from the highest resolution, diffusers up_blocks[i] in the order applied
        idx = int(level) if stage == "encoder.down" else num_levels - 1 - int(level)
        new = f"{stage}_blocks.{idx}.{'resnets' if kind == 'block' else 'attentions'}"
        mapping = {"old": f"{stage}.{level}.{kind}", "new": new}
    elif m := _LDM_RESAMPLE.fullmatch(key):
        stage, level, kind, param = m.groups()
        idx = int(level) if stage == "encoder.down" else num_levels - 1 - int(level)
        return f"{stage}_blocks.{idx}.{'downsamplers' if kind == 'downsample' else 'upsamplers'}.0.conv.{param}", tensor
    if mapping is None:
        return None
    out: dict[str, Tensor] = {}
    helper = update_vae_attentions_ldm_to_diffusers if ".attn" in mapping["old"] else update_vae_resnet_ldm_to_diffusers
    helper([key], out, {key: tensor}, mapping=mapping)
    (item,) = out.items()
    return item


# Hand-written inverse (diffusers -> original names): diffusers ships only the forward VAE mapping (its
# DIFFUSERS_TO_LDM_MAPPING covers the top-level convs and norms only). Used to name missing tensors in error
# messages and to export a model in the original layout; every name it produces is checked against the forward
# mapping above.
_LEVEL_PART = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_MID_PART = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_ATTN_LEAF = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _attn_leaf(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_ATTN_LEAF.get(module, module)}.{param}"


def _diffusers_key_to_ldm(key: str, num_levels: int, extra_names: Mapping[str, str] | None = None) -> str | None:
    """The original name of a diffusers key (``None`` if unknown), verified by converting it back."""
    ldm = _diffusers_key_to_ldm_unchecked(key, num_levels, extra_names)
    if ldm is None:
        return None
    back = _ldm_key_to_diffusers(ldm, torch.empty(0), num_levels, extra_names)
    return ldm if back is not None and back[0] == key else None


def _diffusers_key_to_ldm_unchecked(key: str, num_levels: int, extra_names: Mapping[str, str] | None = None) -> str | None:
    for original, new in (extra_names or {}).items():
        if new == key:
            return original
    top = DIFFUSERS_TO_LDM_MAPPING["vae"].get(key)
    if top is not None:
        return top
    m = _MID_PART.fullmatch(key)
    if m:
        part, kind, idx, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(idx) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.mid.attn_{int(idx) + 1}.{_attn_leaf(rest)}"
    m = _LEVEL_PART.fullmatch(key)
    if m:
        part, _, level, kind, idx, rest = m.groups()
        if part == "decoder":
            level = str(num_levels - 1 - int(level))
            stage = "up"
        else:
            stage = "down"
        if kind == "resnets":
            return f"{part}.{stage}.{level}.block.{idx}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        if kind == "attentions":
            return f"{part}.{stage}.{level}.attn.{idx}.{_attn_leaf(rest)}"
        return f"{part}.{stage}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    return None


def convert_ldm_autoencoder_state_dict(
    state_dict: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    num_levels: int,
    *,
    what: str,
    extra_names: Mapping[str, str] | None = None,
    ignored_prefixes: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """Strict original LDM/taming layout -> diffusers autoencoder state_dict, for any autoencoder whose diffusers
    ``state_dict`` is ``reference`` (shapes only; meta tensors do) and that has ``num_levels`` resolution levels.

    ``extra_names`` (original -> diffusers) covers top-level tensors outside the KL VAE's table (the VQ codebook);
    original keys starting with one of ``ignored_prefixes`` are dropped on purpose (a VQGAN's ``loss.*``:
    discriminator and perceptual-loss weights). Raises :class:`CheckpointKeyError` naming every missing (diffusers
    name, with its original name), unexpected (original name), duplicated or mis-shaped tensor (original name).
    Values are the input tensors (attention weights as ``[:, :, 0, 0]`` views), not copies.
    """
    converted: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    unexpected: list[str] = []
    duplicated: list[str] = []
    for key, tensor in state_dict.items():
        if ignored_prefixes and key.startswith(ignored_prefixes):
            continue
        out = _ldm_key_to_diffusers(key, tensor, num_levels, extra_names)
        if out is None or out[0] not in reference:
            unexpected.append(key)
            continue
        new_key, new_tensor = out
        if new_key in converted:
            duplicated.append(f"{key} (same target as {source[new_key]})")
            continue
        converted[new_key], source[new_key] = new_tensor, key

    missing = []
    for key in reference:
        if key not in converted:
            ldm = _diffusers_key_to_ldm(key, num_levels, extra_names)
            missing.append(f"{ldm} (diffusers: {key})" if ldm else key)
    misshaped = [
        f"{source[k]}: {tuple(v.shape)}, expected {tuple(reference[k].shape)}"
        for k, v in converted.items()
        if tuple(v.shape) != tuple(reference[k].shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {summarise_names(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("duplicated", duplicated),
            ("mis-shaped", misshaped),
        )
        if keys
    ]
    if problems:
        raise CheckpointKeyError(f"checkpoint does not match {what}: " + "; ".join(problems))
    return {k: converted[k] for k in reference}


def convert_autoencoder_state_dict_to_ldm(
    state_dict: Mapping[str, Tensor], num_levels: int, extra_names: Mapping[str, str] | None = None
) -> dict[str, Tensor]:
    """Inverse of :func:`convert_ldm_autoencoder_state_dict` (diffusers -> original LDM/taming names)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        ldm = _diffusers_key_to_ldm(key, num_levels, extra_names)
        if ldm is None:
            raise CheckpointKeyError(f"no original-layout name for {key}")
        is_attn_linear = tensor.ndim == 2 and re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", key)
        out[ldm] = tensor[:, :, None, None] if is_attn_linear else tensor  # linear -> 1x1 conv weights
    return out


def convert_ldm_kl_state_dict(state_dict: dict[str, Tensor], config: KLAutoencoderConfig) -> dict[str, Tensor]:
    """Original LDM/MAR layout (``kl16.ckpt``'s ``'model'``) -> ``build_kl_autoencoder(config)`` state_dict.

    Strict: raises :class:`CheckpointKeyError` listing every missing (diffusers name, with its original name),
    unexpected (original name) or mis-shaped tensor (original name). Values are the input tensors (attention
    weights as ``[:, :, 0, 0]`` views), not copies.
    """
    with torch.device("meta"):
        reference = build_kl_autoencoder(config).state_dict()
    return convert_ldm_autoencoder_state_dict(
        state_dict, reference, config.num_levels, what="the KL autoencoder config"
    )


def convert_kl_state_dict_to_ldm(state_dict: dict[str, Tensor], config: KLAutoencoderConfig) -> dict[str, Tensor]:
    """Inverse of :func:`convert_ldm_kl_state_dict` (e.g. to export a model as ``{'model': ...}``)."""
    return convert_autoencoder_state_dict_to_ldm(state_dict, config.num_levels)


def load_ldm_kl_checkpoint(path: str | os.PathLike[str], config: KLAutoencoderConfig) -> AutoencoderKL:
    """Build the autoencoder for ``config`` and load an original-layout checkpoint (``kl16.ckpt``), in eval mode.

    Accepts ``{'model': state_dict}`` (MAR's release), ``{'state_dict': state_dict}`` or a bare state_dict.
    """
    ckpt = read_state_dict(path)
    model = build_kl_autoencoder(config)
    model.load_state_dict(convert_ldm_kl_state_dict(ckpt, config), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The KL VAE as an understanding encoder ("vae-kl16"): features = the posterior mode, one token per latent cell.
class KLFeatureEncoderConfig(KLAutoencoderConfig):
    """The KL autoencoder's architecture (defaults: MAR's ``kl16``) plus its use as an understanding encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    image_size: PositiveInt = 256
    scale: float = Field(1.0, gt=0)  # features = posterior mode × scale (Harmon's tokens use 0.2325)
    image_mean: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD
    image_std: Annotated[tuple[float, float, float], Strict(False)] = IDENTITY_MEAN_STD

    @model_validator(mode="after")
    def _image_fits_the_stride(self) -> KLFeatureEncoderConfig:
        stride = 2 ** (self.num_levels - 1)
        if self.image_size % stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE stride {stride}")
        return self

    def autoencoder(self) -> KLAutoencoderConfig:
        return KLAutoencoderConfig(**self.model_dump(include=set(KLAutoencoderConfig.model_fields)))


class KLFeatureEncoder(ConfiguredPixelPreprocessing, nn.Module):
    """Pixels → the KL VAE's posterior mode × ``scale`` as features ``(B, m·n, embed_dim)`` (m = n =
    image_size / stride). The whole diffusers ``AutoencoderKL`` is kept (``.vae``), so ``kl16.ckpt`` loads
    strictly (:meth:`KLFeatureEncoder.load_pretrained`, after building)."""

    config_class = KLFeatureEncoderConfig

    def __init__(self, config: KLFeatureEncoderConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        config = config if config is not None else KLFeatureEncoderConfig(**kwargs)
        self.config = config
        self.vae = build_kl_autoencoder(config.autoencoder())  # random: weights are loaded after building

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load an original-layout checkpoint (``kl16.ckpt``) into the built autoencoder, strictly."""
        self.vae.load_state_dict(convert_ldm_kl_state_dict(read_state_dict(path), self.config.autoencoder()),
                                 strict=True)

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    def encode(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` → ``(B, (S/16)², embed_dim)``."""
        mode = self.vae.encode(pixels.to(module_dtype(self))).latent_dist.mode() * self.config.scale
        return rearrange(mode, "b c m n -> b (m n) c")


ENCODERS.add("vae-kl16", KLFeatureEncoder)

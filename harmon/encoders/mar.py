"""MAR encoder family: the masked-autoregressive encoder Harmon shares between understanding and generation.

Tokens ``(B, m·n, C)`` → ``z_proj`` (C → D) → ``K`` buffer slots in front, filled with the learned unconditional
``fake_latent`` → + learned position embedding (bilinearly resized for grids other than the one it was learned
on) → ``z_proj_ln`` → masked tokens dropped → timm ViT blocks → LayerNorm. Output ``(B, K + seen, D)``.

Registered as ``mar-b`` (D=768, 12 blocks, 12 heads: Harmon-0.5B), ``mar-h`` (D=1280, 20 blocks, 16 heads:
Harmon-1.5B) and ``mar-tiny`` (tests).

A MAR encoder is a *token* encoder: ``encode`` reads VAE tokens ``(B, m, n, C)``, not pixels. Used as Harmon's
understanding encoder it is either the generation encoder itself (shared, the paper's design) or, decoupled
(``HarmonConfig.understanding_encoder = mar-b``), a second MAR encoder with its own weights and ``proj_in``. In both
cases the model tokenises the pixels with its own frozen VAE (the same tokens generation is trained on):
the decoupled MAR encoder borrows the model's VAE instead of holding a second copy of it. Understanding runs it
with nothing masked and the buffer kept (``m·n + buffer_size`` embeddings).
:func:`load_original_mar_encoder` loads it from the original MAR/Harmon layout, strictly.
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import PositiveInt
from torch import nn

from harmon.layers import MARStackConfig, grid_position_embedding, init_mar_weights, masked_row_count, vit_blocks
from harmon.registry import ENCODERS


class MAREncoderConfig(MARStackConfig):
    """The MAR encoder: a ViT stack over ``token_dim``-channel latent tokens."""

    token_dim: PositiveInt = 16



MAR_ENCODER_PRESETS: dict[str, dict] = {
    "mar": {},  # generic: MAR-B defaults, every field overridable
    "mar-b": dict(embed_dim=768, depth=12, num_heads=12),
    "mar-h": dict(embed_dim=1280, depth=20, num_heads=16),
    "mar-tiny": dict(embed_dim=64, depth=2, num_heads=4, buffer_size=8, base_grid=(4, 4)),
}


class MAREncoder(nn.Module):
    """MAR encoder over latent tokens, with ``buffer_size`` leading buffer slots (see the module docstring)."""

    config_class = MAREncoderConfig

    def __init__(self, config: MAREncoderConfig | None = None, **kwargs) -> None:
        super().__init__()
        config = config if config is not None else MAREncoderConfig(**kwargs)
        self.config = config
        dim = config.embed_dim
        grid_len = config.base_grid[0] * config.base_grid[1]
        self.z_proj = nn.Linear(config.token_dim, dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, dim))
        self.z_proj_ln = nn.LayerNorm(dim, eps=config.norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.buffer_size + grid_len, dim))
        self.blocks = vit_blocks(
            dim, config.depth, config.num_heads, config.mlp_ratio, config.attn_dropout, config.proj_dropout,
            config.norm_eps,
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        init_mar_weights(self)
        nn.init.normal_(self.fake_latent, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def buffer_size(self) -> int:
        return self.config.buffer_size

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def position_embedding(self, image_shape: tuple[int, int]) -> torch.Tensor:
        return grid_position_embedding(self.pos_embed, self.buffer_size, self.config.base_grid, image_shape)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
        """tokens ``(B, m·n, C)``, mask ``(B, m·n)`` (1 = masked) → ``(B, K + seen, D)``."""
        batch, seq_len, _ = tokens.shape
        if seq_len != image_shape[0] * image_shape[1]:
            raise ValueError(f"{seq_len} tokens do not fill an image grid of {image_shape}")
        masked_row_count(mask)
        x = self.z_proj(tokens)
        buffer = self.fake_latent.to(x.dtype).expand(batch, self.buffer_size, -1)
        x = torch.cat([buffer, x], dim=1) + self.position_embedding(image_shape)
        x = self.z_proj_ln(x)
        keep = torch.cat([mask.new_zeros(batch, self.buffer_size), mask], dim=1) == 0
        x = x[keep].reshape(batch, -1, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Understanding path: tokens ``(B, m, n, C)``, nothing masked → ``(B, K + m·n, D)``."""
        batch, m, n, _ = tokens.shape
        flat = rearrange(tokens, "b m n c -> b (m n) c")
        return self(flat, flat.new_zeros(batch, m * n), (m, n))


for _name, _preset in MAR_ENCODER_PRESETS.items():
    ENCODERS.add(_name, MAREncoder, **_preset)


def convert_original_mar_encoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``MAR`` encoder keys (without the ``mar.`` prefix) → :class:`MAREncoder` keys."""
    renames = {
        "z_proj.": "z_proj.",
        "z_proj_ln.": "z_proj_ln.",
        "encoder_blocks.": "blocks.",
        "encoder_norm.": "norm.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "fake_latent":
            out["fake_latent"] = value
        elif key == "encoder_pos_embed_learned":
            out["pos_embed"] = value
        else:
            for old, new in renames.items():
                if key.startswith(old):
                    out[new + key[len(old):]] = value
                    break
            else:
                raise KeyError(key)
    return out


_ORIGINAL_ENCODER_NAMES = {"pos_embed": "encoder_pos_embed_learned", "blocks.": "encoder_blocks.", "norm.": "encoder_norm."}


def original_mar_encoder_name(key: str) -> str:
    """:class:`MAREncoder` key → its name in the original MAR model (inverse of :func:`convert_original_mar_encoder`)."""
    for new, old in _ORIGINAL_ENCODER_NAMES.items():
        if key == new or (new.endswith(".") and key.startswith(new)):
            return old + key[len(new):]
    return key


def load_original_mar_encoder(
    encoder: MAREncoder, state_dict: dict[str, torch.Tensor], prefix: str = "", source: str = "MAR checkpoint"
) -> None:
    """Load the original MAR encoder tensors (``z_proj``, ``z_proj_ln``, ``fake_latent``,
    ``encoder_pos_embed_learned``, ``encoder_blocks``, ``encoder_norm``; each name after ``prefix``, e.g.
    ``"mar."`` for a Harmon release) into ``encoder``, strictly: missing, unexpected and mis-shaped tensors raise
    :class:`~harmon.checkpoints.CheckpointKeyError` naming them by their original names.

    E.g. a decoupled MAR understanding encoder initialised from the released MAR weights. Hand-written: no library
    knows MAR's layout; the key renames are :func:`convert_original_mar_encoder`'s, applied one key at a time so
    that every problem is reported by its original name."""
    from harmon.checkpoints import CheckpointKeyError

    expected = encoder.state_dict()
    converted: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected, misshaped = [], []
    for key, value in state_dict.items():
        new_key = None
        if key.startswith(prefix):
            try:
                ((new_key, value),) = convert_original_mar_encoder({key[len(prefix):]: value}).items()
            except KeyError:  # a name of no encoder module
                new_key = None
        if new_key is None or new_key not in expected:
            unexpected.append(key)
            continue
        seen.add(new_key)
        if tuple(value.shape) != tuple(expected[new_key].shape):
            misshaped.append(f"{key} {tuple(value.shape)} (expected {tuple(expected[new_key].shape)})")
        else:
            converted[new_key] = value
    missing = [prefix + original_mar_encoder_name(k) for k in expected if k not in seen]
    problems = [f"{label}: {', '.join(sorted(keys))}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if keys]
    if problems:
        raise CheckpointKeyError(f"{source} does not fit MAREncoder: " + "; ".join(problems))
    encoder.load_state_dict(converted, strict=True)

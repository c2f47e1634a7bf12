"""MAR decoder family: per-token conditions for the diffusion head.

Encoder-side features ``(B, K + seen, D)`` → ``decoder_embed`` (D → D') → scattered back to their grid positions,
``mask_token`` at the masked ones (buffer slots kept in front) → + learned position embedding → timm ViT blocks →
LayerNorm → buffer dropped → + ``diffusion_pos_embed`` → ``(B, m·n, D')``.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import nn

from harmon.layers import (
    MARStackConfig,
    grid_position_embedding,
    init_mar_weights,
    masked_row_count,
    vit_block_at,
    vit_blocks,
)
from harmon.registry import DECODERS


class MARDecoderConfig(MARStackConfig):
    """The MAR decoder: a ViT stack over ``encoder_dim``-wide encoder features."""

    encoder_dim: PositiveInt = 768



MAR_DECODER_PRESETS: dict[str, dict] = {
    "mar": {},  # generic: MAR-B defaults, every field overridable
    "mar-b": dict(encoder_dim=768, embed_dim=768, depth=12, num_heads=12),
    "mar-h": dict(encoder_dim=1280, embed_dim=1280, depth=20, num_heads=16),
    "mar-tiny": dict(encoder_dim=64, embed_dim=64, depth=2, num_heads=4, buffer_size=8, base_grid=(4, 4)),
}


class MARDecoder(nn.Module):
    """MAR decoder (see the module docstring)."""

    config_class = MARDecoderConfig

    def __init__(self, config: MARDecoderConfig | None = None, **kwargs) -> None:
        super().__init__()
        config = config if config is not None else MARDecoderConfig(**kwargs)
        self.config = config
        dim = config.embed_dim
        grid_len = config.base_grid[0] * config.base_grid[1]
        self.decoder_embed = nn.Linear(config.encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.buffer_size + grid_len, dim))
        self.blocks = vit_blocks(
            dim, config.depth, config.num_heads, config.mlp_ratio, config.attn_dropout, config.proj_dropout,
            config.norm_eps,
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, grid_len, dim))
        init_mar_weights(self)
        for parameter in (self.mask_token, self.pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(parameter, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def buffer_size(self) -> int:
        return self.config.buffer_size

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        image_shape: tuple[int, int],
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``(B, K + seen, D)``, mask ``(B, m·n)`` → conditions ``(B, m·n, D')``.

        ``positions`` (bool ``(B, m·n)``): only the conditions at these grid positions are wanted; returns them
        as ``(N, D')`` in the order of ``conditions[positions]`` (what the sampler feeds the head), equal to it
        to float round-off. When every row asks for the same number of positions the last block runs at those
        positions only (:func:`~harmon.layers.vit_block_at`); otherwise the whole stack runs and is indexed."""
        batch, seq_len = mask.shape
        seen = seq_len - masked_row_count(mask)
        if x.shape[1] != self.buffer_size + seen:
            raise ValueError(
                f"decoder input has {x.shape[1]} positions, expected buffer {self.buffer_size} + {seen} seen tokens"
            )
        x = self.decoder_embed(x)
        keep = torch.cat([mask.new_zeros(batch, self.buffer_size), mask], dim=1) == 0
        full = self.mask_token.to(x.dtype).expand(batch, keep.shape[1], -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + grid_position_embedding(self.pos_embed, self.buffer_size, self.config.base_grid, image_shape)
        diffusion_pos = grid_position_embedding(self.diffusion_pos_embed, 0, self.config.base_grid, image_shape)
        index = self._position_index(positions, mask) if positions is not None else None
        if index is not None:
            for block in self.blocks[:-1]:
                x = block(x)
            selected = vit_block_at(self.blocks[-1], x, index + self.buffer_size)
            if selected is not None:
                selected = self.norm(selected) + diffusion_pos[0][index]
                return selected.reshape(-1, selected.shape[-1])
            x = self.blocks[-1](x)
        else:
            for block in self.blocks:
                x = block(x)
        x = self.norm(x)[:, self.buffer_size:] + diffusion_pos
        return x if positions is None else x[positions.to(torch.bool)]

    @staticmethod
    def _position_index(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """``(B, P)`` indices of ``positions`` (row-major, as boolean indexing orders them), or ``None`` when the rows
        ask for different numbers of positions (or none)."""
        if positions.shape != mask.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must have the mask's shape {tuple(mask.shape)}")
        positions = positions.to(torch.bool)
        counts = positions.sum(dim=1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            return None
        return positions.nonzero()[:, 1].view(positions.shape[0], -1)

for _name, _preset in MAR_DECODER_PRESETS.items():
    DECODERS.add(_name, MARDecoder, **_preset)


def convert_original_mar_decoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``MAR`` decoder keys (without the ``mar.`` prefix) → :class:`MARDecoder` keys."""
    exact = {
        "mask_token": "mask_token",
        "decoder_pos_embed_learned": "pos_embed",
        "diffusion_pos_embed_learned": "diffusion_pos_embed",
    }
    prefixes = {"decoder_embed.": "decoder_embed.", "decoder_blocks.": "blocks.", "decoder_norm.": "norm."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in exact:
            out[exact[key]] = value
            continue
        for old, new in prefixes.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise KeyError(key)
    return out

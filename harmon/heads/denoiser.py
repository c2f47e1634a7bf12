"""The MLP-AdaLN denoiser of MAR's diffusion head (``SimpleMLPAdaLN``).

:class:`MLPAdaLNDenoiser` predicts, for noisy tokens ``x (N, C)`` at integer timesteps ``t`` under conditions
``c (N, D')``, ``(N, 2C)``: ε and the learned-range variance interpolation ``v ∈ [-1, 1]``. The timestep embedding
reuses diffusers' ``Timesteps`` + ``TimestepEmbedding`` (the same sinusoid, cos first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

if TYPE_CHECKING:
    from harmon.heads.diffusion import DiffusionHeadConfig


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class AdaLNFinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class MLPAdaLNDenoiser(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: ``(x (N, C), t (N,), c (N, D'))`` → ``(N, 2C)`` = [ε, v]."""

    def __init__(self, config: "DiffusionHeadConfig") -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.time_proj = Timesteps(config.frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(config.frequency_embedding_size, config.width)
        self.cond_embed = nn.Linear(config.cond_dim, config.width)
        self.input_proj = nn.Linear(config.token_dim, config.width)
        self.res_blocks = nn.ModuleList(AdaLNResBlock(config.width, config.norm_eps) for _ in range(config.depth))
        self.final_layer = AdaLNFinalLayer(config.width, 2 * config.token_dim, config.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # adaLN modulations and the output layer start at zero, as in DiT/MAR
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(self.time_proj(t).to(h.dtype)) + self.cond_embed(c)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, guidance_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance on the ε half: rows ``[cond; uncond]`` share the cond half of ``x``; the
        guided ε is returned for both halves, the variance channels pass through."""
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.token_dim], out[:, self.token_dim :]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

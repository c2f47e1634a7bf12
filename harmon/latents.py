"""VAE latents ↔ Harmon's latent tokens.

diffusers' convention, which Harmon follows: the diffusion-side latents are the VAE posterior (mode) times the
VAE's ``scaling_factor`` (Harmon's ``vae_scale`` = 0.2325, saved as the pipeline VAE's ``scaling_factor``), laid out
``(B, C, h, w)``; decoding divides by it (``vae.decode(latents / vae.config.scaling_factor)``). Harmon's tokens are
the same numbers rearranged ``b m n (c p q)`` (patch size ``p``; 1 for KL-16).
"""

from __future__ import annotations

import torch
from einops import rearrange


def vae_encode(vae, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """Pixels ``(B, 3, H, W)`` in [-1, 1] → scaled latents ``(B, C, h, w)`` (posterior mode × ``scale``)."""
    return vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * scale


def latents_to_tokens(latents: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """``(B, C, m·p, n·p)`` → tokens ``(B, m, n, C·p·p)``."""
    p = patch_size
    return rearrange(latents, "b c (m p) (n q) -> b m n (c p q)", p=p, q=p)


def tokens_to_latents(tokens: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """Tokens ``(B, m, n, C·p·p)`` → ``(B, C, m·p, n·p)`` (a new tensor; ``tokens`` is not modified)."""
    p = patch_size
    return rearrange(tokens, "b m n (c p q) -> b c (m p) (n q)", p=p, q=p)


__all__ = ["latents_to_tokens", "tokens_to_latents", "vae_encode"]

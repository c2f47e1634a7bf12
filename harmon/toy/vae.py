"""Training the toy image tokenizer: the preset's KL VAE (diffusers ``AutoencoderKL``) by reconstruction.

The loss is a colour-weighted MSE (luminance + ``chroma_weight`` × chroma error, see :func:`train_vae`) plus a
small KL term.

The training engine keeps the VAE frozen (Harmon trains on a fixed tokenizer), so the toy VAE is trained first, on
its own, with the usual KL-autoencoder objective: pixel MSE + a small KL term (``kl_weight`` per latent element;
no perceptual or adversarial loss — the canvases are flat colours on black and MSE reconstructs them). By default
the decoder reads the posterior *mean* (``sample_posterior=False``): in a few hundred steps the sampling noise
(posterior std ≈ 0.4 against latents of std ≈ 1.3) left room for luminance only — the reconstructions lost the
digits' colours (R ≈ G ≈ B for every palette colour, measured); the KL term still keeps the latents bounded. Written by
hand: diffusers ships the autoencoder, not a training loop for it; this one is twenty lines.

:func:`latent_scale` measures ``vae_scale`` as Harmon uses it: ``1 / std`` of the posterior modes over the data,
so that the MAR tokens have unit variance.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from diffusers import AutoencoderKL


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int = 800,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    crop: int | None = None,
    sample_posterior: bool = False,
    chroma_weight: float = 3.0,
    seed: int = 0,
    log_every: int = 50,
    log=print,
) -> dict[str, float]:
    """Train ``vae`` in place on ``images`` ``(N, 3, H, W)`` in [-1, 1] (whole images, or random ``crop``×``crop``
    windows of them); returns the final losses and seconds."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    vae.train()
    started = time.perf_counter()
    recent: list[tuple[float, float]] = []
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        if crop is not None:  # cheaper, but the normalisation statistics of crops differ from whole canvases
            corners = torch.randint(images.shape[-1] - crop + 1, (batch_size, 2), generator=generator).tolist()
            batch = torch.stack([b[:, y:y + crop, x:x + crop] for b, (y, x) in zip(batch, corners)])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean
        if sample_posterior:
            latents = latents + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        # squared error split into luminance (the channel mean) and chroma (the rest), chroma weighted by
        # chroma_weight: with plain MSE the few latent channels went to luminance patterns only, and every digit came
        # back in the palette's mean colour (measured: R ≈ G ≈ B for every colour after 200-300 steps, at 4 and 8
        # latent channels, 8 to 32 GroupNorm groups, with or without posterior sampling)
        error = reconstruction - batch
        luminance = error.mean(dim=1, keepdim=True)
        mse = torch.mean(luminance**2) + chroma_weight * torch.mean((error - luminance) ** 2)
        kl = torch.mean(0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar))
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [(float(mse.detach()), float(kl.detach()))])[-log_every:]
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            m, k = np.mean(recent, axis=0)
            log(f"vae step {step + 1}/{steps}: mse {m:.5f} kl {k:.3f} ({time.perf_counter() - started:.0f} s)")
    vae.eval()
    m, k = np.mean(recent, axis=0)
    return {"mse": float(m), "kl": float(k), "seconds": time.perf_counter() - started}


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """``1 / std`` of the posterior modes of ``images``: Harmon's ``vae_scale`` for this VAE."""
    modes = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)])
    return float(1.0 / modes.std())


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error of posterior-mode reconstructions ([-1, 1] pixels)."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        total += float(((vae.decode(vae.encode(batch).latent_dist.mode()).sample - batch) ** 2).sum())
    return total / images.numel()

"""Diffusion head family: MAR's per-token diffusion head — the MLP-AdaLN denoiser on ADM's Gaussian diffusion.

The family is split along its three roles:

* :mod:`harmon.heads.denoiser` — :class:`~harmon.heads.denoiser.MLPAdaLNDenoiser` (``(x, t, c)`` → [ε, v]);
* :mod:`harmon.schedulers.scheduling_adm` — :class:`~harmon.schedulers.ADMScheduler`: the float64 tables, the
  respacing, the ancestral step and the pieces of the training loss;
* :mod:`harmon.heads.fused_sampler` — the fused sampling loop (the exact/fast sampler's hot path);

and this file, which holds the head's config, presets and registration, :class:`MLPAdaLNDiffusionHead` (the
denoiser plus its training loss and plain sampling loop) and the original checkpoint's key conversion.

The head owns a scheduler built from its own config (``head.train_diffusion``: the full chain for training,
``head.sample_diffusion``: respaced to ``num_sampling_steps``); sampling takes another chain as an argument (a
pipeline passes its ``scheduler`` component's), so no pipeline ever changes a head's state.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from harmon.heads.denoiser import MLPAdaLNDenoiser
from harmon.heads.fused_sampler import FusedAncestralSampler, default_random_source, initial_noise, is_guided
from harmon.interfaces import RandomSource
from harmon.registry import HEADS
from harmon.schedulers import ADMScheduler
from harmon.schedulers.scheduling_adm import sampling_dtype

# ---------------------------------------------------------------------------------------------------------------
# config


class DiffusionHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    token_dim: PositiveInt = 16
    cond_dim: PositiveInt = 768
    width: PositiveInt = 1024
    depth: PositiveInt = 6
    frequency_embedding_size: PositiveInt = 256
    num_train_timesteps: PositiveInt = 1000
    num_sampling_steps: PositiveInt = 100
    diffusion_batch_mul: PositiveInt = 4
    norm_eps: float = Field(1e-6, gt=0)


DIFFUSION_HEAD_PRESETS: dict[str, dict] = {
    "mlp-adaln": {},  # generic: Harmon-0.5B defaults, every field overridable
    "mlp-adaln-b": dict(cond_dim=768, width=1024, depth=6),
    "mlp-adaln-h": dict(cond_dim=1280, width=1536, depth=12),
    "mlp-adaln-tiny": dict(cond_dim=64, width=64, depth=2, num_sampling_steps=10),
}


# sampler="fast" runs the head's schedule respaced to (configured steps // this) steps unless told otherwise
FAST_STEP_DIVISOR = 4


def adm_scheduler_for(config: DiffusionHeadConfig) -> ADMScheduler:
    """The :class:`ADMScheduler` a head of ``config`` was trained with (cosine, learned range), full chain."""
    return ADMScheduler(num_train_timesteps=config.num_train_timesteps, num_sampling_steps=config.num_sampling_steps)


class MLPAdaLNDiffusionHead(nn.Module):
    """Denoiser + diffusion process: per-token sampling (with CFG and temperature) and the training loss."""

    config_class = DiffusionHeadConfig

    def __init__(self, config: DiffusionHeadConfig | None = None, **kwargs) -> None:
        super().__init__()
        config = config if config is not None else DiffusionHeadConfig(**kwargs)
        self.config = config
        self.net = MLPAdaLNDenoiser(config)
        self.train_diffusion = adm_scheduler_for(config)
        self.sample_diffusion = self.train_diffusion.respaced(config.num_sampling_steps)

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def check_scheduler(self, scheduler: object, argument: str = "scheduler") -> ADMScheduler:
        """``scheduler`` if this head can sample on it, else a ``TypeError`` / ``ValueError`` naming ``argument``:
        it must be an :class:`ADMScheduler` (the head predicts ε and a learned-range variance, which only that
        step reads) over the head's ``num_train_timesteps`` (the denoiser's timestep embedding was trained on
        them)."""
        if not isinstance(scheduler, ADMScheduler):
            raise TypeError(
                f"{argument}: the diffusion head samples with an ADMScheduler (ε + learned-range variance); "
                f"{type(scheduler).__name__} cannot read its output. Use "
                "harmon.schedulers.ADMScheduler.from_config(...) to change the sampling steps or schedule"
            )
        if scheduler.config.num_train_timesteps != self.config.num_train_timesteps:
            raise ValueError(
                f"{argument}: num_train_timesteps={scheduler.config.num_train_timesteps}, but the head was trained "
                f"on {self.config.num_train_timesteps} timesteps"
            )
        return scheduler

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)

    def denoise(
        self, x: torch.Tensor, index: torch.Tensor, c: torch.Tensor, guidance_scale: float | torch.Tensor = 1.0,
        diffusion: ADMScheduler | None = None,
    ) -> dict:
        """p_mean_variance at respaced step indices ``index``; CFG when ``guidance_scale`` ≠ 1."""
        diffusion = diffusion or self.sample_diffusion
        t = diffusion.timestep_map.to(index.device)[index]
        return diffusion.p_mean_variance(self._net_output(x, t, c, guidance_scale), x, index)

    def _net_output(self, x, t, c, guidance_scale) -> torch.Tensor:
        if is_guided(guidance_scale):
            return self.net.forward_with_cfg(x, t, c, guidance_scale)
        return self.net(x, t, c)

    @torch.no_grad()
    def sample(
        self,
        c: torch.Tensor,
        temperature: float = 1.0,
        guidance_scale: float | torch.Tensor = 1.0,
        random_source: RandomSource | None = None,
        row_groups: int = 1,
        scheduler: ADMScheduler | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling of one token per row of ``c (N, D')`` → ``(N, C)`` on ``scheduler``'s chain
        (default: ``sample_diffusion``), one :meth:`ADMScheduler.step` per timestep.

        With guidance, rows are ``[cond; uncond]`` and both halves start from the same noise. ``row_groups``: the
        rows form this many equal blocks, one per image row (cond and uncond rows each count), so that a
        per-image random source can serve each block. Draw order (what a replayed run must record): the initial
        noise, then one full-size draw per step, t = K-1 … 0 (t = 0 included, multiplied by zero).
        """
        scheduler = self.check_scheduler(scheduler) if scheduler is not None else self.sample_diffusion
        random_source = default_random_source(random_source)
        rows = c.shape[0]
        # the chain is carried in float32 (at least) whatever the weights' dtype, as ADM does: its posterior
        # coefficients reach ~10⁴ at t ≈ 999, which float16 overflows and bfloat16 rounds to 1e-2 relative
        chain_dtype = sampling_dtype(c.dtype)
        x = initial_noise(random_source, rows, self.token_dim, is_guided(guidance_scale), row_groups, c.device, c.dtype)
        x = x.to(chain_dtype)
        for t in scheduler.timesteps.tolist():
            timestep = torch.full((rows,), t, device=c.device, dtype=torch.long)
            out = self._net_output(x.to(c.dtype), timestep, c, guidance_scale)
            noise = random_source.randn(tuple(x.shape), c.device, c.dtype, row_groups)
            x = scheduler.step(out, timestep, x, noise=noise, temperature=temperature).prev_sample
        return x.to(c.dtype)

    def prepare_sampler(
        self,
        num_steps: int | None = None,
        *,
        fast: bool = False,
        compile: bool = False,
        chunk_bytes: int = 64 << 20,
        scheduler: ADMScheduler | None = None,
    ) -> FusedAncestralSampler:
        """A :class:`~harmon.heads.fused_sampler.FusedAncestralSampler` on ``scheduler``'s chain (default:
        ``sample_diffusion``): :meth:`sample`'s results (to float round-off, same draws in the same order) with the
        per-call constants computed once. ``num_steps`` (fewer than the chain's steps) gives the respaced *fast*
        sampler instead; ``fast=True`` without ``num_steps``: the chain's steps // :data:`FAST_STEP_DIVISOR`.
        It reads the denoiser's weights when called, so it stays valid when they change or are offloaded."""
        scheduler = self.check_scheduler(scheduler) if scheduler is not None else self.sample_diffusion
        if fast and num_steps is None:
            num_steps = max(1, scheduler.num_timesteps // FAST_STEP_DIVISOR)
        return FusedAncestralSampler(self.net, scheduler, num_steps=num_steps, compile=compile, chunk_bytes=chunk_bytes)

    def training_losses(
        self, target: torch.Tensor, c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ADM's hybrid loss per row: ε-MSE + the variational bound (whose gradient reaches only the variance)."""
        diffusion = self.train_diffusion
        x_t = diffusion.add_noise(target, noise, t)
        out = self.net(x_t, diffusion.timestep_map.to(t.device)[t], c)
        channels = target.shape[1]
        eps, v = out[:, :channels], out[:, channels:]
        vb = diffusion.variational_bound(torch.cat([eps.detach(), v], dim=1), target, x_t, t)
        mse = (noise - eps).pow(2).mean(dim=list(range(1, eps.dim())))
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t}

    def loss(
        self,
        target: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean training loss over rows (weighted by ``mask`` when given), random timesteps and noise."""
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), generator=generator,
                          device="cpu").to(target.device)
        noise = torch.randn(target.shape, generator=generator, dtype=target.dtype, device="cpu").to(target.device)
        loss = self.training_losses(target, c, t, noise)["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum().clamp(min=1)
        return loss.mean()


for _name, _preset in DIFFUSION_HEAD_PRESETS.items():
    HEADS.add(_name, MLPAdaLNDiffusionHead, **_preset)


def convert_original_diffloss(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``DiffLoss`` keys (``net.…``, without ``mar.diffloss.``) → :class:`MLPAdaLNDiffusionHead` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key.replace("net.time_embed.mlp.0.", "net.time_embed.linear_1.").replace(
            "net.time_embed.mlp.2.", "net.time_embed.linear_2."
        )
        out[new] = value
    return out

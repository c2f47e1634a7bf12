"""Diffusion head family: MAR's per-token MLP-AdaLN denoiser and its ADM-style Gaussian diffusion.

* :class:`MLPAdaLNDenoiser` predicts, for noisy tokens ``x (N, C)`` at integer timesteps ``t`` under conditions
  ``c (N, D')``, ``(N, 2C)``: ε and the learned-range variance interpolation ``v ∈ [-1, 1]``. The timestep
  embedding reuses diffusers' ``Timesteps`` + ``TimestepEmbedding`` (the same sinusoid, cos first).
* The noise schedule is carried by a diffusers ``DDPMScheduler`` configured as ADM's cosine schedule
  (``squaredcos_cap_v2``, ``learned_range``, ``clip_sample=False``, ``timestep_spacing="linspace"``):
  its ``set_timesteps(K)`` gives the respaced timesteps the head samples at.
* :class:`RespacedGaussianDiffusion` holds the posterior tables of that schedule respaced to K steps, in
  float64 as ADM keeps them. Written here rather than calling ``DDPMScheduler.step`` because that step (a) has
  no sampling temperature, (b) draws its noise internally (so a recorded run cannot be replayed) and skips the
  draw at t=0, and (c) works from float32 tables, which costs ~1e-4 in the predicted x₀ at t≈999 where
  1/√ᾱ ≈ 2·10⁴. Each table is cast to the sample's dtype at lookup, as ADM does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from harmon.interfaces import RandomSource
from harmon.registry import HEADS

# ---------------------------------------------------------------------------------------------------------------
# config


class DiffusionHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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


def adm_cosine_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """A diffusers ``DDPMScheduler`` set up as MAR's ADM diffusion (cosine schedule, learned-range variance)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )


# ---------------------------------------------------------------------------------------------------------------
# denoiser


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

    def __init__(self, config: DiffusionHeadConfig) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# diffusion process


def _cosine_betas_float64(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # diffusers builds the same "squaredcos_cap_v2" betas but returns them as float32; ADM keeps float64.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)])


def _train_betas(scheduler: DDPMScheduler) -> np.ndarray:
    config = scheduler.config
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas_float64(config.num_train_timesteps)
    return scheduler.betas.double().numpy()


class RespacedGaussianDiffusion:
    """ADM Gaussian diffusion (ε prediction, learned-range variance) on the scheduler's timesteps.

    ``timesteps`` are the scheduler's ``set_timesteps(num_steps)`` timesteps in increasing order (all training
    timesteps when ``num_steps`` is None); index ``i`` of every table refers to ``timesteps[i]``.
    """

    def __init__(self, scheduler: DDPMScheduler, num_steps: int | None = None) -> None:
        base_alphas_cumprod = np.cumprod(1.0 - _train_betas(scheduler))
        if num_steps is None:
            timesteps = np.arange(scheduler.config.num_train_timesteps)
        else:
            scheduler.set_timesteps(num_steps)
            timesteps = np.sort(scheduler.timesteps.numpy().astype(np.int64))
        alphas_cumprod = base_alphas_cumprod[timesteps]
        previous = np.append(1.0, alphas_cumprod[:-1])
        betas = 1.0 - alphas_cumprod / previous
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)

        self.timestep_map = torch.from_numpy(timesteps)
        self.num_timesteps = len(timesteps)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.tables = {
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_mean_coef1": betas * np.sqrt(previous) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - previous) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            # the posterior variance is 0 at the first step: ADM clips its log to the next step's value
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(timesteps) > 1
            else np.log(np.maximum(posterior_variance, 1e-20)),
            "log_betas": np.log(betas),
        }
        self._table_tensors = {name: torch.from_numpy(values) for name, values in self.tables.items()}

    def lookup(self, name: str, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at per-row step indices ``index (N,)``, cast to ``like``'s dtype, shaped ``(N, 1, ...)``."""
        table = self._table_tensors[name].to(index.device)
        values = table[index].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x_start: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self.lookup("sqrt_alphas_cumprod", index, x_start) * x_start
            + self.lookup("sqrt_one_minus_alphas_cumprod", index, x_start) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        mean = (
            self.lookup("posterior_mean_coef1", index, x_t) * x_start
            + self.lookup("posterior_mean_coef2", index, x_t) * x_t
        )
        return mean, self.lookup("posterior_log_variance_clipped", index, x_t)

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> dict:
        """Mean/variance of p(x_{t-1} | x_t) from the denoiser output ``[ε, v]`` (no clipping of x₀)."""
        channels = x.shape[1]
        eps, v = model_output[:, :channels], model_output[:, channels:]
        min_log = self.lookup("posterior_log_variance_clipped", index, x)
        max_log = self.lookup("log_betas", index, x)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (
            self.lookup("sqrt_recip_alphas_cumprod", index, x) * x
            - self.lookup("sqrt_recipm1_alphas_cumprod", index, x) * eps
        )
        mean, _ = self.q_posterior(pred_xstart, x, index)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_xstart": pred_xstart}


# ADM's bits-per-dim helpers. Not in torch.distributions: ADM uses a tanh approximation of the normal CDF and a
# ±1/255 discretisation, which the variational-bound term must reproduce to match the original loss.
def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


# ---------------------------------------------------------------------------------------------------------------
# the head


class MLPAdaLNDiffusionHead(nn.Module):
    """Denoiser + diffusion process: per-token sampling (with CFG and temperature) and the training loss."""

    config_class = DiffusionHeadConfig

    def __init__(
        self, config: DiffusionHeadConfig | None = None, scheduler: DDPMScheduler | None = None, **kwargs
    ) -> None:
        super().__init__()
        config = config if config is not None else DiffusionHeadConfig(**kwargs)
        self.config = config
        self.net = MLPAdaLNDenoiser(config)
        self.set_scheduler(scheduler if scheduler is not None else adm_cosine_scheduler(config.num_train_timesteps))

    def set_scheduler(self, scheduler: DDPMScheduler, num_sampling_steps: int | None = None) -> None:
        """Use ``scheduler``'s schedule for training and, respaced to ``num_sampling_steps``, for sampling."""
        self.scheduler = scheduler
        self.train_diffusion = RespacedGaussianDiffusion(scheduler, None)
        self.sample_diffusion = RespacedGaussianDiffusion(
            scheduler, num_sampling_steps or self.config.num_sampling_steps
        )

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)

    def denoise(
        self, x: torch.Tensor, index: torch.Tensor, c: torch.Tensor, guidance_scale: float | torch.Tensor = 1.0,
        diffusion: RespacedGaussianDiffusion | None = None,
    ) -> dict:
        """p_mean_variance at respaced step indices ``index``; CFG when ``guidance_scale`` ≠ 1."""
        diffusion = diffusion or self.sample_diffusion
        t = diffusion.timestep_map.to(index.device)[index]
        if _is_guided(guidance_scale):
            out = self.net.forward_with_cfg(x, t, c, guidance_scale)
        else:
            out = self.net(x, t, c)
        return diffusion.p_mean_variance(out, x, index)

    @torch.no_grad()
    def sample(
        self,
        c: torch.Tensor,
        temperature: float = 1.0,
        guidance_scale: float | torch.Tensor = 1.0,
        random_source: RandomSource | None = None,
        row_groups: int = 1,
    ) -> torch.Tensor:
        """Ancestral sampling of one token per row of ``c (N, D')`` → ``(N, C)``.

        With guidance, rows are ``[cond; uncond]`` and both halves start from the same noise. ``row_groups``: the
        rows form this many equal blocks, one per image row (cond and uncond rows each count), so that a
        per-image random source can serve each block. Draw order (what a replayed run must record): the initial
        noise, then one full-size draw per step, t = K-1 … 0 (t = 0 included, multiplied by zero).
        """
        random_source = _default_random_source(random_source)
        guided = _is_guided(guidance_scale)
        rows = c.shape[0]
        x = _initial_noise(random_source, rows, self.token_dim, guided, row_groups, c.device, c.dtype)
        diffusion = self.sample_diffusion
        for i in reversed(range(diffusion.num_timesteps)):
            index = torch.full((rows,), i, device=c.device, dtype=torch.long)
            out = self.denoise(x, index, c, guidance_scale)
            noise = random_source.randn(tuple(x.shape), c.device, x.dtype, row_groups)
            nonzero = float(i != 0)
            x = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return x

    def prepare_sampler(
        self,
        num_steps: int | None = None,
        *,
        fast: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        chunk_bytes: int = 64 << 20,
    ) -> "FusedAncestralSampler":
        """A :class:`FusedAncestralSampler` on the current weights: :meth:`sample`'s results (to float round-off,
        same draws in the same order) with the per-call constants computed once. ``num_steps`` (fewer than the
        configured steps) gives the respaced *fast* sampler instead; ``fast=True`` without ``num_steps``: the
        configured steps // :data:`FAST_STEP_DIVISOR`. Build it again after changing the weights."""
        if fast and num_steps is None:
            num_steps = max(1, self.sample_diffusion.num_timesteps // FAST_STEP_DIVISOR)
        return FusedAncestralSampler(
            self, num_steps=num_steps, dtype=dtype, device=device, compile=compile, chunk_bytes=chunk_bytes
        )

    def training_losses(
        self, target: torch.Tensor, c: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """ADM's hybrid loss per row: ε-MSE + the variational bound (whose gradient reaches only the variance)."""
        diffusion = self.train_diffusion
        x_t = diffusion.q_sample(target, t, noise)
        out = self.net(x_t, diffusion.timestep_map.to(t.device)[t], c)
        channels = target.shape[1]
        eps, v = out[:, :channels], out[:, channels:]
        frozen = diffusion.p_mean_variance(torch.cat([eps.detach(), v], dim=1), x_t, t)
        true_mean, true_log_variance = diffusion.q_posterior(target, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, frozen["mean"], frozen["log_variance"])) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(target, frozen["mean"], 0.5 * frozen["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = _mean_flat((noise - eps) ** 2)
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


# ---------------------------------------------------------------------------------------------------------------
# fused sampling loop (the sampler's hot path)


def _noise_coupling(fine: RespacedGaussianDiffusion, coarse: RespacedGaussianDiffusion) -> np.ndarray:
    """``(K', K)`` float64 weights that turn the ``K`` step noises of the fine sampler into the ``K'`` of a coarser
    one on the same random draws: coarse step ``j`` (timestep ``T_j``, going to ``T_{j-1}``) gets the normalised,
    posterior-std-weighted sum of the fine noises injected over ``(T_{j-1}, T_j]``. Each coarse noise is then still
    standard normal and independent of the others (disjoint supports), and it is built from the same draws the fine
    sampler adds over that stretch of time, so fast and exact samples differ mostly by their discretisation rather
    than by their luck. Row 0 (t = 0 adds no noise) is zero. Written here: diffusers' schedulers draw their own
    noise and have no notion of coupling two step counts."""
    fine_t = fine.timestep_map.numpy()
    coarse_t = coarse.timestep_map.numpy()
    # posterior std of each fine step (the lower end of the learned range); step 0 adds no noise
    fine_std = np.sqrt(np.exp(fine.tables["posterior_log_variance_clipped"]))
    fine_std[0] = 0.0
    # coarse step j covers the fine timesteps in (T_{j-1}, T_j]
    # (a single coarse step sits at t = 0, where no noise is added at all: every fine step maps onto it)
    owner = np.minimum(np.searchsorted(coarse_t, fine_t, side="left"), len(coarse_t) - 1)
    weights = np.zeros((len(coarse_t), len(fine_t)))
    weights[owner, np.arange(len(fine_t))] = fine_std
    weights[0] = 0.0
    norms = np.linalg.norm(weights, axis=1)
    empty = [int(j) for j in np.flatnonzero(norms[1:] == 0) + 1]
    if empty:
        raise ValueError(
            f"{len(coarse_t)} head steps cannot be coupled to the {len(fine_t)}-step schedule (coarse steps "
            f"{empty} contain no fine step); use at most about half as many steps"
        )
    weights[1:] /= norms[1:, None]
    return weights


def _fused_denoise_step(
    x: torch.Tensor,
    mods: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    noise: torch.Tensor | None,
    guidance_scale: float | torch.Tensor | None,
    input_proj: tuple[torch.Tensor, torch.Tensor],
    blocks: list[tuple],
    final: tuple,
    channels: int,
) -> torch.Tensor:
    """One step of :class:`FusedAncestralSampler`: ``x (N, C)`` at step i → at step i-1 (``noise`` None: the
    last step, no noise added). ``mods (N, 3·depth + 2, W)``: [shift, 1 + scale, gate] per block, then
    [shift, 1 + scale] of the final layer. A module-level function of tensors only, so that ``torch.compile``
    guards on shapes, not on a sampler instance."""
    parts = mods.unbind(1)
    if guidance_scale is not None:
        # forward_with_cfg: both halves of the denoiser's input are the cond half of x, so project it once
        half = x.shape[0] // 2
        h = F.linear(x[:half], *input_proj)
        h = torch.cat([h, h])
    else:
        h = F.linear(x, *input_proj)
    for j, (ln_weight, ln_bias, ln_eps, w1, b1, w2, b2) in enumerate(blocks):
        shift, scale, gate = parts[3 * j], parts[3 * j + 1], parts[3 * j + 2]
        u = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], ln_weight, ln_bias, ln_eps), scale)
        h = torch.addcmul(h, gate, F.linear(F.silu(F.linear(u, w1, b1), inplace=True), w2, b2))
    final_eps, w_out, b_out = final
    u = torch.addcmul(parts[-2], F.layer_norm(h, h.shape[-1:], None, None, final_eps), parts[-1])
    out = F.linear(u, w_out, b_out)
    eps, v = out[:, :channels], out[:, channels:]
    if guidance_scale is not None:
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        mean = ((a * x).view(2, half, channels) - b * guided).view_as(x)
    else:
        mean = a * x - b * eps
    if noise is None:
        return mean
    return torch.addcmul(mean, torch.exp(torch.addcmul(p, q, v)), noise)


_COMPILED_STEPS: dict[str, object] = {}


def _compiled_step(device_type: str):
    """``torch.compile`` of :func:`_fused_denoise_step`, once per process and device type (CUDA: CUDA graphs)."""
    if device_type not in _COMPILED_STEPS:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_STEPS[device_type] = torch.compile(_fused_denoise_step, mode=mode, dynamic=True)
    return _COMPILED_STEPS[device_type]


class FusedAncestralSampler:
    """The head's ancestral sampling loop (:meth:`MLPAdaLNDiffusionHead.sample`) with its constants hoisted out.

    What the plain loop recomputes at each of its K denoising steps and this one computes less often:

    * per sampler (built once per ``generate_tokens`` call): the timestep embeddings of all K respaced steps, the
      posterior coefficients as ``dtype`` scalars folded into ``mean = A·x − B·ε`` and
      ``std = exp(P + Q·v)``, and the adaLN modulation weights of every block and the final layer concatenated
      into one matrix (with the ``1 +`` of ``x·(1 + scale) + shift`` folded into its bias);
    * per call (one MAR step): ``cond_embed(c)`` once, then the modulations of all K steps in one large matrix
      product (in chunks of at most ``chunk_bytes``) instead of ``depth + 1`` small ones per step; the noise of
      all steps drawn up front (same draws, same order as :meth:`~MLPAdaLNDiffusionHead.sample`: the initial
      noise, then one full-size draw per step t = K-1 … 0) and scaled by the temperature once.

    What stays per step is what depends on ``x``: ``input_proj``, LayerNorm + MLP of each block, the final linear,
    guidance and the posterior update. They are written with ``torch.nn.functional`` on the denoiser's own
    parameters rather than through its modules because they must consume the precomputed modulations (and skip
    ``nn.Module`` call overhead, which at a few rows per call is a large share of the step). The result equals
    :meth:`~MLPAdaLNDiffusionHead.sample` to float round-off (matrix products of other shapes, re-associated
    scalar algebra); ``tests/test_fast_sampling.py`` holds them together.

    ``num_steps`` < the configured steps: the *fast* sampler on the schedule respaced to ``num_steps`` (diffusers'
    ``set_timesteps`` spacing, as :meth:`~MLPAdaLNDiffusionHead.set_scheduler`). It still draws the configured
    number of step noises (so the random stream, a replay record and everything sampled after this call match
    the exact sampler) and couples its coarse-step noise to them (:func:`_noise_coupling`).

    ``compile=True`` wraps the per-step function in ``torch.compile`` (on CUDA with ``mode="reduce-overhead"``,
    i.e. CUDA graphs). Untested on CUDA here (no GPU was available); on CPU it runs but did not pay (see
    ``docs/performance.md``).
    """

    def __init__(
        self,
        head: "MLPAdaLNDiffusionHead",
        *,
        num_steps: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        net = head.net
        reference = net.cond_embed.weight
        self.dtype = dtype or reference.dtype
        self.device = torch.device(device) if device is not None else reference.device
        self.token_dim = net.token_dim
        self.chunk_bytes = int(chunk_bytes)
        fine = head.sample_diffusion
        self.num_draws = fine.num_timesteps
        if num_steps is None or num_steps == fine.num_timesteps:
            diffusion, coupling = fine, None
        else:
            if not 1 <= num_steps < fine.num_timesteps:
                raise ValueError(
                    f"num_steps must be between 1 and the head's {fine.num_timesteps} sampling steps, got {num_steps}"
                )
            # a fresh scheduler: respacing calls set_timesteps, which must not touch the head's own scheduler
            diffusion = RespacedGaussianDiffusion(DDPMScheduler.from_config(head.scheduler.config), num_steps)
            coupling = _noise_coupling(fine, diffusion)
        self.num_steps = diffusion.num_timesteps
        kw = dict(device=self.device, dtype=self.dtype)
        self.coupling = torch.from_numpy(coupling).to(**kw) if coupling is not None else None

        tables = diffusion.tables
        # mean = c1·(a·x − b·ε) + c2·x = A·x − B·ε; log-variance = min + (v+1)/2·(max − min), std = exp(½·log-var)
        a, b = tables["sqrt_recip_alphas_cumprod"], tables["sqrt_recipm1_alphas_cumprod"]
        c1, c2 = tables["posterior_mean_coef1"], tables["posterior_mean_coef2"]
        low, high = tables["posterior_log_variance_clipped"], tables["log_betas"]
        scalars = {"A": c1 * a + c2, "B": c1 * b, "P": (low + high) / 4, "Q": (high - low) / 4}
        # one 0-d tensor per step and coefficient: no indexing or host→device copy inside the loop
        self.coefficients = [
            tuple(torch.tensor(float(scalars[name][i]), **kw) for name in ("A", "B", "P", "Q"))
            for i in range(self.num_steps)
        ]

        with torch.no_grad():
            t = diffusion.timestep_map.to(self.device)
            self.time_embedding = net.time_embed(net.time_proj(t).to(self.dtype)).to(self.dtype)  # (K, W)
        width = net.cond_embed.out_features
        self.width = width
        modulations = [block.adaLN_modulation[-1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]
        self.mod_weight = torch.cat([m.weight for m in modulations]).detach().to(**kw)
        bias = torch.cat([m.bias for m in modulations]).detach().to(**kw).clone()
        for j in range(len(net.res_blocks) + 1):  # columns: [shift, scale, gate] per block, [shift, scale] final
            bias[3 * width * j + width : 3 * width * j + 2 * width] += 1
        self.mod_bias = bias

        def param(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.detach().to(**kw)

        self.cond = (param(net.cond_embed.weight), param(net.cond_embed.bias))
        self.input = (param(net.input_proj.weight), param(net.input_proj.bias))
        self.blocks = [
            (
                param(block.in_ln.weight), param(block.in_ln.bias), block.in_ln.eps,
                param(block.mlp[0].weight), param(block.mlp[0].bias),
                param(block.mlp[2].weight), param(block.mlp[2].bias),
            )
            for block in net.res_blocks
        ]
        final = net.final_layer
        self.final = (final.norm_final.eps, param(final.linear.weight), param(final.linear.bias))
        self.compiled = compile
        self._step = _compiled_step(self.device.type) if compile else _fused_denoise_step

    # -------------------------------------------------------------------------------------------- per call
    @torch.no_grad()
    def __call__(
        self,
        c: torch.Tensor,
        temperature: float = 1.0,
        guidance_scale: float | torch.Tensor = 1.0,
        random_source: RandomSource | None = None,
        row_groups: int = 1,
    ) -> torch.Tensor:
        """Same contract as :meth:`MLPAdaLNDiffusionHead.sample`: conditions ``c (N, D')`` → tokens ``(N, C)``."""
        random_source = _default_random_source(random_source)
        guided = _is_guided(guidance_scale)
        rows, device, dtype = c.shape[0], self.device, self.dtype
        c = c.to(device=device, dtype=dtype)
        shape = (rows, self.token_dim)
        x = _initial_noise(random_source, rows, self.token_dim, guided, row_groups, device, dtype)
        # every step's noise, drawn in the order sample() draws it (index K-1-i holds step i's)
        noise = torch.stack([random_source.randn(shape, device, dtype, row_groups) for _ in range(self.num_draws)])
        noise = noise.flip(0)  # index i: step i
        if self.coupling is not None:
            noise = torch.einsum("jk,knc->jnc", self.coupling, noise)
        if temperature != 1.0:
            noise = noise * temperature
        scale = guidance_scale if guided else None

        cond = F.linear(c, *self.cond)  # (N, W): once per call instead of once per step
        row_bytes = rows * self.mod_weight.shape[0] * self.mod_weight.element_size()
        chunk = max(1, min(self.num_steps, self.chunk_bytes // max(row_bytes, 1)))
        top = self.num_steps
        while top > 0:
            bottom = max(0, top - chunk)
            # modulations of steps bottom … top-1 in one matrix product: (S, N, W) → (S, N, M)
            y = F.silu(self.time_embedding[bottom:top, None, :] + cond[None])
            mods = F.linear(y, self.mod_weight, self.mod_bias)
            mods = mods.view(top - bottom, rows, -1, self.width)  # (S, N, 3·depth + 2, W)
            for i in reversed(range(bottom, top)):
                if self.compiled and self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                x = self._step(
                    x, mods[i - bottom], *self.coefficients[i], noise[i] if i else None, scale, self.input,
                    self.blocks, self.final, self.token_dim,
                )
                if self.compiled:
                    x = x.clone()  # a CUDA-graph output is overwritten by the next replay
            top = bottom
        return x


def _default_random_source(random_source: RandomSource | None) -> RandomSource:
    if random_source is not None:
        return random_source
    from harmon.randomness import GeneratorRandomSource

    return GeneratorRandomSource(None)


def _initial_noise(
    random_source: RandomSource, rows: int, channels: int, guided: bool, row_groups: int, device, dtype
) -> torch.Tensor:
    """The first draw of a head sampling call (both samplers): ``(rows, channels)`` noise; with guidance one
    draw for the cond half, repeated for the uncond half."""
    if guided:
        half = random_source.randn((rows // 2, channels), device, dtype, max(row_groups // 2, 1))
        return torch.cat([half, half])
    return random_source.randn((rows, channels), device, dtype, row_groups)


def _is_guided(guidance_scale: float | torch.Tensor) -> bool:
    if isinstance(guidance_scale, torch.Tensor):
        return bool((guidance_scale != 1.0).any())
    return guidance_scale != 1.0


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

"""``ADMScheduler``: ADM's Gaussian diffusion (Nichol & Dhariwal's improved DDPM, as MAR's diffusion head uses it)
as a diffusers scheduler.

* betas: the cosine schedule (``squaredcos_cap_v2``) or ADM's linear one, computed in **float64** as ADM keeps
  them. diffusers' ``DDPMScheduler`` builds the same cosine betas but in float32, which costs ~1e-4 in the
  predicted x₀ at t≈999 where 1/√ᾱ ≈ 2·10⁴;
* respacing (:meth:`ADMScheduler.set_timesteps`): any number of steps, spaced as diffusers' ``"linspace"``
  (``linspace(0, T-1, K)`` rounded — the timesteps MAR's ``space_timesteps`` gives for the released settings),
  with the posterior tables recomputed for the respaced chain as ADM does;
* the learned-range variance (the model's second output half ``v ∈ [-1, 1]`` interpolates between the clipped
  posterior log-variance and log β);
* :meth:`ADMScheduler.step` with explicit ``noise`` and a ``temperature``: what ``DDPMScheduler.step`` lacks (it
  draws its noise internally, so a recorded run cannot be replayed, skips the draw at t = 0 and has no
  temperature) and why this is written here;
* the hybrid training loss's pieces (:meth:`add_noise` = q_sample, :meth:`q_posterior`, :func:`variational_bound`).

Tables are float64 numpy arrays (``tables``); every lookup casts to the sample's dtype; :meth:`step` runs in
float32 at least (:func:`sampling_dtype`), as ADM does for half-precision models. Guidance is
applied by the denoiser to its ε output before :meth:`step` (``forward_with_cfg``), as in ADM / MAR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear")


def sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sampling chain's arithmetic runs in for samples of ``dtype``: float32 at least. ADM looks its
    tables up in float32 whatever the model's dtype; in float16 the predicted x₀ (``x/√ᾱ`` with 1/√ᾱ ≈ 10⁴ at
    t ≈ 999) overflows to inf and the ancestral mean ``A·x − B·ε`` cancels two terms of ~10⁴ (measured: every
    float16 sample NaN before this)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class ADMSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the previous (less noisy) timestep; ``pred_original_sample``: the predicted x₀."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def adm_betas(beta_schedule: str, num_train_timesteps: int) -> np.ndarray:
    """ADM's betas in float64: ``"squaredcos_cap_v2"`` (cosine, capped at 0.999) or ``"linear"``."""
    steps = num_train_timesteps
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    if beta_schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


class ADMScheduler(SchedulerMixin, ConfigMixin):
    """ADM Gaussian diffusion: ε prediction, learned-range variance, float64 posterior tables (see the module
    docstring).

    Args:
        num_train_timesteps: the training chain's length T.
        beta_schedule: ``"squaredcos_cap_v2"`` (MAR / Harmon) or ``"linear"``.
        num_sampling_steps: the respaced chain the head samples on (:meth:`set_timesteps` default; MAR: 100).
        variance_type, prediction_type: only ``"learned_range"`` / ``"epsilon"`` (what the head predicts); kept in
            the config so a saved scheduler says what it is.

    Right after construction the scheduler holds the full training chain (every table indexed by the training
    timestep); :meth:`set_timesteps` respaces it in place, :meth:`respaced` returns a respaced copy (what a
    pipeline call uses, so that two pipelines sharing a scheduler never see each other's state).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        num_sampling_steps: int = 100,
        variance_type: str = "learned_range",
        prediction_type: str = "epsilon",
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if not isinstance(num_sampling_steps, int) or not 1 <= num_sampling_steps <= num_train_timesteps:
            raise ValueError(
                f"num_sampling_steps must be an int in [1, num_train_timesteps={num_train_timesteps}], "
                f"got {num_sampling_steps!r}"
            )
        if variance_type != "learned_range":
            raise ValueError(f"variance_type: ADMScheduler supports 'learned_range' only, got {variance_type!r}")
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type: ADMScheduler supports 'epsilon' only, got {prediction_type!r}")
        self.train_alphas_cumprod = np.cumprod(1.0 - adm_betas(beta_schedule, num_train_timesteps))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._build(np.arange(num_train_timesteps))

    # ------------------------------------------------------------------------------------------ respacing
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Respace the chain to ``num_inference_steps`` timesteps (``None``: ``config.num_sampling_steps``),
        ``linspace(0, T-1, K)`` rounded; ``timesteps`` then runs from the noisiest down to 0."""
        steps = self.config.num_sampling_steps if num_inference_steps is None else num_inference_steps
        total = self.config.num_train_timesteps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= total:
            raise ValueError(f"num_inference_steps must be an int in [1, {total}], got {steps!r}")
        self.num_inference_steps = steps
        timesteps = np.linspace(0, total - 1, steps).round().astype(np.int64)
        self._build(np.unique(timesteps), device)

    def respaced(self, num_inference_steps: int | None = None) -> "ADMScheduler":
        """A new scheduler of the same config respaced to ``num_inference_steps`` (this one is left unchanged)."""
        scheduler = type(self).from_config(self.config)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    def _build(self, timesteps: np.ndarray, device: str | torch.device | None = None) -> None:
        alphas_cumprod = self.train_alphas_cumprod[timesteps]
        previous = np.append(1.0, alphas_cumprod[:-1])
        betas = 1.0 - alphas_cumprod / previous
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        # the posterior variance is 0 at the first step: ADM clips its log to the next step's value
        if len(timesteps) > 1:
            log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        else:
            log_variance_clipped = np.log(np.maximum(posterior_variance, 1e-20))
        self.timestep_map = torch.from_numpy(timesteps.astype(np.int64))  # step index i → training timestep
        self.timesteps = self.timestep_map.flip(0).to(device) if device is not None else self.timestep_map.flip(0)
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
            "posterior_log_variance_clipped": log_variance_clipped,
            "log_betas": np.log(betas),
        }
        self._table_tensors = {name: torch.from_numpy(values) for name, values in self.tables.items()}

    # ------------------------------------------------------------------------------------------ lookups
    def step_index(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """Step indices (into the tables) of training timesteps on this chain; a timestep not on it raises."""
        t = torch.as_tensor(timestep, dtype=torch.long)
        grid = self.timestep_map.to(t.device)
        index = torch.searchsorted(grid, t.reshape(-1)).clamp(max=len(grid) - 1)
        if not bool((grid[index] == t.reshape(-1)).all()):
            raise ValueError(f"timestep {t.tolist()} is not on this scheduler's chain ({self.num_timesteps} steps)")
        return index.reshape(t.shape)

    def lookup(self, name: str, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at per-row step indices ``index (N,)``, cast to ``like``'s dtype, shaped ``(N, 1, ...)``."""
        table = self._table_tensors[name].to(index.device)
        values = table[index].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------------------------------ the process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """q(x_t | x₀) at step indices ``index`` (ADM's ``q_sample``)."""
        return (
            self.lookup("sqrt_alphas_cumprod", index, original_samples) * original_samples
            + self.lookup("sqrt_one_minus_alphas_cumprod", index, original_samples) * noise
        )

    q_sample = add_noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x₀)."""
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

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ADMSchedulerOutput | tuple:
        """One ancestral step x_t → x_{t-1}: ``model_output (N, 2C)`` = [ε (already guided), v] at training
        ``timestep`` (one for all rows, or ``(N,)``), ``sample (N, C)``. ``noise`` (default: drawn with
        ``generator``) is scaled by ``temperature``; at the chain's first step (t = 0 after respacing) no noise is
        added. The arithmetic runs in :func:`sampling_dtype` (float32 for float16 / bfloat16 samples);
        ``prev_sample`` comes back in the sample's dtype, ``pred_original_sample`` in the arithmetic's (it reaches
        ~10⁴ at the noisiest steps)."""
        index = self.step_index(timestep)
        if index.dim() == 0:
            index = index.expand(sample.shape[0])
        index = index.to(sample.device)
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        compute = sampling_dtype(sample.dtype)  # float16 / bfloat16 samples: the arithmetic in float32, as ADM
        out = self.p_mean_variance(model_output.to(compute), sample.to(compute), index)
        nonzero = (index != 0).to(compute).view(-1, *([1] * (sample.dim() - 1)))
        prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise.to(compute) * temperature
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, out["pred_xstart"])
        return ADMSchedulerOutput(prev_sample=prev, pred_original_sample=out["pred_xstart"])

    def variational_bound(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
        """ADM's variational-bound term per row in bits (KL to the true posterior; the decoder NLL at step 0)."""
        out = self.p_mean_variance(model_output, x_t, index)
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, index)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(index == 0, nll, kl)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


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


__all__ = ["ADMScheduler", "ADMSchedulerOutput", "adm_betas", "sampling_dtype"]

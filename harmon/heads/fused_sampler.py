"""The head's fused ancestral sampling loop: :class:`FusedAncestralSampler`, the exact/fast path of sampling the
:class:`~harmon.heads.denoiser.MLPAdaLNDenoiser` on an :class:`~harmon.schedulers.ADMScheduler` chain.

It reads the denoiser's weights when it is called (never at construction), so accelerate's offload hooks,
``torch.compile`` and CUDA graphs see the live modules; under sequential CPU offload (parameters on the meta
device between calls) the weights are brought in for the call with accelerate's ``align_module_device``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harmon.interfaces import RandomSource
from harmon.layers import live_weights
from harmon.schedulers import ADMScheduler
from harmon.schedulers.scheduling_adm import sampling_dtype


def _noise_coupling(fine: ADMScheduler, coarse: ADMScheduler) -> np.ndarray:
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
    [shift, 1 + scale] of the final layer. ``x``, ``noise`` and the coefficients are in the chain's dtype
    (float32 at least, :func:`~harmon.schedulers.scheduling_adm.sampling_dtype`); the denoiser runs in its
    weights' dtype. A module-level function of tensors only, so that ``torch.compile`` guards on shapes, not on a
    sampler instance."""
    parts = mods.unbind(1)
    net_x = x.to(input_proj[0].dtype)
    if guidance_scale is not None:
        # forward_with_cfg: both halves of the denoiser's input are the cond half of x, so project it once
        half = x.shape[0] // 2
        h = F.linear(net_x[:half], *input_proj)
        h = torch.cat([h, h])
    else:
        h = F.linear(net_x, *input_proj)
    for j, (ln_weight, ln_bias, ln_eps, w1, b1, w2, b2) in enumerate(blocks):
        shift, scale, gate = parts[3 * j], parts[3 * j + 1], parts[3 * j + 2]
        u = torch.addcmul(shift, F.layer_norm(h, h.shape[-1:], ln_weight, ln_bias, ln_eps), scale)
        h = torch.addcmul(h, gate, F.linear(F.silu(F.linear(u, w1, b1), inplace=True), w2, b2))
    final_eps, w_out, b_out = final
    u = torch.addcmul(parts[-2], F.layer_norm(h, h.shape[-1:], None, None, final_eps), parts[-1])
    out = F.linear(u, w_out, b_out).to(x.dtype)
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

    * per sampler (from the scheduler only): the posterior coefficients folded into ``mean = A·x − B·ε`` and
      ``std = exp(P + Q·v)``, and (fast) the noise coupling;
    * per weights (recomputed whenever a parameter of the denoiser changes or moves — checked at every call,
      cheaply, by the parameters' storage and version): the timestep embeddings of all K respaced steps and the
      adaLN modulation weights of every block and the final layer concatenated into one matrix (with the ``1 +``
      of ``x·(1 + scale) + shift`` folded into its bias);
    * per call (one MAR step): ``cond_embed(c)`` once, then the modulations of all K steps in one large matrix
      product (in chunks of at most ``chunk_bytes``) instead of ``depth + 1`` small ones per step; the noise of
      all steps drawn up front (same draws, same order as :meth:`~MLPAdaLNDiffusionHead.sample`: the initial
      noise, then one full-size draw per step t = K-1 … 0) and scaled by the temperature once.

    What stays per step is what depends on ``x``: ``input_proj``, LayerNorm + MLP of each block, the final linear,
    guidance and the posterior update. They are written with ``torch.nn.functional`` on the denoiser's own
    parameters rather than through its modules because they must consume the precomputed modulations (and skip
    ``nn.Module`` call overhead, which at a few rows per call is a large share of the step). The result equals
    :meth:`~MLPAdaLNDiffusionHead.sample` to float round-off; ``tests/test_fast_sampling.py`` holds them together.

    ``num_steps`` < the chain's steps: the *fast* sampler on the chain respaced to ``num_steps``. It still draws
    the fine chain's number of step noises (so the random stream, a replay record and everything sampled after
    this call match the exact sampler) and couples its coarse-step noise to them (:func:`_noise_coupling`).

    ``compile=True`` wraps the per-step function in ``torch.compile`` (on CUDA with ``mode="reduce-overhead"``,
    i.e. CUDA graphs). Untested on CUDA here; on CPU it runs but did not pay (see ``docs/performance.md``).
    """

    def __init__(
        self,
        net: nn.Module,
        scheduler: ADMScheduler,
        *,
        num_steps: int | None = None,
        compile: bool = False,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        self.net = net
        self.token_dim = net.token_dim
        self.chunk_bytes = int(chunk_bytes)
        fine = scheduler
        self.num_draws = fine.num_timesteps
        if num_steps is None or num_steps == fine.num_timesteps:
            chain, coupling = fine, None
        else:
            if not 1 <= num_steps < fine.num_timesteps:
                raise ValueError(
                    f"num_steps must be between 1 and the head's {fine.num_timesteps} sampling steps, got {num_steps}"
                )
            chain = fine.respaced(num_steps)  # a copy: the scheduler given is not touched
            coupling = _noise_coupling(fine, chain)
        self.num_steps = chain.num_timesteps
        self._timesteps = chain.timestep_map
        self._coupling = coupling
        tables = chain.tables
        # mean = c1·(a·x − b·ε) + c2·x = A·x − B·ε; log-variance = min + (v+1)/2·(max − min), std = exp(½·log-var)
        a, b = tables["sqrt_recip_alphas_cumprod"], tables["sqrt_recipm1_alphas_cumprod"]
        c1, c2 = tables["posterior_mean_coef1"], tables["posterior_mean_coef2"]
        low, high = tables["posterior_log_variance_clipped"], tables["log_betas"]
        self._scalars = {"A": c1 * a + c2, "B": c1 * b, "P": (low + high) / 4, "Q": (high - low) / 4}
        self.compiled = compile
        self._constants: dict = {}
        self._weights_key = None
        self._weights = None

    # ----------------------------------------------------------------------------------- derived constants
    def _schedule_constants(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._constants:
            kw = dict(device=device, dtype=dtype)
            # one 0-d tensor per step and coefficient: no indexing or host→device copy inside the loop
            coefficients = [
                tuple(torch.tensor(float(self._scalars[name][i]), **kw) for name in ("A", "B", "P", "Q"))
                for i in range(self.num_steps)
            ]
            coupling = torch.from_numpy(self._coupling).to(**kw) if self._coupling is not None else None
            self._constants[key] = (coefficients, coupling)
        return self._constants[key]

    def _weight_constants(self, device: torch.device, dtype: torch.dtype):
        """The per-weights constants, rebuilt when a parameter's storage, version, device or dtype changed."""
        net = self.net
        key = (device, dtype, tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in net.parameters()))
        if key == self._weights_key:
            return self._weights
        kw = dict(device=device, dtype=dtype)

        def param(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.detach().to(**kw)

        t = self._timesteps.to(device)
        time_embedding = net.time_embed(net.time_proj(t).to(dtype)).to(dtype)  # (K, W)
        modulations = [block.adaLN_modulation[-1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]
        mod_weight = torch.cat([m.weight for m in modulations]).detach().to(**kw)
        mod_bias = torch.cat([m.bias for m in modulations]).detach().to(**kw).clone()
        width = net.cond_embed.out_features
        for j in range(len(net.res_blocks) + 1):  # columns: [shift, scale, gate] per block, [shift, scale] final
            mod_bias[3 * width * j + width : 3 * width * j + 2 * width] += 1
        blocks = [
            (
                param(block.in_ln.weight), param(block.in_ln.bias), block.in_ln.eps,
                param(block.mlp[0].weight), param(block.mlp[0].bias),
                param(block.mlp[2].weight), param(block.mlp[2].bias),
            )
            for block in net.res_blocks
        ]
        final = net.final_layer
        self._weights = dict(
            time_embedding=time_embedding, mod_weight=mod_weight, mod_bias=mod_bias, width=width,
            cond=(param(net.cond_embed.weight), param(net.cond_embed.bias)),
            input=(param(net.input_proj.weight), param(net.input_proj.bias)),
            blocks=blocks, final=(final.norm_final.eps, param(final.linear.weight), param(final.linear.bias)),
        )
        # under offload the weights are materialised for this call only: keep nothing that outlives it
        self._weights_key = None if _is_offloaded(net) else key
        return self._weights

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
        device = c.device
        with live_weights(self.net, device):
            dtype = self.net.cond_embed.weight.dtype
            weights = self._weight_constants(device, dtype)
            coefficients, coupling = self._schedule_constants(device, sampling_dtype(dtype))
            return self._sample(c.to(dtype), weights, coefficients, coupling, temperature, guidance_scale,
                                random_source, row_groups)

    def _sample(self, c, weights, coefficients, coupling, temperature, guidance_scale, random_source, row_groups):
        random_source = default_random_source(random_source)
        guided = is_guided(guidance_scale)
        rows, device, dtype = c.shape[0], c.device, c.dtype
        chain_dtype = sampling_dtype(dtype)  # as sample(): the chain in float32 at least
        shape = (rows, self.token_dim)
        x = initial_noise(random_source, rows, self.token_dim, guided, row_groups, device, dtype).to(chain_dtype)
        # every step's noise, drawn in the order sample() draws it (index K-1-i holds step i's)
        noise = torch.stack([random_source.randn(shape, device, dtype, row_groups) for _ in range(self.num_draws)])
        noise = noise.to(chain_dtype)
        noise = noise.flip(0)  # index i: step i
        if coupling is not None:
            noise = torch.einsum("jk,knc->jnc", coupling, noise)
        if temperature != 1.0:
            noise = noise * temperature
        scale = guidance_scale if guided else None
        step = _compiled_step(device.type) if self.compiled else _fused_denoise_step

        mod_weight, mod_bias, width = weights["mod_weight"], weights["mod_bias"], weights["width"]
        cond = F.linear(c, *weights["cond"])  # (N, W): once per call instead of once per step
        row_bytes = rows * mod_weight.shape[0] * mod_weight.element_size()
        chunk = max(1, min(self.num_steps, self.chunk_bytes // max(row_bytes, 1)))
        top = self.num_steps
        while top > 0:
            bottom = max(0, top - chunk)
            # modulations of steps bottom … top-1 in one matrix product: (S, N, W) → (S, N, M)
            y = F.silu(weights["time_embedding"][bottom:top, None, :] + cond[None])
            mods = F.linear(y, mod_weight, mod_bias).view(top - bottom, rows, -1, width)  # (S, N, 3·depth+2, W)
            for i in reversed(range(bottom, top)):
                if self.compiled and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                x = step(
                    x, mods[i - bottom], *coefficients[i], noise[i] if i else None, scale, weights["input"],
                    weights["blocks"], weights["final"], self.token_dim,
                )
                if self.compiled:
                    x = x.clone()  # a CUDA-graph output is overwritten by the next replay
            top = bottom
        return x.to(dtype)


def _is_offloaded(module: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def default_random_source(random_source: RandomSource | None) -> RandomSource:
    if random_source is not None:
        return random_source
    from harmon.randomness import GeneratorRandomSource

    return GeneratorRandomSource(None)


def initial_noise(
    random_source: RandomSource, rows: int, channels: int, guided: bool, row_groups: int, device, dtype
) -> torch.Tensor:
    """The first draw of a head sampling call (both samplers): ``(rows, channels)`` noise; with guidance one
    draw for the cond half, repeated for the uncond half."""
    if guided:
        half = random_source.randn((rows // 2, channels), device, dtype, max(row_groups // 2, 1))
        return torch.cat([half, half])
    return random_source.randn((rows, channels), device, dtype, row_groups)


def is_guided(guidance_scale: float | torch.Tensor) -> bool:
    if isinstance(guidance_scale, torch.Tensor):
        return bool((guidance_scale != 1.0).any())
    return guidance_scale != 1.0


__all__ = ["FusedAncestralSampler", "default_random_source", "initial_noise", "is_guided"]

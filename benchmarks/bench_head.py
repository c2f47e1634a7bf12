"""Ablation of the head's sampling loop: what each idea of the fused (exact) sampler buys, one at a time.

One head call = the K-step ancestral loop for the N token rows a MAR step predicts (CFG: N/2 cond + N/2
uncond rows). Variants, each adding one idea to the previous:

1. ``plain``        ``MLPAdaLNDiffusionHead.sample`` (the reference loop);
2. ``hoisted``      ``cond_embed(c)`` and the K timestep embeddings computed once per call, the K posterior
                    coefficients as precomputed scalars (no table lookups, no ``torch.full`` per step); the
                    denoiser blocks still run as modules on ``y`` (each computes its own adaLN modulation);
3. ``fused-1step``  the fused step of :class:`~harmon.heads.diffusion.FusedAncestralSampler`, but the adaLN
                    modulations computed step by step (``chunk_bytes=1``: one ``(N, W) × (W, (3·depth+2)·W)``
                    product per step instead of ``depth + 1``);
4. ``fused``        all K steps' modulations in one product per call (the default exact sampler);
5. ``fused+compile`` (``--compile``) the step under ``torch.compile``.

Prints a table and writes ``<out>/bench_head_<device>.json``. ``python benchmarks/bench_head.py --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_generate import device_description  # the sibling script (run as python benchmarks/bench_head.py)
from harmon.heads.diffusion import MLPAdaLNDiffusionHead
from harmon.threads import add_threads_argument, apply_threads, load_average
from harmon.randomness import GeneratorRandomSource

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HEADS = {  # name: (cond_dim, width, depth)
    "mid (3×512)": (384, 512, 3),
    "harmon-0.5b (6×1024)": (768, 1024, 6),
}


def build_head(cond_dim: int, width: int, depth: int, steps: int) -> MLPAdaLNDiffusionHead:
    torch.manual_seed(0)
    head = MLPAdaLNDiffusionHead(cond_dim=cond_dim, width=width, depth=depth, num_sampling_steps=steps).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.02)
    return head


@torch.no_grad()
def hoisted_sample(head, c, temperature, guidance_scale, source, row_groups):
    """Variant 2: the plain loop with per-call constants hoisted, blocks still run as modules."""
    net, diffusion = head.net, head.sample_diffusion
    rows, channels = c.shape[0], head.token_dim
    t = diffusion.timestep_map
    time_embedding = net.time_embed(net.time_proj(t).to(c.dtype))
    cond = net.cond_embed(c)
    tables = {name: torch.from_numpy(values).to(c.dtype) for name, values in diffusion.tables.items()}
    half_noise = source.randn((rows // 2, channels), c.device, c.dtype, max(row_groups // 2, 1))
    x = torch.cat([half_noise, half_noise])
    for i in reversed(range(diffusion.num_timesteps)):
        y = time_embedding[i] + cond
        half = x[: rows // 2]
        h = net.input_proj(torch.cat([half, half]))
        for block in net.res_blocks:
            h = block(h, y)
        out = net.final_layer(h, y)
        eps, v = out[:, :channels], out[:, channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        eps = torch.cat([guided, guided])
        frac = (v + 1) / 2
        log_variance = frac * tables["log_betas"][i] + (1 - frac) * tables["posterior_log_variance_clipped"][i]
        x0 = tables["sqrt_recip_alphas_cumprod"][i] * x - tables["sqrt_recipm1_alphas_cumprod"][i] * eps
        mean = tables["posterior_mean_coef1"][i] * x0 + tables["posterior_mean_coef2"][i] * x
        noise = source.randn((rows, channels), c.device, c.dtype, row_groups)
        x = mean + float(i != 0) * torch.exp(0.5 * log_variance) * noise * temperature
    return x


def time_call(function, repeats: int) -> tuple[float, float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 64, 224], help="N (CFG rows) per head call")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    add_threads_argument(parser)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    results = []
    for head_name in args.heads:
        head = build_head(*HEADS[head_name], args.steps)
        cond_dim = HEADS[head_name][0]
        variants = {
            "plain": head.sample,
            "hoisted": lambda *a: hoisted_sample(head, *a),
            "fused-1step": head.prepare_sampler(chunk_bytes=1),
            "fused": head.prepare_sampler(),
        }
        if args.compile:
            variants["fused+compile"] = head.prepare_sampler(compile=True)
        for rows in args.rows:
            c = torch.randn(rows, cond_dim, generator=torch.Generator().manual_seed(rows))
            reference = None
            for name, sampler in variants.items():
                def call():
                    return sampler(c, 1.0, 3.0, GeneratorRandomSource(torch.Generator().manual_seed(1)), 2)

                out = call()
                reference = out if reference is None else reference
                difference = float((out - reference).norm() / reference.norm())
                median, best = time_call(call, args.repeats)
                results.append(dict(head=head_name, rows=rows, variant=name, median_ms=median * 1e3,
                                    min_ms=best * 1e3, rel_diff_to_plain=difference))
                print(f"{head_name:>22} N={rows:<4} {name:>14}: median {median * 1e3:9.1f} ms  min {best * 1e3:9.1f} ms"
                      f"  rel. diff to plain {difference:.1e}", flush=True)
    for r in results:
        plain = next(p for p in results if p["head"] == r["head"] and p["rows"] == r["rows"] and p["variant"] == "plain")
        r["speedup_vs_plain"] = plain["median_ms"] / r["median_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(device=device_description(torch.device("cpu")), torch=torch.__version__,
                  threads=torch.get_num_threads(), load_average_at_end=load_average(), steps=args.steps,
                  results=results)
    (args.out / f"bench_head_cpu_{torch.get_num_threads()}t.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Text → image sampling benchmark: the plain sampler against the exact (fused) and fast ones, in the same run.

For each model config × image size × batch it runs every sampler mode, interleaved (plain, exact, fast, plain, …)
so that drift of the machine's load hits all modes alike, after one warm-up run each, and reports per mode:

* median wall time of the pipeline's sampling loop ("tokens"), of the VAE decode and of both ("total"), images/s;
* the ratio against the plain sampler (tokens and total), measured in this run;
* per phase (prefill, MAR encoder, LLM steps, MAR decoder, head, VAE decode, rest) from one extra instrumented
  run (hooks around those calls; synchronised on CUDA), apart from the timed runs so hooks do not distort them;
* peak memory of that run: CUDA ``max_memory_allocated``; CPU the peak RSS (psutil, sampled every 2 ms) above the
  RSS before the run.

``--quality`` adds the fast modes' cost against the exact sampler on the same prompts and seeds (latent relative
MSE, pixel PSNR), next to the same numbers for the exact sampler under another seed (what "a different sample"
scores). Models have random weights (the head's zero-initialised output layers get small random values so that
samples depend on the prompt); prompts are random token ids.

Results: ``<out>/bench_<device>.json`` and ``.md``. The script asserts nothing about speed.

    python benchmarks/bench_generate.py                      # tiny + mid, 256², batch 1 and 16
    python benchmarks/bench_generate.py --configs mid --sizes 256 512 --batches 1 --quality
    python benchmarks/bench_generate.py --full               # adds harmon-0.5b / harmon-1.5b (slow on CPU)
    python benchmarks/bench_generate.py --quick --out /tmp/b # seconds: tiny, 64², smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from harmon.configs import ComponentSpec, HarmonConfig
from harmon.encoders.vae import KLAutoencoderConfig
import harmon.pipelines.pipeline_harmon as pipeline_module
from harmon.model import HarmonModel
from harmon.pipelines import HarmonPipeline
from harmon.testing import generate_tokens, prompt_rows, tiny_tokenizer
from harmon.threads import add_threads_argument, apply_threads, load_average

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PHASES = ("prefill", "encoder", "llm", "decoder", "head", "vae", "rest")


# ------------------------------------------------------------------------------------------------- configs
def mid_config(image_size: int = 256) -> HarmonConfig:
    """A mid-size model: Qwen2 4×512 (8 heads, 2 KV heads), MAR encoder/decoder 4×384, head 3×512, 100 head
    steps, the full-size KL-16 VAE."""
    grid = image_size // 16
    mar = dict(buffer_size=64, base_grid=(grid, grid), num_heads=6, depth=4)
    return HarmonConfig.from_preset(
        "tiny",
        encoder=ComponentSpec(name="mar", config=dict(token_dim=16, embed_dim=384, **mar)),
        decoder=ComponentSpec(name="mar", config=dict(encoder_dim=384, embed_dim=384, **mar)),
        head=ComponentSpec(name="mlp-adaln", config=dict(cond_dim=384, width=512, depth=3, num_sampling_steps=100)),
        backbone=ComponentSpec(name="qwen2", config=dict(
            vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096)),
        vae=KLAutoencoderConfig(),
        image_size=image_size,
    )


CONFIGS = {
    "tiny": lambda: HarmonConfig.from_preset("tiny"),
    "mid": mid_config,
    "harmon-0.5b": lambda: HarmonConfig.from_preset("harmon-0.5b"),
    "harmon-1.5b": lambda: HarmonConfig.from_preset("harmon-1.5b"),
}
BIG = ("harmon-0.5b", "harmon-1.5b")


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HarmonModel:
    torch.manual_seed(seed)
    model = HarmonModel.from_config(CONFIGS[name]())
    with torch.no_grad():  # MAR zero-initialises the head's output layers: a zero head would predict ε = 0
        for parameter in model.head.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def prompt_batch(model: HarmonModel, batch: int, guided: bool, seed: int = 1234, length: int = 24):
    """Right-padded random prompts ``[cond; uncond]``: cond rows of varied length, one shared uncond row."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    rows = [torch.randint(3, vocab, (length - (i % 5),), generator=generator).tolist() for i in range(batch)]
    uncond = torch.randint(3, vocab, (8,), generator=generator).tolist() if guided else None
    return prompt_rows(rows, uncond)


# ------------------------------------------------------------------------------------------------- modes
def mode_kwargs(mode: str) -> dict:
    """``plain`` / ``exact`` / ``fast`` (the head's default fast steps) / ``fast-N`` (N head steps)."""
    if mode.startswith("fast-"):
        return dict(sampler="fast", head_steps=int(mode.split("-", 1)[1]))
    return dict(sampler=mode)


def head_steps_of(model: HarmonModel, mode: str) -> int:
    kwargs = mode_kwargs(mode)
    if kwargs["sampler"] != "fast":
        return model.head.sample_diffusion.num_timesteps
    return model.head.prepare_sampler(kwargs.get("head_steps"), fast=True).num_steps


# ------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PIPELINES: dict[int, HarmonPipeline] = {}


def pipeline_of(model: HarmonModel) -> HarmonPipeline:
    """One pipeline per benchmarked model (built once, outside the timed region): the sampling loop is its."""
    if id(model) not in _PIPELINES:
        pipe = HarmonPipeline.from_model(model, tiny_tokenizer())
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[id(model)] = pipe
    return _PIPELINES[id(model)]


def run_once(model, ids, mask, *, image_shape, num_steps, guidance, mode, seed, device):
    """One text → image run: (tokens seconds, VAE seconds, tokens, pixels)."""
    generator = torch.Generator().manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    tokens = generate_tokens(
        model, ids, mask, image_shape=image_shape, num_steps=num_steps, guidance_scale=guidance, generator=generator,
        pipeline=pipeline_of(model), **mode_kwargs(mode),
    )
    synchronize(device)
    middle = time.perf_counter()
    pixels = model.decode_tokens(tokens)
    synchronize(device)
    return middle - start, time.perf_counter() - middle, tokens, pixels


class PhaseTimer:
    """Times the phases of one run by wrapping the model's calls (instance attributes and forward hooks)."""

    def __init__(self, model: HarmonModel, device: torch.device) -> None:
        self.model, self.device = model, device
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}
        self._in_prefill = False
        self._undo = []

    def _start(self, phase: str) -> None:
        synchronize(self.device)
        self._open[phase] = time.perf_counter()

    def _stop(self, phase: str) -> None:
        synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - self._open.pop(phase)

    def _timed(self, phase: str, function):
        def wrapper(*args, **kwargs):
            self._start(phase)
            try:
                return function(*args, **kwargs)
            finally:
                self._stop(phase)

        return wrapper

    def _hook(self, module: torch.nn.Module, phase: str) -> None:
        def before(*_):
            if not self._in_prefill:
                self._start(phase)

        def after(*_):
            if not self._in_prefill:
                self._stop(phase)

        self._undo += [module.register_forward_pre_hook(before).remove, module.register_forward_hook(after).remove]

    def __enter__(self) -> "PhaseTimer":
        model = self.model
        prefill = pipeline_module.prefill  # the loop's prefill

        def timed_prefill(*args, **kwargs):
            self._in_prefill = True
            try:
                return self._timed("prefill", prefill)(*args, **kwargs)
            finally:
                self._in_prefill = False

        head = model.head
        sample, prepare = head.sample, getattr(head, "prepare_sampler", None)
        pipeline_module.prefill = timed_prefill
        head.sample = self._timed("head", sample)
        if prepare is not None:
            head.prepare_sampler = lambda *a, **k: self._timed("head", prepare(*a, **k))
        model.decode_tokens = self._timed("vae", model.decode_tokens)
        self._hook(model.encoder, "encoder")
        self._hook(model.llm.get_decoder(), "llm")
        self._hook(model.decoder, "decoder")
        self._undo += [lambda: setattr(pipeline_module, "prefill", prefill), lambda: delattr(model, "decode_tokens"),
                       lambda: delattr(head, "sample")]
        if prepare is not None:
            self._undo.append(lambda: delattr(head, "prepare_sampler"))
        return self

    def __exit__(self, *exc) -> None:
        for undo in self._undo:
            undo()


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds ``peak_mb`` (CUDA: max allocated; CPU: peak RSS above the start) afterwards."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        result["kind"] = "cuda max_memory_allocated above start"
        return
    try:
        import psutil
    except ImportError:  # the process-wide high-water mark; cannot be reset, so only an upper bound
        import resource

        yield result
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["kind"] = "process ru_maxrss (psutil missing)"
        return
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result["peak_mb"] = (peak[0] - base) / 2**20
        result["kind"] = "RSS above start (psutil, 2 ms polling)"


# ------------------------------------------------------------------------------------------------- one case
def bench_case(model, name, size, batch, modes, args, device) -> dict:
    grid = (size // model.config.latent_stride,) * 2
    ids, mask = prompt_batch(model, batch, guided=args.guidance != 1.0)
    common = dict(image_shape=grid, num_steps=min(args.num_steps, grid[0] * grid[1]), guidance=args.guidance,
                  device=device)
    samples: dict[str, dict[str, list[float]]] = {m: {"tokens": [], "vae": []} for m in modes}
    for mode in modes:  # warm-up
        for _ in range(args.warmup):
            run_once(model, ids, mask, mode=mode, seed=0, **common)
    memories: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for mode in modes:
            if not args.phases and repeat == 0:  # no instrumented run: peak memory from the first timed one
                with peak_memory(device) as memory:
                    tokens_s, vae_s, *_ = run_once(model, ids, mask, mode=mode, seed=repeat, **common)
                memories[mode] = memory
            else:
                tokens_s, vae_s, *_ = run_once(model, ids, mask, mode=mode, seed=repeat, **common)
            samples[mode]["tokens"].append(tokens_s)
            samples[mode]["vae"].append(vae_s)
            print(f"  {name} {size}² b{batch} {mode:>8}: tokens {tokens_s:8.3f} s  vae {vae_s:6.3f} s", flush=True)
    out = {}
    for mode in modes:
        if args.phases:
            timer = PhaseTimer(model, device)
            with peak_memory(device) as memory, timer:
                tokens_s, vae_s, *_ = run_once(model, ids, mask, mode=mode, seed=0, **common)
            phases = dict(timer.seconds)
            phases["rest"] = max(0.0, tokens_s + vae_s - sum(phases.values()))
            phases = {p: phases.get(p, 0.0) for p in PHASES}
        else:
            memory, phases = memories[mode], None
        tokens = statistics.median(samples[mode]["tokens"])
        vae = statistics.median(samples[mode]["vae"])
        total = statistics.median([t + v for t, v in zip(samples[mode]["tokens"], samples[mode]["vae"])])
        out[mode] = dict(
            head_steps=head_steps_of(model, mode),
            tokens_s=tokens, vae_s=vae, total_s=total, images_per_s=batch / total,
            tokens_min_s=min(samples[mode]["tokens"]),
            tokens_runs_s=samples[mode]["tokens"], vae_runs_s=samples[mode]["vae"],
            phases_s=phases, peak_memory_mb=memory["peak_mb"],
            peak_memory_kind=memory["kind"],
        )
    if "plain" in out:
        for mode in modes:
            out[mode]["speedup_tokens"] = out["plain"]["tokens_s"] / out[mode]["tokens_s"]
            out[mode]["speedup_total"] = out["plain"]["total_s"] / out[mode]["total_s"]
    return dict(config=name, size=size, grid=list(grid), batch=batch, mar_steps=common["num_steps"],
                guidance=args.guidance, modes=out)


# ------------------------------------------------------------------------------------------------- quality
def quality(model, name, size, prompts, fast_modes, args, device) -> dict:
    """Fast modes against the exact sampler on the same prompts and seeds (one generator per image).

    With random weights this is indicative only: an untrained head's ε hardly depends on x, so the step count
    matters less than it would for a trained head (a head briefly fitted to synthetic data was tried and dropped:
    its x₀ estimate at t ≈ 999, where 1/√ᾱ ≈ 600 amplifies every ε error, made samples blow up)."""
    grid = (size // model.config.latent_stride,) * 2
    ids, mask = prompt_batch(model, prompts, guided=args.guidance != 1.0, seed=99)
    num_steps = min(args.num_steps, grid[0] * grid[1])

    def sample(mode: str, seed: int):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(prompts)]
        start = time.perf_counter()
        tokens = generate_tokens(model, ids, mask, image_shape=grid, num_steps=num_steps,
                                 guidance_scale=args.guidance, generator=generators, pipeline=pipeline_of(model),
                                 **mode_kwargs(mode))
        seconds = time.perf_counter() - start
        return tokens.float(), model.decode_tokens(tokens).float().clamp(-1, 1), seconds

    reference_tokens, reference_pixels, reference_s = sample("exact", 0)

    def compare(tokens, pixels) -> dict:
        latent = float(((tokens - reference_tokens) ** 2).mean() / (reference_tokens**2).mean())
        mse = ((pixels - reference_pixels) ** 2).flatten(1).mean(1)
        psnr = [10 * math.log10(4.0 / max(float(v), 1e-12)) for v in mse]  # pixels span [-1, 1]: peak² = 4
        return dict(latent_rel_mse=latent, pixel_psnr_db=statistics.mean(psnr), pixel_psnr_db_per_image=psnr)

    rows = {"exact (reference)": dict(head_steps=head_steps_of(model, "exact"), tokens_s=reference_s,
                                      latent_rel_mse=0.0, pixel_psnr_db=math.inf)}
    for mode in fast_modes:
        tokens, pixels, seconds = sample(mode, 0)
        rows[mode] = dict(head_steps=head_steps_of(model, mode), tokens_s=seconds, **compare(tokens, pixels))
    tokens, pixels, seconds = sample("exact", 1000)
    rows["exact, other seed"] = dict(head_steps=head_steps_of(model, "exact"), tokens_s=seconds,
                                     **compare(tokens, pixels))
    plain_tokens, plain_pixels, seconds = sample("plain", 0)
    rows["plain, same seed"] = dict(head_steps=head_steps_of(model, "plain"), tokens_s=seconds,
                                    **compare(plain_tokens, plain_pixels))
    return dict(config=name, size=size, prompts=prompts, mar_steps=num_steps, guidance=args.guidance, rows=rows)


# ------------------------------------------------------------------------------------------------- report
def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads)"


def markdown(report: dict) -> str:
    lines = [
        f"# Text → image sampling benchmark — {report['device']}",
        "",
        f"torch {report['torch']}, {report['dtype']}, MAR steps {report['args']['num_steps']}, "
        f"CFG {report['args']['guidance']} (constant), median of {report['args']['repeats']} runs after "
        f"{report['args']['warmup']} warm-up run(s), modes interleaved. Random weights, random prompt ids. "
        "Speed-up = plain time / mode time, same run. Phases from one extra instrumented run "
        "(– : not run, `--no-phases`).",
        f"{report.get('threads', '?')} torch threads; load average at the start {report.get('load_average_at_start')}.",
        "",
        "| config | size | batch | mode | head steps | tokens s | VAE s | total s | img/s | × plain (tokens) "
        "| × plain (total) | prefill | encoder | LLM | decoder | head | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for mode, r in case["modes"].items():
            p = r["phases_s"] or {}
            phase = {k: f"{p[k]:.3f}" if k in p else "–" for k in PHASES}
            lines.append(
                f"| {case['config']} | {case['size']}² | {case['batch']} | {mode} | {r['head_steps']} "
                f"| {r['tokens_s']:.3f} | {r['vae_s']:.3f} | {r['total_s']:.3f} | {r['images_per_s']:.3f} "
                f"| {r.get('speedup_tokens', float('nan')):.2f} | {r.get('speedup_total', float('nan')):.2f} "
                f"| {phase['prefill']} | {phase['encoder']} | {phase['llm']} | {phase['decoder']} | {phase['head']} "
                f"| {r['peak_memory_mb']:.0f} |"
            )
    if report.get("quality"):
        lines += [
            "",
            "## Quality of the fast modes (same prompts, same seeds, against the exact sampler)",
            "",
            "Latent relative MSE = mean((x − x_exact)²) / mean(x_exact²) over all tokens; PSNR on the decoded "
            "pixels clipped to [−1, 1]. `exact, other seed` is what a *different* sample scores. Random weights: "
            "an untrained head's ε hardly depends on x, so this understates what fewer steps cost a trained model.",
            "",
            "| config | size | prompts | sampler | head steps | tokens s (batch) | latent rel. MSE | pixel PSNR dB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for q in report["quality"]:
            for mode, r in q["rows"].items():
                lines.append(
                    f"| {q['config']} | {q['size']}² | {q['prompts']} | {mode} | {r['head_steps']} | "
                    f"{r['tokens_s']:.2f} | {r['latent_rel_mse']:.3g} | {r['pixel_psnr_db']:.1f} |"
                )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--full", action="store_true", help="also harmon-0.5b and harmon-1.5b (slow on CPU)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256], help="image sizes in pixels (square)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["plain", "exact", "fast-50", "fast"],
                        help="plain, exact, fast (the head's default), fast-N (N head steps)")
    parser.add_argument("--num-steps", type=int, default=64, help="MAR steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    add_threads_argument(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quality", action="store_true", help="measure the fast modes' cost (mid config, 256²)")
    parser.add_argument("--quality-config", default="mid", choices=sorted(CONFIGS))
    parser.add_argument("--quality-prompts", type=int, default=4)
    parser.add_argument("--no-phases", dest="phases", action="store_false",
                        help="skip the instrumented per-phase run (long cases); peak memory from the first timed run")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny, 64², batch 1, 1 run, fast modes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.sizes, args.batches = ["tiny"], [64], [1]
        args.modes, args.num_steps, args.repeats, args.warmup = ["plain", "exact", "fast"], 4, 1, 0
        args.quality_config, args.quality_prompts = "tiny", 2
    if args.full:
        args.configs = list(dict.fromkeys([*args.configs, *BIG]))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    apply_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    report = dict(device=device_description(device), device_type=device.type, torch=torch.__version__,
                  dtype=args.dtype, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  threads=torch.get_num_threads(), load_average_at_start=load_average(), cases=[], quality=[])
    for name in args.configs:
        model = build_model(name, device, dtype)
        configured = model.head.sample_diffusion.num_timesteps
        modes = [m for m in args.modes if not (m.startswith("fast-") and int(m.split("-")[1]) >= configured)]
        for size in args.sizes:
            for batch in args.batches:
                print(f"{name} {size}² batch {batch}: modes {modes}", flush=True)
                report["cases"].append(bench_case(model, name, size, batch, modes, args, device))
        if args.quality and name == args.quality_config:
            fast_modes = [m for m in modes if m.startswith("fast")]
            size = 64 if args.quick else 256
            print(f"quality: {name} {size}², {args.quality_prompts} prompts, {fast_modes}", flush=True)
            report["quality"].append(quality(model, name, size, args.quality_prompts, fast_modes, args, device))
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in report["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stem = f"bench_{device.type}_{slug}{('_' + args.tag) if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / (stem + '.json')} and .md")
    return report


if __name__ == "__main__":
    main()

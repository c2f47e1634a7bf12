"""Benchmark sample layouts with a Harmon pipeline, and FID between two folders.

``harmon bench geneval|dpg|wise|mjhq|fid`` (also ``python -m harmon.evaluation.cli …``): write a benchmark's
sample layout with a pipeline, or compute FID between two folders. Writers split their prompts across processes
under ``accelerate launch -m harmon.evaluation.cli …`` and resume where a previous run stopped."""

from __future__ import annotations

import argparse
import json
import sys

from harmon.cli import add_sampling_arguments


def _pipeline_and_sampler(args):
    import torch

    from harmon.evaluation.common import launch_state, pipeline_sampler
    from harmon.pipelines import HarmonPipeline

    state = launch_state()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = HarmonPipeline.from_pretrained(args.pipeline, dtype=dtype).to(args.device or state.device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
                temperature=args.temperature, sampler=args.sampler, head_steps=args.head_steps)
    progress = None
    if state.is_local_main_process:
        from tqdm.auto import tqdm

        progress = lambda items: tqdm(items, desc=args.benchmark, dynamic_ncols=True)  # noqa: E731
    return pipeline_sampler(pipe, **call), progress


def _report(args, report) -> int:
    print(json.dumps({"benchmark": args.benchmark, "outdir": str(args.outdir), "total": report.total,
                      "written": len(report.written), "skipped": len(report.skipped)}))
    return 0


def cmd_geneval(args) -> int:
    from harmon.evaluation.geneval import write_geneval

    sampler, progress = _pipeline_and_sampler(args)
    return _report(args, write_geneval(args.metadata, args.outdir, sampler, n_samples=args.n_samples, grid=args.grid,
                                       seed=args.seed, progress=progress))


def cmd_dpg(args) -> int:
    from harmon.evaluation.dpg import write_dpg

    sampler, progress = _pipeline_and_sampler(args)
    return _report(args, write_dpg(args.prompts, args.outdir, sampler, seed=args.seed, progress=progress))


def cmd_wise(args) -> int:
    from harmon.evaluation.wise import write_wise

    sampler, progress = _pipeline_and_sampler(args)
    return _report(args, write_wise(args.prompt_files, args.outdir, sampler, seed=args.seed, progress=progress))


def cmd_mjhq(args) -> int:
    from harmon.evaluation.mjhq import write_mjhq

    sampler, progress = _pipeline_and_sampler(args)
    return _report(args, write_mjhq(args.metadata, args.outdir, sampler, categories=args.category, seed=args.seed,
                                    progress=progress))


def cmd_fid(args) -> int:
    from harmon.evaluation.fid import folder_fid

    if args.inception_weights is None:
        raise ValueError("--inception-weights: give the local FID Inception-v3 weights "
                         "(pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    result = folder_fid(args.generated, args.reference, per_category=args.per_category,
                        weights_path=args.inception_weights, image_size=args.image_size,
                        batch_size=args.batch_size, device=args.device or "cpu")
    text = json.dumps(result, indent=1)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmon bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)

    geneval = sub.add_parser("geneval", help="GenEval: <outdir>/<index:05d>/{metadata.jsonl,samples/<k:04d>.png}")
    geneval.add_argument("metadata", help="GenEval's prompts/evaluation_metadata.jsonl")
    geneval.add_argument("--n-samples", type=int, default=4, help="samples per prompt (4)")
    geneval.add_argument("--grid", action="store_true", help="also write grid.png per prompt")
    geneval.set_defaults(func=cmd_geneval)

    dpg = sub.add_parser("dpg", help="DPG-Bench: <outdir>/<item_id>.png, a 2x2 grid of 4 samples")
    dpg.add_argument("prompts", help="ELLA's dpg_bench/prompts folder, dpg_bench.csv or a JSON {id: prompt}")
    dpg.set_defaults(func=cmd_dpg)

    wise = sub.add_parser("wise", help="WISE: <outdir>/<prompt_id>.png")
    wise.add_argument("prompt_files", nargs="+", help="WISE's data/*.json prompt files")
    wise.set_defaults(func=cmd_wise)

    mjhq = sub.add_parser("mjhq", help="MJHQ-30K: <outdir>/<category>/<id>.png (for fid --per-category)")
    mjhq.add_argument("metadata", help="MJHQ-30K's meta_data.json")
    mjhq.add_argument("--category", action="append", help="only this category (repeatable)")
    mjhq.set_defaults(func=cmd_mjhq)

    for command in (geneval, dpg, wise, mjhq):
        command.add_argument("pipeline", help="a HarmonPipeline folder")
        command.add_argument("--outdir", required=True)
        command.add_argument("--seed", type=int, default=0)
        add_sampling_arguments(command)
        command.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))

    fid = sub.add_parser("fid", help="FID between a generated and a reference folder (torchmetrics)")
    fid.add_argument("generated")
    fid.add_argument("reference")
    fid.add_argument("--inception-weights", help="local pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    fid.add_argument("--per-category", action="store_true", help="MJHQ-30K: one FID per sub-folder, and overall")
    fid.add_argument("--image-size", type=int, default=299)
    fid.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--out", help="also write the result JSON here")
    fid.set_defaults(func=cmd_fid, outdir=None)

    for command in (geneval, dpg, wise, mjhq, fid):
        command.add_argument("--device", help="default: this process's accelerate device (fid: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError, KeyError, ImportError) as error:
        print(f"harmon bench {args.benchmark}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

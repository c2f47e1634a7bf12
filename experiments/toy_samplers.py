"""Speed / quality of the samplers on harmon-toy: toy GenEval score and generation time, same run.

    python -m experiments.toy_samplers                     # the shipped harmon-toy, 40 prompts, seed 0
    python -m experiments.toy_samplers --pipeline runs/harmon-toy/harmon-toy --prompts 40 --seeds 0 1

Rows, for a head chain of K denoising steps (the scheduler's ``num_sampling_steps``; harmon-toy: 1000, Harmon:
100): the exact sampler at 64 MAR steps (K head steps), the fast sampler at K/2 and K/4 head steps and at the
issue's 50 and 25 (the same rows when K = 100), and the exact sampler at 32 and 16 MAR steps (``--mar-steps``
for others; ``--no-fast`` leaves the fast rows out). Each row generates
the same prompts with the same seeds; times are the pipeline calls only (`harmon.toy.eval.geneval`), in the order
listed, one process. Public API only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from harmon.pipelines import HarmonPipeline
from harmon.toy.eval import CATEGORIES, default_scorer, geneval

def sampler_rows(chain: int, mar_steps: tuple[int, ...] = (32, 16), fast: bool = True) -> list[tuple[str, dict]]:
    """The table's rows for a head chain of ``chain`` steps (see the module docstring); ``mar_steps``: the exact
    sampler's rows with fewer MAR steps than the 64 of the baseline; ``fast=False`` leaves the fast rows out."""
    bad = [k for k in mar_steps if not 1 <= k < 64]
    if bad:
        raise ValueError(f"--mar-steps: each must be in [1, 64) (the baseline has 64), got {bad}")
    rows = [(f"exact, 64 MAR steps, {chain} head steps", dict(num_inference_steps=64, sampler="exact"))]
    for head_steps in dict.fromkeys((chain // 2, chain // 4, 50, 25)):
        if fast and 1 <= head_steps < chain:
            rows.append((f"fast, 64 MAR steps, {head_steps} head steps",
                         dict(num_inference_steps=64, sampler="fast", head_steps=head_steps)))
    for mar_steps in mar_steps:
        rows.append((f"exact, {mar_steps} MAR steps, {chain} head steps",
                     dict(num_inference_steps=mar_steps, sampler="exact")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="harmon-toy")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=Path("results/toy_samplers"))
    parser.add_argument("--mar-steps", type=int, nargs="+", default=[32, 16],
                        help="the exact sampler's rows with fewer MAR steps than the baseline's 64")
    parser.add_argument("--no-fast", action="store_true", help="leave the fast sampler's rows out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = HarmonPipeline.from_pretrained(args.pipeline)
    scorer = default_scorer()
    rows = []
    for name, kwargs in sampler_rows(pipe.scheduler.config.num_sampling_steps, tuple(args.mar_steps),
                                     fast=not args.no_fast):
        runs = [geneval(pipe, args.prompts, seed=seed, scorer=scorer, **kwargs) for seed in args.seeds]
        row = {"sampler": name, "seconds": float(np.mean([r.seconds for r in runs]))}
        for key in (*CATEGORIES, "overall"):
            values = [r.scores[key] for r in runs]
            row[key] = float(np.mean(values))
            row[key + "_std"] = float(np.std(values))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["seconds"]
    lines = ["| sampler | toy GenEval overall | single | colors | position | time (s) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['sampler']} | {row['overall']:.3f} ± {row['overall_std']:.3f} | {row['single_object']:.2f} | "
                     f"{row['colors']:.2f} | {row['position']:.2f} | {row['seconds']:.1f} | {base / row['seconds']:.2f}× |")
    table = "\n".join(lines)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "rows.json").write_text(json.dumps({"settings": vars(args) | {"output_dir": str(args.output_dir)},
                                                            "rows": rows}, indent=1))
    (args.output_dir / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

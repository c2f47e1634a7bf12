"""Toy GenEval before and after RecA post-training of harmon-toy, over several seeds (issue 17).

    python experiments/toy_reca.py --out runs/toy_reca --seeds 0 1 2 [--steps 300] [--count 40] [--control]
        [--pipeline harmon-toy] [--mar-steps 64]

1. the shipped ``harmon-toy`` pipeline (or ``--pipeline FOLDER``, a trained harmon-toy) is written as a model folder (``OUT/init``) and its training data
   (``harmon.toy.data.write_dataset``: caption layout + LLaVA) under ``OUT/data``;
2. for each seed ``s``: toy GenEval (``harmon.toy.eval.geneval``, prompt set and sampling seeded by ``s``) and the
   toy understanding benchmark of the shipped model; RecA post-training with
   ``experiments/configs/reca_harmon-toy.yaml`` (training seed ``s``); the same two measurements of the result;
3. with ``--control``: the same number of steps at the same learning rate on the toy's own stage-III mix
   (text 1 : image→text 3 : text→image 16) — what "more training" alone does;
4. ``OUT/results.json`` and a markdown table (mean ± standard deviation over the seeds) on stdout.

Public API only (the pipeline, the training engine, harmon.toy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from harmon.pipelines import HarmonPipeline
from harmon.training.config import load_config
from harmon.training.trainer import train

RECIPE = Path(__file__).resolve().parent / "configs" / "reca_harmon-toy.yaml"


def measure(pipe, seed: int, count: int, questions: int, mar_steps: int) -> dict:
    from harmon.toy.eval import geneval, understanding

    started = time.perf_counter()
    scores = dict(geneval(pipe, count, seed=seed, num_inference_steps=mar_steps).scores)
    scores["understanding"] = understanding(pipe, questions, seed=seed).scores["overall"]
    scores["seconds"] = time.perf_counter() - started
    return scores


def post_train(recipe: Path, out: Path, init: Path, data: Path, seed: int, steps: int, extra: list[str]) -> Path:
    overrides = [f"output_dir={out}", f"data.root={data}", f"model.pretrained={init}", f"seed={seed}",
                 f"training.max_steps={steps}", f"schedule.warmup_steps={max(1, steps // 100)}", *extra]
    result = train(load_config(recipe, overrides=overrides))
    return result.export_dir


def summary(rows: list[dict], keys: list[str]) -> dict[str, str]:
    return {k: f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}" for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_reca"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="post-training steps (the recipe's 300)")
    parser.add_argument("--count", type=int, default=40, help="toy GenEval prompts per seed")
    parser.add_argument("--questions", type=int, default=50, help="toy understanding canvases per seed")
    parser.add_argument("--num-images", type=int, default=4000, help="training canvases (the toy's own 4000)")
    parser.add_argument("--control", action="store_true", help="also post-train on the toy's stage-III mix")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", default="harmon-toy", help="the model before post-training (a pipeline folder)")
    parser.add_argument("--mar-steps", type=int, default=64, help="MAR steps of the toy GenEval samples (its 64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from harmon.toy.data import write_dataset
    from harmon.toy.train import RECIPES

    out = args.out
    base = HarmonPipeline.from_pretrained(args.pipeline)
    init = out / "init"
    base.model.save_pretrained(init)
    base.tokenizer.save_pretrained(str(init))
    data = write_dataset(out / "data", args.num_images, "train", 0)

    arms = {"reca": (RECIPE, [])}
    if args.control:
        rate = load_config(RECIPE, overrides=[f"model.pretrained={init}"], check_files=False).learning_rates
        arms["control"] = (RECIPES / "stage3.yaml", [f"learning_rates={json.dumps(rate)}"])
    results: dict = {"settings": vars(args) | {"out": str(out)}, "before": [], **{arm: [] for arm in arms}}
    for seed in args.seeds:
        results["before"].append({"seed": seed, **measure(base, seed, args.count, args.questions, args.mar_steps)})
        for arm, (recipe, extra) in arms.items():
            started = time.perf_counter()
            export = post_train(recipe, out / f"{arm}-seed{seed}", init, data, seed, args.steps, extra)
            seconds = time.perf_counter() - started
            pipe = HarmonPipeline.from_pretrained(export)
            results[arm].append({"seed": seed, "train_seconds": seconds,
                                 **measure(pipe, seed, args.count, args.questions, args.mar_steps)})
        (out / "results.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in results["before"][0] if k not in ("seed", "seconds")]
    print(f"| model | {' | '.join(keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    for arm in ("before", *arms):
        cells = summary(results[arm], keys)
        print(f"| {arm} | {' | '.join(cells[k] for k in keys)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

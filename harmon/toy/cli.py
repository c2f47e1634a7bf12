"""``harmon toy train`` (reproduce the shipped weights) and ``harmon toy eval`` (toy GenEval + understanding)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_toy_parser(subparsers) -> argparse.ArgumentParser:
    from harmon.toy.train import build_parser

    toy = subparsers.add_parser("toy", help="harmon-toy: train it from scratch, evaluate a pipeline")
    verbs = toy.add_subparsers(dest="toy_command", required=True)
    train = verbs.add_parser("train", help="train harmon-toy from scratch (data, VAE, reading warm-up, stages II "
                             "and III, answers, drawing, colour)")
    build_parser(train)
    train.set_defaults(func=cmd_train)
    evaluate = verbs.add_parser("eval", help="toy GenEval and understanding exact match of a pipeline")
    evaluate.add_argument("pipeline", nargs="?", default="harmon-toy")
    evaluate.add_argument("--prompts", type=int, default=40, help="GenEval prompts (half one digit, half two)")
    evaluate.add_argument("--images", type=int, default=50, help="held-out canvases for understanding")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--steps", type=int, default=64, help="MAR steps")
    evaluate.add_argument("--guidance-scale", type=float, default=3.0)
    evaluate.add_argument("--sampler", choices=("exact", "plain", "fast"), default="exact")
    evaluate.add_argument("--head-steps", type=int)
    evaluate.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    evaluate.add_argument("--out", type=Path, help="write scores.json and the images there")
    evaluate.set_defaults(func=cmd_eval)
    return toy


def cmd_train(args) -> int:
    from harmon.toy.train import run_from_args

    return run_from_args(args)


def cmd_eval(args) -> int:
    import torch

    from harmon.pipelines import HarmonPipeline
    from harmon.toy.eval import default_scorer, geneval, understanding

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = HarmonPipeline.from_pretrained(args.pipeline)
    extra = {"sampler": args.sampler, **({"head_steps": args.head_steps} if args.head_steps else {})}
    gen = geneval(pipe, args.prompts, seed=args.seed, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, **extra)
    und = understanding(pipe, args.images, seed=args.seed)
    report = {"geneval": gen.scores, "geneval_attributes": gen.attributes, "geneval_seconds": gen.seconds,
              "understanding": und.scores,
              "understanding_seconds": und.seconds, "scorer_accuracy": default_scorer().accuracy(),
              "settings": {k: str(v) for k, v in vars(args).items() if k != "func"}}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scores.json").write_text(json.dumps(report, indent=1))
        for i, image in enumerate(gen.images):
            image.save(args.out / f"{i:03d}.png")
    return 0

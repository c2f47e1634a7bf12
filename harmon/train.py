"""Train Harmon from a stage recipe.

    accelerate launch -m harmon.train --config experiments/configs/stage1_harmon-0.5b.yaml
    python -m harmon.train --config experiments/configs/smoke.yaml -o data.root=/tmp/shapes
    accelerate launch -m harmon.train --config … --resume            # continue from the newest checkpoint

The recipe is validated before anything is built: a bad field fails with its name (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harmon.train", description="Train Harmon from a stage recipe.")
    parser.add_argument("--config", required=True, type=Path, help="recipe YAML (experiments/configs/*.yaml)")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="set a recipe field, dotted (training.max_steps=100, data.root=/data); repeatable",
    )
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="latest|auto|PATH",
        help="resume: 'latest' (default when the flag has no value; an error if there is no checkpoint), "
        "'auto' (the latest if any, else start fresh) or a checkpoint folder",
    )
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="checkpoint and stop after this optimizer step (resume later with --resume)")
    parser.add_argument("--check", action="store_true", help="validate the recipe and its files, then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pydantic import ValidationError

    from harmon.training.config import load_config

    try:
        config = load_config(args.config, overrides=args.override)
    except (ValidationError, ValueError, FileNotFoundError) as error:
        print(f"invalid training config {args.config}:\n{error}", file=sys.stderr)
        return 2
    if args.check:
        from harmon.training.data import MultiTaskDataset

        try:
            MultiTaskDataset(config.data)  # reads every record index up front: a corrupt line is named file:line
        except (ValueError, KeyError, OSError) as error:
            print(f"invalid training data for {args.config}: {error}", file=sys.stderr)
            return 2
        print(f"{args.config}: valid")
        return 0

    import logging

    from harmon.training.checkpointing import CheckpointError
    from harmon.training.trainer import Trainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    try:
        trainer = Trainer(config, resume=args.resume, stop_after=args.stop_after)
    except CheckpointError as error:
        print(f"cannot resume: {error}", file=sys.stderr)
        return 3
    except (ValueError, KeyError, OSError) as error:  # the data or the model's files, before any step
        print(f"cannot start training from {args.config}: {error}", file=sys.stderr)
        return 2
    result = trainer.train()
    if result.stopped_early:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}")
    else:
        print(f"finished step {result.step}; exported to {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

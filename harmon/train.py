"""Train Harmon from a stage recipe.

    accelerate launch -m harmon.train --config experiments/configs/stage1_harmon-0.5b.yaml
    python -m harmon.train --config experiments/configs/smoke.yaml --threads 1    # writes data/shapes first
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m harmon.train --config …   # 2 CPU processes
    accelerate launch -m harmon.train --config … --resume            # continue from the newest checkpoint

The recipe is validated before anything is built: a bad field fails with its name (exit status 2), and so do
a fresh run into an ``output_dir`` that holds one (``--resume`` / ``--overwrite``) and a multi-process launch whose
processes would not train together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harmon.threads import add_threads_argument, apply_threads


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
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds an earlier run, deleting its checkpoints, "
                        "metrics, logs and export (without it such a run is refused)")
    parser.add_argument("--check", action="store_true", help="validate the recipe and its files, then exit")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.overwrite and args.resume is not None:
        parser.error("--overwrite starts a fresh run and --resume continues one: give one of them")
    return args


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
        from harmon.training.synthetic import shapes_dataset_complete

        synthetic_to_write = config.data.synthetic is not None and not shapes_dataset_complete(config.data.root)
        try:
            if not synthetic_to_write:  # (synthetic data not yet written: nothing to read)
                MultiTaskDataset(config.data)  # reads every record index up front: a bad line is named file:line
        except (ValueError, KeyError, OSError) as error:
            print(f"invalid training data for {args.config}: {error}", file=sys.stderr)
            return 2
        print(f"{args.config}: valid")
        return 0

    import logging

    from harmon.training.checkpointing import CheckpointError
    from harmon.training.guards import LaunchError, OutputDirError
    from harmon.training.trainer import Trainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    apply_threads(args.threads)

    try:
        trainer = Trainer(config, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except CheckpointError as error:
        print(f"cannot resume: {error}", file=sys.stderr)
        return 3
    except (OutputDirError, LaunchError) as error:
        print(f"python -m harmon.train: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError) as error:  # the data or the model's files, before any step
        print(f"python -m harmon.train: error: cannot start training from {args.config}: {error}", file=sys.stderr)
        return 2
    result = trainer.train()
    if result.stopped_early:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}")
    else:
        print(f"finished step {result.step}; exported to {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

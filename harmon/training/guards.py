"""Checks the trainer makes before it builds anything: that the processes it was launched as really train
together, and that a fresh run does not write over an earlier one in the same ``output_dir``.

Multi-process CPU training works with ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N``
(or ``torchrun`` with ``ACCELERATE_USE_CPU=1``): accelerate then builds a gloo process group. Two launches look
right and are not, both measured with accelerate 1.15:

* ``accelerate launch --cpu --num_processes 2`` starts **one** process (multi-CPU through ``--cpu`` goes through
  ``mpirun`` only); nothing reaches the child that says two were asked for, so this one is documented, not caught.
* ``accelerate launch --multi_gpu --num_processes 2`` without CUDA starts two processes with ``WORLD_SIZE=2`` that
  each build a one-process ``Accelerator``: two uncoordinated trainers writing the same checkpoints.
  :func:`check_launch` refuses that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m harmon.train ..."

RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "logs", "export", "config.yaml")
"""What a run writes under its ``output_dir`` (``--overwrite`` deletes these, and only these)."""


class LaunchError(RuntimeError):
    """The processes were launched in a way that would not train together."""


class OutputDirError(FileExistsError):
    """A fresh run was pointed at an ``output_dir`` that holds an earlier run."""


def check_launch(num_processes: int, environ: dict[str, str] | None = None) -> None:
    """Refuse a launch whose ``WORLD_SIZE`` does not match the processes accelerate joined into one group."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LaunchError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} is not a number") from None
    if world > 1 and num_processes != world:
        cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        hint = ("" if cpu else
                f" Without CUDA, set ACCELERATE_USE_CPU=1 so that accelerate builds a CPU (gloo) group: {CPU_LAUNCH}")
        raise LaunchError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate joined {num_processes}: each process "
            f"would train alone and they would overwrite each other's checkpoints.{hint}"
        )


def previous_run(output_dir: Path) -> list[str]:
    """The run artefacts present in ``output_dir`` (an empty ``checkpoints/`` does not count)."""
    found = []
    for name in RUN_ARTEFACTS:
        path = output_dir / name
        if name == "checkpoints":
            if path.is_dir() and any(path.iterdir()):
                found.append(name)
        elif path.exists() and name != "config.yaml":  # config.yaml alone: a run that failed before step 1
            found.append(name)
    return found


def check_output_dir(output_dir: Path, *, resume, overwrite: bool) -> list[str]:
    """Refuse a fresh run (``resume`` is None) into an ``output_dir`` holding an earlier run unless ``overwrite``;
    return what ``overwrite`` will delete (:func:`clear_previous_run`)."""
    if overwrite and resume is not None:
        raise ValueError("--overwrite starts a fresh run and --resume continues one: give one of them")
    if resume is not None:
        return []
    found = previous_run(output_dir)
    if found and not overwrite:
        raise OutputDirError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, "
            f"--overwrite to delete it and start again, or another -o output_dir=..."
        )
    return found


def clear_previous_run(output_dir: Path) -> None:
    """Delete the run artefacts :data:`RUN_ARTEFACTS` in ``output_dir``; anything else there is kept."""
    for name in RUN_ARTEFACTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


__all__ = ["CPU_LAUNCH", "LaunchError", "OutputDirError", "check_launch", "check_output_dir",
           "clear_previous_run", "previous_run"]

"""``--threads N``: torch's intra-op CPU threads, the one option the trainer, the CLI and the benchmarks share.

Without it torch picks its default (as many threads as cores, or ``OMP_NUM_THREADS`` when set). On a shared or
busy machine fewer threads are often faster: an OpenMP barrier waits for every thread, and a descheduled one
stalls the others (see README, *Speed figures*).
"""

from __future__ import annotations

import argparse

THREADS_HELP = ("torch intra-op CPU threads (torch.set_num_threads); default: torch's choice, "
                "the number of cores or OMP_NUM_THREADS")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): speed figures depend on them."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads when ``threads`` is given; return the number in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


__all__ = ["add_threads_argument", "apply_threads", "load_average", "positive_int", "THREADS_HELP"]

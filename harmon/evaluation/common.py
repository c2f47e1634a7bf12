"""What the benchmark writers share: the sampler they call, per-process shares, atomic files and grids.

A *sampler* is ``sampler(prompt, seeds) -> list[PIL.Image]``: one image per seed, each reproducible from its seed
alone, so that a benchmark's images do not depend on how its prompts were split across processes or resumed.
:func:`pipeline_sampler` makes one from a :class:`~harmon.pipelines.HarmonPipeline` (one call per prompt, the
seeds' images as one batch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import PIL.Image
import torch

Sampler = Callable[[str, Sequence[int]], list[PIL.Image.Image]]
T = TypeVar("T")


def pipeline_sampler(pipe, **call_kwargs: Any) -> Sampler:
    """A sampler over ``pipe(prompt, num_images_per_prompt=len(seeds), generator=[one per seed], **call_kwargs)``
    (``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``sampler``, …)."""
    if "generator" in call_kwargs or "num_images_per_prompt" in call_kwargs or "output_type" in call_kwargs:
        raise ValueError("pipeline_sampler: generator, num_images_per_prompt and output_type are set per call")

    def sample(prompt: str, seeds: Sequence[int]) -> list[PIL.Image.Image]:
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        return list(pipe(prompt, num_images_per_prompt=len(generators), generator=generators, output_type="pil",
                         **call_kwargs).images)

    return sample


@dataclass
class GenerationReport:
    """What a writer did in this process: the keys (indices / ids) of its share it wrote, those of its share it
    found finished and skipped, and the benchmark's number of prompts."""

    written: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    total: int = 0


def launch_state():
    """accelerate's ``PartialState`` of this process. ``ACCELERATE_USE_CPU=1`` (the CPU form of ``accelerate launch
    --multi_gpu``) is honoured as ``AcceleratorState`` honours it: ``PartialState`` alone reads only its argument."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def process_share(items: Sequence[T], process_index: int | None = None, num_processes: int | None = None) -> list[T]:
    """This process's items: every ``num_processes``-th from ``process_index`` (default: accelerate's
    ``PartialState`` of an ``accelerate launch``; one process otherwise)."""
    if process_index is None or num_processes is None:
        state = launch_state()
        process_index, num_processes = state.process_index, state.num_processes
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in a world of {num_processes} processes")
    return list(items[process_index::num_processes])


def plan_share(
    keys: Sequence[T],
    finished: Callable[[T], bool],
    process_index: int | None = None,
    num_processes: int | None = None,
) -> tuple[GenerationReport, list[T]]:
    """This process's share of ``keys`` (a fixed split of all keys, so that processes that start at different
    moments still agree on it) and, of that share, what is still to do; the report lists the finished ones."""
    mine = process_share(keys, process_index, num_processes)
    report = GenerationReport(total=len(keys))
    todo = []
    for key in mine:
        (report.skipped if finished(key) else todo).append(key)
    return report, todo


def save_image_atomic(image: PIL.Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name and rename it: a file that exists is complete (what resuming relies on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def image_grid(images: Sequence[PIL.Image.Image], columns: int) -> PIL.Image.Image:
    """Images of one size pasted row by row, no padding (DPG-Bench crops its grid at multiples of the size)."""
    if not images:
        raise ValueError("image_grid: no image")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError(f"image_grid: the images differ in size ({sorted({image.size for image in images})})")
    rows = -(-len(images) // columns)
    grid = PIL.Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def read_json_file(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``; a missing or malformed file fails naming it and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def check_sample_count(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def sample_images(sampler: Sampler, prompt: str, seeds: list[int], what: str) -> list[PIL.Image.Image]:
    images = sampler(prompt, seeds)
    if len(images) != len(seeds):
        raise ValueError(f"the sampler returned {len(images)} images for {len(seeds)} seeds ({what})")
    return images

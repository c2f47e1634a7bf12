"""GenEval (Ghosh et al., 2023, arXiv 2310.11513): sample the layout its ``evaluation/evaluate_images.py`` reads.

From GenEval's prompt metadata (``prompts/evaluation_metadata.jsonl``: one JSON object per line with ``tag``,
``include``, ``prompt``, …) this writes, for the prompt on line ``N`` (from 0)::

    <outdir>/<N:05d>/metadata.jsonl        that line's JSON object
    <outdir>/<N:05d>/samples/<k:04d>.png   k = 0 … n_samples-1 (4 by default)
    <outdir>/<N:05d>/grid.png              optional (grid=True)

Sample ``k`` of prompt ``N`` is drawn with seed ``seed + N·n_samples + k``. A prompt whose folder already holds
all of its files is skipped (files are written atomically, ``metadata.jsonl`` last), so an interrupted run
resumes where it stopped; under ``accelerate launch`` process ``r`` of ``W`` takes prompts ``r, r+W, …``.

    harmon bench geneval PIPELINE prompts/evaluation_metadata.jsonl --outdir geneval_out
    # then, in GenEval's checkout: python evaluation/evaluate_images.py geneval_out --outfile results.jsonl ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from harmon.evaluation.common import (
    GenerationReport,
    Sampler,
    check_sample_count,
    image_grid,
    plan_share,
    sample_images,
    save_image_atomic,
    write_text_atomic,
)


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The prompt metadata, one dict per non-empty line; each must hold a non-empty ``"prompt"`` string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ValueError(f"{path}, line {number}: a GenEval metadata line needs a non-empty 'prompt' string")
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no prompt")
    return entries


def geneval_files(folder: Path, n_samples: int, grid: bool) -> list[Path]:
    """Every file of one finished prompt folder."""
    files = [folder / "samples" / f"{k:04d}.png" for k in range(n_samples)]
    if grid:
        files.append(folder / "grid.png")
    return [*files, folder / "metadata.jsonl"]


def write_geneval(
    metadata_file: str | Path,
    outdir: str | Path,
    sampler: Sampler,
    *,
    n_samples: int = 4,
    grid: bool = False,
    grid_columns: int | None = None,
    seed: int = 0,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: Callable | None = None,
) -> GenerationReport:
    """Sample the GenEval layout (module docstring); returns what this process wrote and skipped."""
    check_sample_count("n_samples", n_samples)
    entries = read_geneval_metadata(metadata_file)
    outdir = Path(outdir)
    report, mine = plan_share(
        range(len(entries)),
        lambda index: all(path.is_file() for path in geneval_files(outdir / f"{index:05d}", n_samples, grid)),
        process_index, num_processes,
    )
    for index in progress(mine) if progress is not None else mine:
        entry = entries[index]
        folder = outdir / f"{index:05d}"
        seeds = [seed + index * n_samples + k for k in range(n_samples)]
        images = sample_images(sampler, entry["prompt"], seeds, f"GenEval prompt {index}")
        for k, image in enumerate(images):
            save_image_atomic(image, folder / "samples" / f"{k:04d}.png")
        if grid:
            save_image_atomic(image_grid(images, grid_columns or min(n_samples, 2)), folder / "grid.png")
        write_text_atomic(json.dumps(entry) + "\n", folder / "metadata.jsonl")  # last: marks the folder finished
        report.written.append(index)
    return report

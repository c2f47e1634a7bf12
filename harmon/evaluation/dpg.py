"""DPG-Bench (Hu et al., 2024, ELLA, arXiv 2403.05135): one 2×2 grid of four samples per prompt id.

DPG-Bench's scorer (``compute_dpg_bench.py``) reads ``<image_root>/<item_id>.png``, crops it into four
``resolution × resolution`` tiles (top-left, top-right, bottom-left, bottom-right) and asks its VQA model each
question of ``item_id`` on every tile. This writes exactly that: ``<outdir>/<item_id>.png``, the samples ``k = 0 … 3``
of seed ``seed + 4·position + k`` (``position``: the id's place in sorted order) pasted without padding, each of the
pipeline's height × width (pass that size as the scorer's ``--resolution``).

Prompts come from ELLA's ``dpg_bench/prompts/`` folder (``<item_id>.txt``, the prompt as the file's text), from
``dpg_bench.csv`` (columns ``item_id`` and ``text``; one row per question, the prompt repeated) or from a JSON
object ``{item_id: prompt}``. Finished ids (their PNG exists) are skipped; under ``accelerate launch`` process ``r``
of ``W`` takes the sorted ids ``r, r+W, …``.

    harmon bench dpg PIPELINE ELLA/dpg_bench/prompts --outdir dpg_out
    # then in ELLA's checkout: bash dpg_bench/dist_eval.sh dpg_out <height>
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from harmon.evaluation.common import (
    GenerationReport,
    Sampler,
    image_grid,
    plan_share,
    read_json_file,
    sample_images,
    save_image_atomic,
)

GRID_SAMPLES = 4
_SAFE_ID = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")  # the scorer cuts at "."


def _check_id(item_id: str, where: str) -> str:
    if not item_id or not set(item_id) <= _SAFE_ID:
        raise ValueError(f"{where}: {item_id!r} is not a usable DPG-Bench item id (letters, digits, _ and - only)")
    return item_id


def read_dpg_prompts(source: str | Path) -> dict[str, str]:
    """``{item_id: prompt}`` from ELLA's prompt folder, ``dpg_bench.csv`` or a JSON object."""
    source = Path(source)
    prompts: dict[str, str] = {}
    if source.is_dir():
        for path in sorted(source.glob("*.txt")):
            prompts[_check_id(path.stem, str(path))] = path.read_text(encoding="utf-8").strip()
    elif source.is_file() and source.suffix == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"item_id", "text"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{source}: the DPG-Bench CSV has no {sorted(missing)} column(s)")
            for row in reader:
                prompts.setdefault(_check_id(row["item_id"].strip(), str(source)), row["text"].strip())
    elif source.is_file() and source.suffix == ".json":
        data = read_json_file(source, "DPG-Bench prompts")
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{source}: a DPG-Bench JSON prompt file is an object {{item_id: prompt}}")
        prompts = {_check_id(str(k), str(source)): v.strip() for k, v in data.items()}
    elif source.exists():
        raise ValueError(f"{source}: DPG-Bench prompts are a folder of .txt files, a .csv or a .json file")
    else:
        raise FileNotFoundError(f"DPG-Bench prompts not found: {source}")
    empty = [item_id for item_id, prompt in prompts.items() if not prompt]
    if empty:
        raise ValueError(f"{source}: empty prompt(s) for item id(s) {empty[:5]}")
    if not prompts:
        raise ValueError(f"{source}: no prompt")
    return dict(sorted(prompts.items()))


def write_dpg(
    prompts: str | Path | dict[str, str],
    outdir: str | Path,
    sampler: Sampler,
    *,
    seed: int = 0,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: Callable | None = None,
) -> GenerationReport:
    """Sample one 2×2 grid per DPG-Bench item id (module docstring)."""
    table = read_dpg_prompts(prompts) if not isinstance(prompts, dict) else dict(sorted(prompts.items()))
    outdir = Path(outdir)
    ids = list(table)
    positions = {item_id: i for i, item_id in enumerate(ids)}
    report, mine = plan_share(ids, lambda item_id: (outdir / f"{item_id}.png").is_file(), process_index, num_processes)
    for item_id in progress(mine) if progress is not None else mine:
        position = positions[item_id]
        seeds = [seed + GRID_SAMPLES * position + k for k in range(GRID_SAMPLES)]
        images = sample_images(sampler, table[item_id], seeds, f"DPG-Bench item {item_id}")
        save_image_atomic(image_grid(images, 2), outdir / f"{item_id}.png")
        report.written.append(item_id)
    return report

"""MJHQ-30K (Li et al., 2024, Playground v2.5): sample its prompts into the per-category layout FID compares.

MJHQ-30K's ``meta_data.json`` maps each image id to ``{"category": ..., "prompt": ...}`` and its images lie in
``mjhq30k_imgs/<category>/<id>.jpg``. This writes ``<outdir>/<category>/<id>.png`` (seed ``seed + position``,
``position``: the id's place in sorted order), resumable and split across processes like the other writers; then
``harmon bench fid <outdir> mjhq30k_imgs --per-category`` gives the per-category and overall FID.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from harmon.evaluation.common import (
    GenerationReport,
    Sampler,
    plan_share,
    read_json_file,
    sample_images,
    save_image_atomic,
)


def read_mjhq_metadata(path: str | Path, categories: Sequence[str] | None = None) -> dict[str, dict]:
    """``{id: {"category", "prompt"}}`` sorted by id, optionally only the given categories."""
    data = read_json_file(path, "MJHQ-30K metadata")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: MJHQ-30K metadata is an object {{id: {{category, prompt}}}}")
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not isinstance(
            entry.get("category"), str
        ):
            raise ValueError(f"{path}: entry {key!r} needs 'category' and 'prompt' strings")
        if "/" in key or "/" in entry["category"] or key.startswith("."):
            raise ValueError(f"{path}: entry {key!r}: ids and categories cannot hold '/'")
    if categories is not None:
        known = {entry["category"] for entry in data.values()}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise ValueError(f"categories: {unknown} not in {path} (it has {sorted(known)})")
        data = {k: v for k, v in data.items() if v["category"] in set(categories)}
    return dict(sorted(data.items()))


def write_mjhq(
    metadata_file: str | Path,
    outdir: str | Path,
    sampler: Sampler,
    *,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: Callable | None = None,
) -> GenerationReport:
    """Sample ``<outdir>/<category>/<id>.png`` for every MJHQ-30K prompt (module docstring)."""
    table = read_mjhq_metadata(metadata_file, categories)
    outdir = Path(outdir)
    ids = list(table)
    position = {image_id: i for i, image_id in enumerate(ids)}

    def target(image_id: str) -> Path:
        return outdir / table[image_id]["category"] / f"{image_id}.png"

    report, mine = plan_share(ids, lambda image_id: target(image_id).is_file(), process_index, num_processes)
    for image_id in progress(mine) if progress is not None else mine:
        image, = sample_images(sampler, table[image_id]["prompt"], [seed + position[image_id]], f"MJHQ {image_id}")
        save_image_atomic(image, target(image_id))
        report.written.append(image_id)
    return report

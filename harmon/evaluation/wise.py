"""WISE (Niu et al., 2025, arXiv 2503.07265): one image per prompt id.

WISE's prompt files (``data/cultural_common_sense.json``, ``data/spatio-temporal_reasoning.json``,
``data/natural_science.json``) are JSON lists of ``{"prompt_id": int, "Prompt": str, "Explanation": …,
"Subcategory": …}``; its judge (``gpt_eval.py --image_dir DIR``) reads ``DIR/<prompt_id>.png``, one image per
prompt. This writes that image, drawn with seed ``seed + prompt_id``. Finished ids are skipped; under
``accelerate launch`` process ``r`` of ``W`` takes the sorted ids ``r, r+W, …``.

    harmon bench wise PIPELINE WISE/data/*.json --outdir wise_out
    # then in WISE's checkout: python gpt_eval.py --json_path data/natural_science.json --image_dir wise_out ...
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


def read_wise_prompts(paths: str | Path | Sequence[str | Path]) -> dict[int, str]:
    """``{prompt_id: Prompt}`` from one or more WISE prompt files; an id given twice is an error."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    prompts: dict[int, str] = {}
    for path in map(Path, paths):
        data = read_json_file(path, "WISE prompt file")
        if not isinstance(data, list):
            raise ValueError(f"{path}: a WISE prompt file is a JSON list")
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("Prompt"), str) or "prompt_id" not in item:
                raise ValueError(f"{path}, item {i}: a WISE prompt needs 'prompt_id' and a 'Prompt' string")
            try:
                prompt_id = int(item["prompt_id"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, item {i}: prompt_id {item['prompt_id']!r} is not an integer") from None
            if prompt_id in prompts:
                raise ValueError(f"{path}, item {i}: prompt_id {prompt_id} is given twice")
            if not item["Prompt"].strip():
                raise ValueError(f"{path}, item {i}: the Prompt of prompt_id {prompt_id} is empty")
            prompts[prompt_id] = item["Prompt"].strip()
    if not prompts:
        raise ValueError(f"no WISE prompt in {', '.join(map(str, paths))}")
    return dict(sorted(prompts.items()))


def write_wise(
    prompt_files: str | Path | Sequence[str | Path],
    outdir: str | Path,
    sampler: Sampler,
    *,
    seed: int = 0,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: Callable | None = None,
) -> GenerationReport:
    """Sample ``<outdir>/<prompt_id>.png`` for every WISE prompt (module docstring)."""
    table = read_wise_prompts(prompt_files)
    outdir = Path(outdir)
    report, mine = plan_share(list(table), lambda pid: (outdir / f"{pid}.png").is_file(), process_index, num_processes)
    for prompt_id in progress(mine) if progress is not None else mine:
        image, = sample_images(sampler, table[prompt_id], [seed + prompt_id], f"WISE prompt {prompt_id}")
        save_image_atomic(image, outdir / f"{prompt_id}.png")
        report.written.append(prompt_id)
    return report

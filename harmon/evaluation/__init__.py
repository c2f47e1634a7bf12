"""Benchmark adapters: write the sample layouts the paper's benchmarks score, compute FID between folders, and
answer lmms-eval's requests — the scoring itself stays in those projects.

* :mod:`harmon.evaluation.geneval` — GenEval (``<out>/<index:05d>/metadata.jsonl``, ``samples/<k:04d>.png``);
* :mod:`harmon.evaluation.dpg` — DPG-Bench (``<out>/<item_id>.png``, a 2×2 grid of four samples);
* :mod:`harmon.evaluation.wise` — WISE (``<out>/<prompt_id>.png``);
* :mod:`harmon.evaluation.mjhq` — MJHQ-30K's prompts (``<out>/<category>/<id>.png``);
* :mod:`harmon.evaluation.fid` — FID between a generated and a reference folder (MJHQ-30K per category,
  COCO-30K) through torchmetrics;
* :mod:`harmon.evaluation.lmms` — the ``harmon`` model of lmms-eval (POPE, MME, MMBench, SEED, GQA, MMMU, …).

Every writer is resumable (finished prompts are skipped; files are written atomically) and splits its prompts
across the processes of ``accelerate launch``. ``harmon bench geneval|dpg|wise|mjhq|fid`` runs them (``docs/evaluation.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pipeline_sampler": "harmon.evaluation.common",
    "image_grid": "harmon.evaluation.common",
    "GenerationReport": "harmon.evaluation.common",
    "read_geneval_metadata": "harmon.evaluation.geneval",
    "write_geneval": "harmon.evaluation.geneval",
    "read_dpg_prompts": "harmon.evaluation.dpg",
    "write_dpg": "harmon.evaluation.dpg",
    "read_wise_prompts": "harmon.evaluation.wise",
    "write_wise": "harmon.evaluation.wise",
    "read_mjhq_metadata": "harmon.evaluation.mjhq",
    "write_mjhq": "harmon.evaluation.mjhq",
    "folder_fid": "harmon.evaluation.fid",
    "HarmonLMM": "harmon.evaluation.lmms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harmon.evaluation' has no attribute {name!r}")

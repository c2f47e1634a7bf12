"""Exporting trained weights: a ``HarmonPipeline`` folder (when :mod:`harmon.pipelines` provides it) and, always,
``harmon_model/`` (``HarmonModel.save_pretrained`` + the tokenizer), written to a temporary folder and renamed."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from harmon.model import HarmonModel

logger = logging.getLogger(__name__)

MODEL_SUBFOLDER = "harmon_model"
EXPORT_INFO_NAME = "export_info.json"


def export_model(
    model: HarmonModel, tokenizer, folder: str | os.PathLike, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``folder`` (replacing it): the pipeline (if available) and ``harmon_model/``. Returns the export info
    (also written to ``export_info.json``), whose ``pipeline`` entry says whether the pipeline was written and,
    if not, why."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    info = dict(info or {})
    try:
        from harmon.pipelines import HarmonPipeline
    except ImportError as error:
        info["pipeline"] = {"written": False, "reason": f"harmon.pipelines.HarmonPipeline is not available: {error}"}
        logger.warning("export: %s; writing only %s/", info["pipeline"]["reason"], MODEL_SUBFOLDER)
    else:
        HarmonPipeline.from_model(model, tokenizer).save_pretrained(tmp)
        info["pipeline"] = {"written": True}
    model.save_pretrained(tmp / MODEL_SUBFOLDER)
    tokenizer.save_pretrained(str(tmp / MODEL_SUBFOLDER))
    info["harmon_model"] = MODEL_SUBFOLDER
    (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2))
    if folder.exists():
        retired = folder.with_name(f".tmp-retired-{folder.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder, retired)
        shutil.rmtree(retired, ignore_errors=True)
    os.replace(tmp, folder)
    return info

"""harmon-toy: a small Harmon trained offline on coloured handwritten digits, shipped inside the package.

``HarmonPipeline.from_pretrained("harmon-toy")`` (and ``harmon generate --prompt ...`` with no folder) load the
embedded weights (:func:`pretrained_folder`); ``harmon toy train`` / ``python -m harmon.toy.train`` reproduce them
(:mod:`harmon.toy.train`); ``harmon toy eval`` measures them (:mod:`harmon.toy.eval`). The data is
:mod:`harmon.toy.data`, the tokenizer :mod:`harmon.toy.tokenizer`, the VAE's training :mod:`harmon.toy.vae`.
See docs/toy.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EMBEDDED = ("harmon-toy",)
"""Names of the pipelines shipped with the package (folders under ``harmon/toy/pretrained/``)."""

DEFAULT_PIPELINE = "harmon-toy"


def pretrained_folder(name: str) -> Path | None:
    """The folder of the embedded pipeline ``name`` (``"harmon-toy"``), or ``None`` when ``name`` is not one (a
    path or hub id is left to the caller). Raises ``FileNotFoundError`` when the package lacks its files."""
    if str(name) not in EMBEDDED:
        return None
    folder = Path(__file__).with_name("pretrained") / str(name)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded pipeline {name!r} is missing from this installation ({folder}); reinstall harmon or "
            "rebuild it with `harmon toy train`"
        )
    return folder


def resolve_embedded(name: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """For ``HarmonPipeline.from_pretrained``: an embedded name becomes its folder, loaded in float32 unless a
    ``dtype`` is asked for (the weights are stored in fp16 to keep the package small). Other names pass through."""
    folder = pretrained_folder(name) if isinstance(name, (str, Path)) else None
    if folder is None:
        return name, kwargs
    kwargs = dict(kwargs)
    if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
        import torch

        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = torch.float32
    return folder, kwargs

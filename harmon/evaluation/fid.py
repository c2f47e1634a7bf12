"""FID between a folder of generated images and a folder of reference images, through torchmetrics'
``FrechetInceptionDistance`` (Heusel et al., 2017).

* COCO-30K: two flat folders (``generated/``, ``reference/``) → one FID.
* MJHQ-30K: the reference folder holds one sub-folder per category (``mjhq30k_imgs/<category>/<id>.jpg``, as the
  data set ships) and the generated folder mirrors it (``harmon bench mjhq`` writes that layout from
  ``meta_data.json``) → one FID per category (``per_category=True``) and the overall FID of all images.

Images are read as RGB, resized to ``image_size`` × ``image_size`` (bicubic; 299 is Inception's input) and handed
to the metric as uint8. The feature network: by default torchmetrics' Inception-v3 (2048-d pool features, needs
``torch-fidelity``) with its weights from a local file (``weights_path``: the FID Inception weights
``pt_inception-2015-12-05-6726825d.pth``; nothing is downloaded); or any ``feature`` module mapping uint8
``(N, 3, S, S)`` to ``(N, d)`` (the tests use a tiny stand-in).

    harmon bench fid GENERATED REFERENCE --inception-weights pt_inception-2015-12-05-6726825d.pth [--per-category]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

from harmon.pipelines.image_processing import open_image_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _batches(paths: list[Path], image_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(paths), batch_size):
        arrays = []
        for path in paths[start:start + batch_size]:
            # the library's one reader: sizes checked before decoding, truncated or corrupt files refused by name
            image = open_image_file(path, "image").convert("RGB")
            image = image.resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.uint8))
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class _SharedFeatures(nn.Module):
    """The feature network, run once per batch for several metrics: a call with the very tensor of the previous
    call returns the previous features. Written here because torchmetrics has no way to feed one feature pass to
    two FID metrics (``merge_state`` leaves a merged FID unable to ``compute`` in torchmetrics 1.9): the overall
    MJHQ FID and the per-category FIDs share every batch's features through it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        if hasattr(inner, "num_features"):
            self.num_features = inner.num_features
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        features = self.inner(images)
        self._last = (images, features)
        return features


def feature_network(feature: nn.Module | None = None, weights_path: str | Path | None = None) -> nn.Module:
    """``feature`` itself, or torchmetrics' FID Inception-v3 (2048-d pool features) with its weights read from
    ``weights_path`` (required: nothing is downloaded)."""
    if feature is not None:
        if weights_path is not None:
            raise ValueError("weights_path applies to the default Inception network, not to a custom feature module")
        return feature
    if weights_path is None:
        raise ValueError(
            "weights_path: FID's Inception-v3 weights are read from a local file (pt_inception-2015-12-05-6726825d.pth); "
            "nothing is downloaded"
        )
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"weights_path: Inception weights not found: {weights_path}")
    from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity: pip install 'harmon[eval]'

    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
    )


def fid_metric(network: nn.Module, image_size: int):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:  # pragma: no cover - the `eval` extra installs it
        raise ImportError("FID needs torchmetrics: pip install 'harmon[eval]'") from error
    return FrechetInceptionDistance(feature=network, input_img_size=(3, image_size, image_size))


def _update(metrics, paths: list[Path], real: bool, image_size: int, batch_size: int, device) -> None:
    for batch in _batches(paths, image_size, batch_size):
        batch = batch.to(device)
        for metric in metrics:
            metric.update(batch, real=real)


def _pair(generated: Path, reference: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    pairs = []
    for name, folder in (("generated", generated), ("reference", reference)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder not found: {folder}")
        files = image_files(folder, recursive)
        if len(files) < 2:
            raise ValueError(f"{name} folder {folder}: FID needs at least 2 images, found {len(files)}")
        pairs.append(files)
    return pairs[0], pairs[1]


def folder_fid(
    generated: str | Path,
    reference: str | Path,
    *,
    per_category: bool = False,
    feature: nn.Module | None = None,
    weights_path: str | Path | None = None,
    image_size: int = 299,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> dict:
    """``{"fid": overall, "num_generated": n, "num_reference": n}``, plus ``"per_category": {name: fid}`` with
    ``per_category`` (every sub-folder of ``reference``; ``generated`` must hold the same sub-folders)."""
    generated, reference = Path(generated), Path(reference)
    device = torch.device(device)
    if per_category:  # check the layout before building (and running) the feature network
        categories = sorted(p.name for p in reference.iterdir() if p.is_dir()) if reference.is_dir() else []
        if not categories:
            raise ValueError(f"reference folder {reference}: per_category needs one sub-folder per category, found none")
        missing = [name for name in categories if not (generated / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"generated folder {generated}: no sub-folder for categor(ies) {missing}")
        pairs = {name: _pair(generated / name, reference / name, recursive=True) for name in categories}
    else:
        pairs = {None: _pair(generated, reference, recursive=False)}
    network = _SharedFeatures(feature_network(feature, weights_path)).to(device).eval()
    overall = fid_metric(network, image_size).to(device)
    result: dict = {"num_generated": 0, "num_reference": 0}
    for name, (fake, real) in pairs.items():
        metrics = [overall] if name is None else [fid_metric(network, image_size).to(device), overall]
        _update(metrics, real, True, image_size, batch_size, device)
        _update(metrics, fake, False, image_size, batch_size, device)
        if name is not None:
            result.setdefault("per_category", {})[name] = float(metrics[0].compute())
        result["num_generated"] += len(fake)
        result["num_reference"] += len(real)
    result["fid"] = float(overall.compute())
    return result

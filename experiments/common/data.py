"""Data of the analysis scripts: :func:`bundled_dataset` (scikit-learn's ``load_digits``; generated ``shapes`` /
``quadrants`` sets) and :func:`image_folder_dataset` (torchvision ``ImageFolder``). Images are ``[0, 1]`` tensors; the
feature extractor resizes them to the encoder's input size and maps them to ``[-1, 1]``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

BUNDLED_DATASETS = ("digits", "shapes", "quadrants")



@dataclass
class LabeledImages:
    """A split: ``dataset`` yields ``(image (3, h, w) float in [0, 1], label int)``."""

    dataset: Dataset
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def labels(self) -> torch.Tensor:
        if isinstance(self.dataset, TensorDataset):
            return self.dataset.tensors[1]
        targets = getattr(self.dataset, "targets", None)
        if targets is not None:
            return torch.as_tensor(targets)
        return torch.as_tensor([self.dataset[i][1] for i in range(len(self))])  # type: ignore[arg-type]


def _digits(seed: int, limit: int | None) -> tuple[LabeledImages, LabeledImages]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; nothing is downloaded), split 75/25
    stratified with ``seed``; white strokes on black, three equal channels, values in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    index = np.arange(len(labels))
    if limit is not None and limit < len(index):
        index, _ = train_test_split(index, train_size=limit, stratify=digits.target, random_state=seed)
    train, val = train_test_split(index, test_size=0.25, stratify=digits.target[index], random_state=seed)
    classes = [str(d) for d in range(10)]
    return (
        LabeledImages(TensorDataset(images[train], labels[train]), classes, "digits"),
        LabeledImages(TensorDataset(images[val], labels[val]), classes, "digits"),
    )


SHAPES = ("disk", "square", "triangle", "cross")
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}


def render_shape(shape: str, color: Sequence[float], size: int, rng: np.random.Generator) -> torch.Tensor:
    """One ``(3, size, size)`` image in [0, 1]: a filled ``shape`` of ``color`` on a dark random-gray background,
    with random scale and position (hand-written with numpy coordinate masks: no drawing library is needed)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = size * rng.uniform(0.2, 0.32)
    cy, cx = rng.uniform(radius, size - radius, size=2)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    if shape == "disk":
        inside = dx**2 + dy**2 <= 1
    elif shape == "square":
        inside = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    elif shape == "triangle":
        inside = (dy <= 0.8) & (dy >= -1 + 2 * np.abs(dx))
    elif shape == "cross":
        inside = ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    background = rng.uniform(0.0, 0.3)
    image = np.full((3, size, size), background, dtype=np.float32)
    for channel, value in enumerate(color):
        image[channel][inside] = value
    return torch.from_numpy(image)


def render_quadrant(quadrant: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One ``(3, size, size)`` image in [0, 1]: a bright square of random color and side (a fifth to a third of
    the image) somewhere inside quadrant ``quadrant`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) on a
    dark random-gray background."""
    half = size // 2
    side = int(rng.integers(max(2, size // 5), max(3, size // 3) + 1))
    y0 = (quadrant // 2) * half + int(rng.integers(0, half - side + 1))
    x0 = (quadrant % 2) * half + int(rng.integers(0, half - side + 1))
    image = np.full((3, size, size), rng.uniform(0.0, 0.3), dtype=np.float32)
    image[:, y0:y0 + side, x0:x0 + side] = rng.uniform(0.6, 1.0, size=3).astype(np.float32)[:, None, None]
    return torch.from_numpy(image)


QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _generated(kind: str, seed: int, limit: int | None, size: int = 32) -> tuple[LabeledImages, LabeledImages]:
    """``shapes``: class = the shape (random color, scale, position); ``quadrants``: class = the quadrant holding a
    bright square -- the trivially separable set (even a random-init MAR separates it: its position embeddings make
    the pooled feature depend on where the content is). Balanced classes; 600 training and 200 validation images
    unless ``limit`` (total) is given."""
    total = limit or 800
    n_train = max(total * 3 // 4, 1)
    rng = np.random.default_rng(seed)
    classes = list(SHAPES) if kind == "shapes" else list(QUADRANTS)
    images, labels = [], []
    for i in range(total):
        label = i % len(classes)
        if kind == "shapes":
            color = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
            images.append(render_shape(SHAPES[label], color, size, rng))
        else:
            images.append(render_quadrant(label, size, rng))
        labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (
        LabeledImages(TensorDataset(x[:n_train], y[:n_train]), classes, kind),
        LabeledImages(TensorDataset(x[n_train:], y[n_train:]), classes, kind),
    )


def bundled_dataset(name: str, seed: int = 0, limit: int | None = None) -> tuple[LabeledImages, LabeledImages]:
    """(train, val) of a bundled set: ``digits`` (scikit-learn), ``shapes`` or ``quadrants`` (generated)."""
    if name == "digits":
        return _digits(seed, limit)
    if name in ("shapes", "quadrants"):
        return _generated(name, seed, limit)
    raise SystemExit(f"--dataset must be one of {BUNDLED_DATASETS}, got {name!r}")


def image_folder_dataset(root: str | os.PathLike, image_size: int) -> LabeledImages:
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) with MAE's evaluation transform: resize the short side
    to ``image_size / 0.875`` (bicubic), centre-crop ``image_size``; values in [0, 1]."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"image folder not found: {root}")
    transform = transforms.Compose([
        transforms.Resize(int(round(image_size / 0.875)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.Lambda(lambda image: image.convert("RGB")),
        transforms.ToTensor(),
    ])
    folder = datasets.ImageFolder(str(root), transform=transform)
    return LabeledImages(folder, list(folder.classes), root.name)



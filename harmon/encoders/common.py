"""What the pixel (understanding) encoder families share: the preprocessing convention, a mixin that implements
it from ``image_size`` / ``image_mean`` / ``image_std``, and small helpers of their weight loading.

Preprocessing convention (:class:`~harmon.interfaces.UnderstandingEncoder`): pixels arrive as ``(B, 3, H, W)``
floats in [-1, 1], as everywhere in harmon. ``preprocess`` pads a non-square image to a square with the gray
(127, 127, 127) the pipeline pads with, resizes it to ``image_size`` (bicubic, antialiased; skipped when it already
has that size) and normalises it per channel like a transformers image processor does on [0, 1] pixels:
``((pixels + 1) / 2 - mean) / std``. With ``mean = std = 0.5`` (SigLIP, VQGAN, the KL VAE) that is the identity,
so the [-1, 1] pixels pass through unchanged. ``encode`` takes ``preprocess``'s output.

Pretrained weights are never read when an encoder is built: its config is the architecture only. Each built-in
pixel encoder has ``load_pretrained(path)`` for its released format (a transformers folder, a taming or LDM
checkpoint), which :func:`harmon.registry.load_pretrained` calls after building (``ENCODERS.create(name,
pretrained=path)``, or a :class:`~harmon.configs.ComponentSpec`'s ``pretrained``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import torch
import torch.nn.functional as F

GRAY = 2 * 127 / 255 - 1  # the pipeline's (127, 127, 127) padding, in [-1, 1]
IDENTITY_MEAN_STD = (0.5, 0.5, 0.5)  # [0, 1] normalised with mean = std = 0.5 is exactly the [-1, 1] range

def preprocess_pixels(
    pixels: torch.Tensor, size: int, mean: Sequence[float] = IDENTITY_MEAN_STD, std: Sequence[float] = IDENTITY_MEAN_STD
) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, 3, size, size)`` normalised with ``mean`` / ``std`` (module docstring).

    Hand-written on purpose: transformers' image processors (e.g. ``SiglipImageProcessor``) work on PIL / numpy
    images in [0, 255] without a gray pad to a square, and diffusers' ``VaeImageProcessor`` has no pad-to-square
    either; this stays on batched tensors (device, dtype and autograd kept) with the library's [-1, 1] convention.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    if height != width:
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        pixels = F.pad(pixels, (left, side - width - left, top, side - height - top), value=GRAY)
    if pixels.shape[-1] != size:
        dtype = pixels.dtype
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        pixels = pixels.clamp(-1, 1).to(dtype)  # bicubic overshoots; PIL clamps too
    if tuple(mean) == IDENTITY_MEAN_STD and tuple(std) == IDENTITY_MEAN_STD:
        return pixels
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean_t) / std_t


class PixelPreprocessing:
    """Mixin: ``preprocess`` from the instance's ``image_size``, ``image_mean`` and ``image_std``.

    A plugin encoder that follows the convention only sets those three attributes (or properties)."""

    image_size: int
    image_mean: tuple[float, float, float] = IDENTITY_MEAN_STD
    image_std: tuple[float, float, float] = IDENTITY_MEAN_STD

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → ``encode``'s input ``(B, 3, image_size, image_size)``."""
        return preprocess_pixels(pixels, self.image_size, self.image_mean, self.image_std)


class ConfiguredPixelPreprocessing(PixelPreprocessing):
    """:class:`PixelPreprocessing` whose ``image_size``, ``image_mean`` and ``image_std`` are the fields of the
    instance's pydantic ``config`` (the built-in pixel encoders)."""

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.config.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.config.image_std


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return torch.float32


def check_local_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such checkpoint file: {path}")


def fail_fast_for_hub_id(name: str, what: str, hint: str) -> None:
    """``name`` is not a local folder: raise now, with ``hint``, when it is a file, when the hub is switched off
    (``HF_HUB_OFFLINE``) or when it cannot be reached (2 s); return only when a download can be tried."""
    from huggingface_hub import constants

    if os.path.exists(name):
        raise ValueError(f"{what}: {name} is a file, not a model folder")
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise FileNotFoundError(f"{what}: no such folder: {name}")  # a path, not a hub id (``org/name``)
    message = f"{what}: {name!r} is not a local folder. {hint}"
    if constants.HF_HUB_OFFLINE:
        raise OSError(message + " (HF_HUB_OFFLINE is set)")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        raise OSError(message + " (the Hugging Face Hub cannot be reached)") from None


__all__ = [
    "GRAY",
    "IDENTITY_MEAN_STD",
    "ConfiguredPixelPreprocessing",
    "PixelPreprocessing",
    "fail_fast_for_hub_id",
    "preprocess_pixels",
]

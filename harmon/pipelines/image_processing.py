"""Images in and out of a Harmon pipeline.

Understanding input follows the original: any image becomes RGB, is padded to a square with gray
(127, 127, 127) (LLaVA's ``expand2square``; diffusers has no such resize mode), resized with bicubic filtering to
the model's image size and scaled to [-1, 1]. Loading is strict: a missing file, a corrupt or truncated file and a
0-size image raise errors that name the argument. Output post-processing is diffusers' ``VaeImageProcessor``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.image_processor import VaeImageProcessor

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor]
GRAY_FILL = (127, 127, 127)


def load_image(image: ImageInput, argument: str = "image") -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, an ``(H, W[, C])`` array (uint8, or float in [0, 1]) or a
    ``(C, H, W)`` tensor in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: no such image file: {path}")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for corrupt / truncated files
            raise ValueError(f"{argument}: {path} is not a readable image ({error})") from error
    elif isinstance(image, torch.Tensor):
        image = _array_to_pil(image.detach().cpu().float().numpy(), argument, channels_first=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, argument, channels_first=False)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{argument} must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{argument}: the image is empty ({image.width}×{image.height})")
    # the orientation a camera records in EXIF, applied as every viewer does (a no-op without the tag)
    return to_rgb(PIL.ImageOps.exif_transpose(image))


def _array_to_pil(array: np.ndarray, argument: str, channels_first: bool) -> PIL.Image.Image:
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        layout = "(C, H, W)" if channels_first else "(H, W, C)"
        raise ValueError(f"{argument}: expected an image array {layout} with 1, 3 or 4 channels, got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{argument}: the image is empty (shape {array.shape})")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"{argument}: float images must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
        array = (array * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB from any PIL mode: transparency composited on white, 16-bit / 32-bit gray rescaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return PIL.Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: PIL.Image.Image, fill: tuple[int, int, int] = GRAY_FILL) -> PIL.Image.Image:
    """Pad the shorter side (centred) with ``fill`` to a square, as the original does before resizing."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_for_understanding(
    images: Sequence[ImageInput], size: int, argument: str = "image"
) -> torch.Tensor:
    """``(B, 3, size, size)`` float tensor in [-1, 1]."""
    arrays = []
    for i, image in enumerate(images):
        label = argument if len(images) == 1 else f"{argument}[{i}]"
        square = expand_to_square(load_image(image, label))
        square = square.resize((size, size), resample=PIL.Image.Resampling.BICUBIC)
        arrays.append(np.asarray(square, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return 2 * (pixels / 255) - 1


def postprocessor() -> VaeImageProcessor:
    """diffusers' post-processing of [-1, 1] pixels into PIL / numpy / [0, 1] tensors."""
    return VaeImageProcessor(vae_scale_factor=16, do_resize=False, do_normalize=True)

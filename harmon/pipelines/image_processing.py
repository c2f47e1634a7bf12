"""Images in and out of a Harmon pipeline.

Understanding input follows the original: any image becomes RGB, is padded to a square with gray
(127, 127, 127) (LLaVA's ``expand2square``; diffusers has no such resize mode), resized with bicubic filtering to
the model's image size and scaled to [-1, 1]. Loading is strict: a missing file, a corrupt or truncated file and a
0-size image raise errors that name the argument. Output post-processing is diffusers' ``VaeImageProcessor``.

Hostile images are refused before anything large is allocated: a side longer than :data:`MAX_INPUT_SIDE` or more
than :data:`MAX_INPUT_PIXELS` pixels (checked on a file's header, before its pixels are decoded — a decompression
bomb or a 1×100000 strip, whose gray square would take 30 GB), and NaN / infinite values in an array or tensor.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps
import torch
from diffusers.image_processor import VaeImageProcessor

from harmon.validation import check_finite_array

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor]
GRAY_FILL = (127, 127, 127)
MAX_INPUT_SIDE = 8192
"""Longest accepted image side: the gray square it is padded to then takes at most 8192² × 3 bytes (201 MB)."""
MAX_INPUT_PIXELS = 8192 * 8192
"""Most pixels an input image may have (PIL's own bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``, is not relied on)."""


def check_image_size(width: int, height: int, argument: str) -> None:
    """Refuse an empty image, a side above :data:`MAX_INPUT_SIDE` or more than :data:`MAX_INPUT_PIXELS` pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{argument}: the image is empty ({width}×{height})")
    if max(width, height) > MAX_INPUT_SIDE or width * height > MAX_INPUT_PIXELS:
        raise ValueError(
            f"{argument}: the image is {width}×{height} pixels; the limit is {MAX_INPUT_SIDE} pixels a side and "
            f"{MAX_INPUT_PIXELS} pixels in all (harmon.pipelines.image_processing.MAX_INPUT_SIDE / MAX_INPUT_PIXELS)"
        )


_STRICT_DECODING = threading.Lock()


@contextlib.contextmanager
def _truncated_files_refused() -> Iterator[None]:
    """PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while a file decodes, whatever the process set: it is a
    module-wide switch that other libraries turn on at import (lmms-eval's ``api/task.py`` does), after which a
    truncated file decodes silently with its missing rows filled in."""
    with _STRICT_DECODING:
        previous = PIL.ImageFile.LOAD_TRUNCATED_IMAGES
        PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            PIL.ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_image_file(path: str | os.PathLike, argument: str = "image") -> PIL.Image.Image:
    """A fully decoded PIL image from a file, its size checked on the header before any pixel is decoded; a
    truncated or corrupt file is refused (:func:`_truncated_files_refused`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no such image file: {path}")
    try:
        with PIL.Image.open(path) as opened:
            check_image_size(opened.width, opened.height, f"{argument} ({path})")
            with _truncated_files_refused():
                opened.load()
            return opened.copy()
    except PIL.Image.DecompressionBombError as error:  # PIL's own limit tripped while reading the header
        raise ValueError(
            f"{argument} ({path}): refused as a decompression bomb ({error}); the limit is {MAX_INPUT_SIDE} pixels "
            f"a side and {MAX_INPUT_PIXELS} pixels in all"
        ) from None
    except (OSError, SyntaxError) as error:  # PIL raises these for corrupt / truncated files
        raise ValueError(f"{argument}: {path} is not a readable image ({error})") from error


def load_image(image: ImageInput, argument: str = "image") -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, an ``(H, W[, C])`` array (uint8, or float in [0, 1]) or a
    ``(C, H, W)`` tensor in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image, argument)
    elif isinstance(image, torch.Tensor):
        image = _array_to_pil(image.detach().cpu(), argument, channels_first=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, argument, channels_first=False)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{argument} must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    check_image_size(image.width, image.height, argument)
    # the orientation a camera records in EXIF, applied as every viewer does (a no-op without the tag)
    image = PIL.ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except ValueError as error:  # a mode PIL cannot convert
        raise ValueError(f"{argument}: cannot convert a {image.mode!r} image to RGB ({error})") from error


def _array_to_pil(array: np.ndarray | torch.Tensor, argument: str, channels_first: bool) -> PIL.Image.Image:
    shape = tuple(array.shape)
    if len(shape) == 3 and channels_first:
        shape = shape[1:] + shape[:1]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3, 4)):
        layout = "(C, H, W)" if channels_first else "(H, W, C)"
        raise ValueError(f"{argument}: expected an image array {layout} with 1, 3 or 4 channels, got {tuple(array.shape)}")
    if 0 in shape:
        raise ValueError(f"{argument}: the image is empty (shape {tuple(array.shape)})")
    check_image_size(shape[1], shape[0], argument)  # before any copy of the values
    if isinstance(array, torch.Tensor):
        array = array.float().numpy()
    if channels_first and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)
    if array.dtype != np.uint8:
        check_finite_array(argument, array)
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"{argument}: float images must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
        array = (array * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB from any PIL mode: transparency (``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``, ``P`` with a transparent
    colour) composited on white, 16-bit gray divided by 257, 32-bit integer and float gray scaled by their maximum
    (``F`` must be finite), every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``)
    through PIL's own conversion."""
    if image.mode == "RGB":
        return image
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    if image.mode == "F":
        check_finite_array("image", np.asarray(image))
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return PIL.Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
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

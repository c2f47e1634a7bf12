"""Shared helpers of the analysis scripts (linear probe, Grad-CAM++, toy reproduction of Harmon's preliminary study).

Everything here goes through harmon's public API: the encoder registry (``ENCODERS``), the encoder interfaces
(``hidden_size`` and ``encode -> (B, N, D)``: a pixel encoder reads ``preprocess(pixels in [-1, 1])``, a MAR token
encoder reads VAE tokens), ``HarmonModel`` / ``HarmonPipeline`` and ``harmon.testing``. The pieces:

* **data** -- :func:`bundled_dataset` (scikit-learn's ``load_digits``; generated ``shapes`` / ``quadrants`` sets) and
  :func:`image_folder_dataset` (torchvision ``ImageFolder``). Images are ``[0, 1]`` tensors; the feature extractor
  resizes them to the encoder's input size and maps them to ``[-1, 1]``.
* **encoders** -- :class:`TokenFeatures` wraps any encoder as ``pixels -> token features (B, K + m*n, D)`` (``K``
  leading non-grid slots, e.g. MAR's buffer) with an identity *tap* module on its output, so that Grad-CAM can hook
  the token features of any encoder the same way, and the documented pooling (mean over the grid tokens, buffer
  excluded). :func:`load_encoder` builds one from a registered name and weights.
* **probe** -- the MAE linear-probe protocol on cached features: :class:`LinearProbe` (``BatchNorm1d(affine=False)``
  + ``Linear``), :func:`train_linear_probe` (SGD or timm's LARS, ``lr = base_lr * batch / 256``, linear warm-up then
  half-cosine), :func:`topk_accuracy`.
* **results** -- :func:`write_csv`, :func:`write_markdown_table`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from harmon import ENCODERS, HarmonModel, HarmonPipeline
from harmon.checkpoints import load_state_dict_strict, read_state_dict
from harmon.encoders.vae import KLAutoencoderConfig, build_kl_autoencoder, load_ldm_kl_checkpoint
from harmon.interfaces import GenerationEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATASETS = ("digits", "shapes", "quadrants")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("--dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
    return dtype


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads``: torch intra-op threads for the block (None / 0: leave torch's setting), restored afterwards so
    that an in-process ``main()`` leaves its caller as it was."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (dropout, modules' own init) and return a generator for explicit draws."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------------------------------------- data
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


# ------------------------------------------------------------------------------------------------------- encoders
class TokenFeatures(nn.Module):
    """``pixels (B, 3, H, W)`` in [-1, 1] -> token features ``(B, K + m*n, D)`` of one encoder.

    ``encode``: the encoder's pixels -> tokens function; ``buffer_size`` (``K``): leading slots that are not grid
    tokens (MAR's buffer; 0 for SigLIP, VAE, VQGAN); ``image_size``: the encoder's input side. The output goes through
    ``self.tap`` (an ``nn.Identity``), the module Grad-CAM hooks, whatever the encoder is. ``last_grid`` is the
    ``(m, n)`` grid of the latest forward, derived from the token count and the input's aspect ratio.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        modules: nn.Module | Sequence[nn.Module],
        *,
        hidden_size: int,
        buffer_size: int = 0,
        image_size: int = 256,
        name: str = "encoder",
        pool: str = "mean",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = modules if isinstance(modules, nn.Module) else nn.ModuleList(list(modules))
        self._encode = encode
        self.hidden_size = int(hidden_size)
        self.buffer_size = int(buffer_size)
        self.image_size = int(image_size)
        self.name = name
        self.pool_mode = pool
        self.info = dict(info or {})
        self.tap = nn.Identity()
        self.last_grid: tuple[int, int] | None = None
        self.tokenizer: Any = None  # set when the encoder comes from a Harmon pipeline (word targets need it)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [-1, 1] pixels at ``image_size`` (bicubic, antialiased, clamped: harmon's resize)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(0, 1)
        return (images * 2 - 1).to(self.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self._encode(pixels)
        if tokens.ndim != 3:
            raise ValueError(f"{self.name}: expected token features (B, N, D), got shape {tuple(tokens.shape)}")
        grid_len = tokens.shape[1] - self.buffer_size
        height, width = pixels.shape[-2:]
        stride = math.sqrt(height * width / max(grid_len, 1))
        m, n = round(height / stride), round(width / stride)
        if m * n != grid_len:
            raise ValueError(f"{self.name}: {grid_len} grid tokens do not tile a {height}x{width} image")
        self.last_grid = (m, n)
        if torch.is_grad_enabled() and not tokens.requires_grad:
            # a frozen encoder: make its output a leaf that records gradients, so that Grad-CAM can read
            # d score / d features at the tap without any encoder parameter needing a gradient
            tokens = tokens.detach().requires_grad_(True)
        return self.tap(tokens)

    def grid_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.buffer_size:]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The documented probe feature: the mean over the grid tokens (buffer excluded); ``first``: slot 0."""
        if self.pool_mode == "mean":
            return self.grid_tokens(tokens).mean(dim=1)
        if self.pool_mode == "first":
            return tokens[:, 0]
        raise ValueError(f"unknown pooling {self.pool_mode!r}")

    def reshape_transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """For ``pytorch_grad_cam``: ``(B, K + m*n, D)`` -> ``(B, D, m, n)`` (buffer dropped, grid restored, fp32)."""
        if self.last_grid is None:
            raise RuntimeError("reshape_transform is used before any forward pass")
        m, n = self.last_grid
        return rearrange(self.grid_tokens(tokens).float(), "b (m n) d -> b d m n", m=m, n=n)


class KLLatentEncoder(nn.Module):
    """``VisualEncoder`` over a diffusers ``AutoencoderKL``: the posterior mode ``(B, C, m, n)`` as ``(B, m*n, C)``
    tokens (times ``scale``). Used for the toy VAE and as a random-init baseline; the registered ``vae-kl16`` is the
    same idea for the real KL-16."""

    def __init__(self, vae: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(scale)

    @property
    def hidden_size(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode() * self.scale
        return rearrange(latents, "b c m n -> b (m n) c")


class VQLatentEncoder(nn.Module):
    """``VisualEncoder`` over a diffusers ``VQModel``: the quantized latents (nearest codebook entries) as
    ``(B, m*n, D)`` tokens. The quantizer's straight-through estimator lets gradients (Grad-CAM) reach the encoder."""

    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.vq = vq

    @property
    def hidden_size(self) -> int:
        return int(self.vq.config.vq_embed_dim or self.vq.config.latent_channels)

    def quantize(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized latents ``(B, D, m, n)``, code indices ``(B*m*n,)``)."""
        h = self.vq.encode(pixels.to(self.vq.dtype)).latents
        quant, _, (_, _, indices) = self.vq.quantize(h)
        return quant, indices

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return rearrange(self.quantize(pixels)[0], "b d m n -> b (m n) d")


class LatentMAREncoder(nn.Module):
    """``VisualEncoder`` on pixels from a MAR-style token encoder (``GenerationEncoder``: ``encode(tokens (B, m, n,
    C))`` -> ``(B, K + m*n, D)``, buffer first) and a KL autoencoder that tokenizes the pixels (posterior mode times
    ``scale``, patch size 1), as Harmon's understanding path does."""

    def __init__(self, vae: nn.Module, encoder: nn.Module, scale: float) -> None:
        super().__init__()
        self.vae = vae
        self.encoder = encoder
        self.scale = float(scale)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.hidden_size)

    @property
    def buffer_size(self) -> int:
        return int(self.encoder.buffer_size)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the tokenizer is frozen; gradients start at the MAR encoder, as in Harmon
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode() * self.scale
        return rearrange(latents, "b c m n -> b m n c").to(next(self.encoder.parameters()).dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(self.tokens(pixels))


def reads_pixels(encoder: Any) -> bool:
    """A pixel encoder (harmon's ``UnderstandingEncoder``: it has ``preprocess``; SigLIP, VQGAN, the KL VAE) rather
    than a token encoder reading VAE tokens (MAR: ``buffer_size``, ``token_dim``; harmon tokenises pixels first)."""
    return callable(getattr(encoder, "preprocess", None))


def is_token_encoder(encoder: Any) -> bool:
    return not reads_pixels(encoder) and isinstance(encoder, GenerationEncoder)


def pixel_encoder_features(encoder: nn.Module, name: str, *, modules: nn.Module | None = None,
                           image_size: int | None = None, info: dict | None = None) -> TokenFeatures:
    """A registered pixel encoder as :class:`TokenFeatures`: ``encode(preprocess(pixels))`` (its own size and
    mean/std, the ``UnderstandingEncoder`` contract; ``encode(pixels)`` for an encoder without ``preprocess``). No
    leading slots unless it declares ``buffer_size`` / ``num_prefix_tokens``."""
    if reads_pixels(encoder):
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return encoder.encode(encoder.preprocess(pixels))
    else:
        encode = encoder.encode
    buffer = _attribute(encoder, ("buffer_size", "num_prefix_tokens"), 0)
    return TokenFeatures(
        encode, modules if modules is not None else encoder, hidden_size=encoder.hidden_size, buffer_size=buffer,
        image_size=image_size or encoder_image_size(encoder), name=name, info=info,
    )


HARMON_ROLES = ("understanding", "generation")


def harmon_features(model: HarmonModel, name: str, role: str = "understanding", info: dict | None = None,
                    image_size: int | None = None) -> TokenFeatures:
    """An encoder of a Harmon model as :class:`TokenFeatures` (the whole model is kept as ``.encoder``, so the
    word target of Grad-CAM can run its LLM).

    ``role="understanding"``: the encoder Harmon understands with -- the shared MAR encoder (the paper's design) or
    a decoupled ``understanding_encoder``; ``"generation"``: the MAR encoder. A token encoder (MAR) reads the
    model's own KL tokens (``model.encode_image``) and returns ``(B, K + m*n, D)``, buffer first."""
    if role not in HARMON_ROLES:
        raise SystemExit(f"--harmon-encoder must be one of {HARMON_ROLES}, got {role!r}")
    decoupled = getattr(model, "understanding_encoder", None)
    encoder = decoupled if role == "understanding" and decoupled is not None else model.encoder
    component = ENCODERS.get(name).component
    if not isinstance(encoder, component):
        raise SystemExit(f"the Harmon model's {role} encoder is a {type(encoder).__name__}, not a {name!r} "
                         f"({component.__name__}); pass the matching --encoder (or --harmon-encoder)")
    # one class serves several registered sizes (mar-b, mar-h, mar-tiny): results name the folder's encoder
    spec = model.config.understanding_encoder if encoder is decoupled else model.config.encoder
    name = spec.name
    info = {**(info or {}), "encoder": name, "harmon_encoder": role if decoupled is not None else "shared"}
    if reads_pixels(encoder):
        return pixel_encoder_features(encoder, name, modules=model, image_size=image_size, info=info)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return encoder.encode(model.encode_image(pixels))

    return TokenFeatures(
        encode, model, hidden_size=encoder.hidden_size, buffer_size=encoder.buffer_size,
        image_size=image_size or model.config.image_size, name=name, info=info,
    )


def _attribute(obj: Any, names: Iterable[str], default: Any = None) -> Any:
    """First of ``names`` found on ``obj`` or on ``obj.config``."""
    for holder in (obj, getattr(obj, "config", None)):
        if holder is None:
            continue
        for name in names:
            value = getattr(holder, name, None)
            if value is not None:
                return value
    return default


def encoder_image_size(encoder: Any, default: int = 256) -> int:
    value = _attribute(encoder, ("image_size", "input_size"), default)
    if isinstance(value, (tuple, list)):
        value = value[-1]
    return int(value)


def _is_harmon_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _is_harmon_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / HarmonModel.CONFIG_NAME).is_file()


def is_harmon_folder(weights: str | os.PathLike | None) -> bool:
    return bool(weights) and (_is_harmon_pipeline_folder(Path(weights)) or _is_harmon_model_folder(Path(weights)))


def load_harmon_model(weights: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[HarmonModel, Any]:
    """(HarmonModel, tokenizer or None) from a ``HarmonPipeline`` folder (``model_index.json``) or a
    ``HarmonModel`` folder (which holds no tokenizer)."""
    path = Path(weights)
    if _is_harmon_pipeline_folder(path):
        kwargs = {"dtype": dtype} if dtype is not None else {}
        pipe = HarmonPipeline.from_pretrained(str(path), **kwargs)
        return pipe.model, pipe.tokenizer
    if _is_harmon_model_folder(path):
        model = HarmonModel.from_pretrained(path)
        return (model.to(dtype) if dtype is not None else model), None
    raise SystemExit(f"{path} is neither a HarmonPipeline folder (model_index.json) nor a HarmonModel folder "
                     f"({HarmonModel.CONFIG_NAME})")


def load_kl_vae(vae: str | os.PathLike | None, config: KLAutoencoderConfig | None = None) -> nn.Module:
    """A KL autoencoder: a diffusers ``AutoencoderKL`` folder, an original ``kl16.ckpt`` (LDM layout), or, when
    ``vae`` is None, a random-init one of ``config`` (default: KL-16)."""
    config = config or KLAutoencoderConfig()
    if vae is None:
        return build_kl_autoencoder(config).eval()
    path = Path(vae)
    if path.is_dir():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(path)).eval()
    return load_ldm_kl_checkpoint(path, config)


def build_registered_encoder(name: str, weights: str | None, overrides: dict[str, Any]) -> nn.Module:
    """``ENCODERS.create(name, **overrides)`` with ``weights``: through the component's own ``pretrained`` config
    field when it has one (SigLIP: a transformers folder; VQGAN: a taming ``.ckpt``; KL VAE: ``kl16.ckpt``), else
    loaded strictly from a state-dict file (or a folder holding one ``*.safetensors``)."""
    config_class = ENCODERS.get(name).config_class
    if weights and config_class is not None and "pretrained" in config_class.model_fields:
        return ENCODERS.create(name, **{**overrides, "pretrained": str(weights)})
    encoder = ENCODERS.create(name, **overrides)
    if weights:
        path = Path(weights)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise SystemExit(f"{path}: expected one *.safetensors file with the encoder's weights, found "
                                 f"{[f.name for f in files]}")
            path = files[0]
        load_state_dict_strict(encoder, read_state_dict(path), str(path))
    return encoder


def load_encoder(
    name: str,
    weights: str | None = None,
    *,
    vae: str | None = None,
    vae_scale: float = 0.2325,
    overrides: dict[str, Any] | None = None,
    smoke: bool = False,
    image_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    harmon_role: str = "understanding",
) -> TokenFeatures:
    """An encoder by registered ``name`` as frozen :class:`TokenFeatures` in eval mode.

    ``weights``:

    * a ``HarmonPipeline`` folder (``model_index.json``) or a ``HarmonModel`` folder -> that model's encoder
      (``harmon_role``: the one it understands with, shared MAR or decoupled; or its generation MAR), MAR reading
      the model's own KL-16 tokens (the pipeline's tokenizer is kept for word targets);
    * the encoder's own weights -> :func:`build_registered_encoder`;
    * ``None`` / ``"random"`` -> random init (``smoke`` with a MAR name: the tiny Harmon of
      ``harmon.testing.tiny_model``).

    A MAR-style token encoder built from the registry reads KL tokens from ``vae`` (an ``AutoencoderKL`` folder or
    ``kl16.ckpt``; a random KL-16 when absent) times ``vae_scale``.
    """
    if name not in ENCODERS:
        raise SystemExit(f"--encoder {name!r} is not registered; registered encoders: {', '.join(ENCODERS.list())}")
    overrides = dict(overrides or {})
    random_init = weights in (None, "", "random", "none")
    info = {"encoder": name, "weights": "random" if random_init else str(weights)}
    torch.manual_seed(seed)
    entry = ENCODERS.get(name)

    if not random_init and is_harmon_folder(weights):
        model, tokenizer = load_harmon_model(weights, dtype if dtype != torch.float32 else None)
        features = harmon_features(model, name, harmon_role, info, image_size)
        features.tokenizer = tokenizer
    elif random_init and smoke and not overrides and _is_mar_family(entry.component):
        from harmon.testing import tiny_model, tiny_tokenizer

        info["weights"] = "random (harmon.testing.tiny_model)"
        features = harmon_features(tiny_model(seed=seed), name, "understanding", info, image_size)
        features.tokenizer = tiny_tokenizer()
    else:
        encoder = build_registered_encoder(name, None if random_init else weights, overrides)
        if is_token_encoder(encoder):
            base_grid = getattr(getattr(encoder, "config", None), "base_grid", (16, 16))
            kl = load_kl_vae(vae)
            stride = 2 ** (len(kl.config.block_out_channels) - 1)
            info["vae"] = str(vae) if vae else "random KL-16"
            wrapped = LatentMAREncoder(kl, encoder, vae_scale)
            features = TokenFeatures(
                wrapped.encode, wrapped, hidden_size=encoder.hidden_size, buffer_size=encoder.buffer_size,
                image_size=image_size or base_grid[0] * stride, name=name, info=info,
            )
        else:
            features = pixel_encoder_features(encoder, name, image_size=image_size, info=info)
    if image_size:
        features.image_size = int(image_size)
    features = features.to(dtype).eval()
    features.requires_grad_(False)  # frozen: probes read it under no_grad, Grad-CAM reads gradients at its tap
    return features


def _is_mar_family(component: type) -> bool:
    return not callable(getattr(component, "preprocess", None)) and all(
        hasattr(component, attr) for attr in ("buffer_size", "token_dim", "encode", "forward"))


@torch.no_grad()
def extract_pooled_features(
    extractor: TokenFeatures,
    split: LabeledImages,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(N, D)`` (fp32, CPU) and labels ``(N,)`` of a split, one pass of the frozen encoder."""
    device = extractor.device
    loader = DataLoader(split.dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        tokens = extractor(extractor.prepare(images.to(device, non_blocking=True)))
        features.append(extractor.pool(tokens).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels).long()


def cache_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description (weights files contribute their size and mtime)."""
    spec = dict(spec)
    for key in ("weights", "vae"):
        value = spec.get(key)
        if value and Path(str(value)).exists():
            path = Path(str(value))
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            spec[key + "_stat"] = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path | None, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """``torch.load`` ``path`` if it exists (weights only), else ``compute()`` and save it; (value, was_cached)."""
    if path is not None and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), True
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
    return value, False


# ---------------------------------------------------------------------------------------------------------- probe
class LinearProbe(nn.Module):
    """MAE's linear probe: ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weights trunc-normal std 0.01,
    bias 0). The BatchNorm is a parameter-free feature standardization, so the classifier stays linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.float()))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then half-cosine to 0 (MAE's per-iteration schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(probe: LinearProbe, name: str, lr: float, weight_decay: float, momentum: float):
    """``sgd``: torch SGD with momentum. ``lars``: timm's LARS as MAE uses it -- layer-wise trust ratio on the
    weight matrix only (``always_adapt``, so it applies even at weight decay 0), plain momentum SGD for the bias."""
    if name == "sgd":
        return torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        from timm.optim import Lars

        return Lars(
            [
                {"params": [probe.linear.weight], "weight_decay": weight_decay, "always_adapt": True},
                {"params": [probe.linear.bias], "weight_decay": 0.0, "always_adapt": False},
            ],
            lr=lr, momentum=momentum,
        )
    raise SystemExit(f"--optimizer must be sgd or lars, got {name!r}")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k (k is capped at the number of classes, so top-5 of a 4-class task is 1.0)."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hits = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[k] = hits.float().mean().item() if len(labels) else float("nan")
    return out


@dataclass
class ProbeResult:
    probe: LinearProbe
    top1: float
    top5: float
    train_top1: float
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 90,
    base_lr: float = 0.1,
    batch_size: int = 256,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ProbeResult:
    """Train a :class:`LinearProbe` on cached features with MAE's protocol; evaluate top-1 / top-5 on ``val``.

    The absolute learning rate is ``base_lr * batch_size / 256``; the schedule runs per iteration (warm-up over
    ``warmup_epochs`` epochs, then half-cosine). The last epoch's head is evaluated (no selection on ``val``).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], num_classes).to(device)
    lr = base_lr * batch_size / 256
    opt = make_optimizer(probe, optimizer, lr, weight_decay, momentum)
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
    train_x, train_y = train_x.to(device), train_y.to(device)
    history = []
    for epoch in tqdm(range(epochs), desc="probe", disable=not progress, leave=False):
        probe.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            if len(index) < 2:  # BatchNorm needs two rows in training mode
                continue
            loss = F.cross_entropy(probe(train_x[index]), train_y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item() * len(index)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(train_x)})
    probe.eval()
    with torch.no_grad():
        val_acc = topk_accuracy(probe(val_x.to(device)), val_y.to(device))
        train_acc = topk_accuracy(probe(train_x), train_y, ks=(1,))
    return ProbeResult(probe.cpu(), val_acc[1], val_acc[5], train_acc[1], lr, history)


def probe_checkpoint(result: ProbeResult, **meta: Any) -> dict[str, Any]:
    """A ``torch.load(weights_only=True)``-readable record of a trained probe and what it was trained on."""
    return {"state_dict": result.probe.state_dict(), "feature_dim": result.probe.linear.in_features,
            "num_classes": result.probe.linear.out_features, **meta}


def load_probe(path: str | os.PathLike) -> tuple[LinearProbe, dict[str, Any]]:
    record = torch.load(path, map_location="cpu", weights_only=True)
    probe = LinearProbe(record["feature_dim"], record["num_classes"])
    probe.load_state_dict(record["state_dict"])
    return probe.eval(), record


class ProbeClassifier(nn.Module):
    """pixels -> encoder tokens -> pooled feature -> linear probe logits (the Grad-CAM model of a probe class)."""

    def __init__(self, features: TokenFeatures, probe: LinearProbe) -> None:
        super().__init__()
        self.features = features
        self.probe = probe

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.features.pool(self.features(pixels)))


# -------------------------------------------------------------------------------------------------------- results
def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or _columns(rows))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (hand-written: a dozen lines, and pandas' ``to_markdown`` would need tabulate)."""
    columns = list(columns or _columns(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(_fmt(row.get(c, ""))).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_markdown_table(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] | None = None,
                         title: str | None = None, notes: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns) + (f"\n{notes}\n" if notes else "")
    path.write_text(text)
    return path


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return value


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def save_json(data: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path

"""Encoders and features: :class:`TokenFeatures` wraps any encoder as ``pixels -> token features (B, K + m*n, D)``
(``K`` leading non-grid slots, e.g. MAR's buffer) with an identity *tap* module on its output, so that Grad-CAM can
hook the token features of any encoder the same way, and the documented pooling (mean over the grid tokens, buffer
excluded). :func:`load_encoder` builds one from a registered name and weights; features are cached on disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harmon import ENCODERS, HarmonModel, HarmonPipeline
from harmon.encoders.vae import KLAutoencoderConfig, build_kl_autoencoder, load_ldm_kl_checkpoint
from harmon.interfaces import GenerationEncoder

from experiments.common.data import LabeledImages


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
    """``ENCODERS.create(name, pretrained=weights, **overrides)``: built, then ``weights`` loaded strictly — the
    component's own released format when it has one (SigLIP: a transformers folder; VQGAN: a taming ``.ckpt``; KL
    VAE: ``kl16.ckpt``), else a state-dict file (or a folder holding one ``*.safetensors``)."""
    if weights and not callable(getattr(ENCODERS.get(name).component, "load_pretrained", None)):
        path = Path(weights)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise SystemExit(f"{path}: expected one *.safetensors file with the encoder's weights, found "
                                 f"{[f.name for f in files]}")
            weights = str(files[0])
    return ENCODERS.create(name, pretrained=weights or None, **overrides)


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



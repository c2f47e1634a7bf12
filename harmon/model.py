"""HarmonModel: one MAR encoder, a language backbone, a MAR decoder, a diffusion head and a VAE, composed through
the interfaces of :mod:`harmon.interfaces`.

* understanding — image → VAE tokens → encoder (nothing masked) → ``proj_in`` → spliced into the prompt at the
  image placeholder → the LLM answers (``generate``). That is the shared design (one encoder object for both
  tasks). With a decoupled ``understanding_encoder`` (``config.understanding_encoder``, Janus-like) understanding
  runs through it and its own ``understanding_proj_in`` instead: a pixel encoder (SigLIP, VQGAN, the KL VAE, a
  plugin) on its own preprocessing, or a second MAR encoder on this model's VAE tokens
  (:meth:`HarmonModel.understanding_embeddings`, used by :meth:`image_embeddings` and :meth:`image_to_text_loss`);
* generation — the masked-autoregressive sampler (:meth:`HarmonModel.generate_tokens`) over the prompt's KV cache;
* training — :meth:`text_to_image_loss` and :meth:`image_to_text_loss`.

Batches for classifier-free guidance are laid out as the original: rows ``[cond_0 … cond_{B-1}, uncond_0 …
uncond_{B-1}]``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import DynamicCache

from harmon.checkpoints import load_state_dict_strict
from harmon.configs import HarmonConfig
from harmon.encoders.common import saved_weights_follow
from harmon.encoders.vae import build_kl_autoencoder
from harmon.interfaces import (
    DiffusionHead,
    GenerationEncoder,
    LanguageBackbone,
    LatentAutoencoder,
    RandomSource,
    TokenDecoder,
    UnderstandingEncoder,
    VisualEncoder,
)
from harmon.layers import mlp_connector
from harmon.randomness import as_random_source
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS, InterfaceError, protocol_members

GUIDANCE_SCHEDULES = ("constant", "linear")
SAMPLERS = ("exact", "plain", "fast")


def mask_schedule(seq_len: int, num_steps: int) -> list[int]:
    """Tokens still masked after each of the ``num_steps`` sampler steps (the original's ``mask_len``).

    Cosine schedule ``floor(L·cos(π/2·(k+1)/K))``, clamped so that every step but the last leaves at least one
    token masked and predicts at least one while two or more remain. The last step predicts all that remain.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    remaining = seq_len
    lengths = []
    for step in range(num_steps):
        # the original evaluates the ratio with numpy in float64 and floors it there
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_steps)
        length = int(np.floor(seq_len * ratio))
        length = max(1, min(remaining - 1, length))
        lengths.append(length)
        remaining = length
    return lengths


@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_class: type) -> str:
    """The keyword a transformers decoder takes its KV cache by (``cache`` from transformers 5.2x on, earlier
    ``past_key_values``)."""
    parameters = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@functools.lru_cache(maxsize=None)
def _accepts_keyword(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGradient.apply(x, scale)


def _restore_tied_weights(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    # safetensors stores a tensor shared by several parameters once: give the other names their value back
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    for names in by_storage.values():
        present = [name for name in names if name in state_dict]
        if present:
            for name in names:
                state_dict.setdefault(name, state_dict[present[0]])


def understanding_input_kind(encoder: VisualEncoder, token_dim: int) -> str:
    """``"pixels"`` for a pixel understanding encoder (it has ``preprocess``: :class:`UnderstandingEncoder`),
    ``"tokens"`` for a token encoder reading VAE tokens (MAR: ``buffer_size``, ``token_dim``); anything else, or a
    token encoder of other token channels, raises naming what is missing."""
    ENCODERS.check(encoder, "understanding_encoder")
    name = type(encoder).__qualname__
    if callable(getattr(encoder, "preprocess", None)):
        methods, attributes = protocol_members(UnderstandingEncoder)
        missing = sorted(m for m in methods | attributes if not hasattr(encoder, m))
        if missing:
            raise InterfaceError(f"understanding encoder {name} does not implement UnderstandingEncoder: "
                                 f"missing {', '.join(missing)}")
        return "pixels"
    missing = [m for m in ("buffer_size", "token_dim") if not hasattr(encoder, m)]
    if missing:
        raise InterfaceError(
            f"understanding encoder {name} is neither a pixel encoder (UnderstandingEncoder: preprocess, image_size, "
            f"image_mean, image_std) nor a token encoder (missing {', '.join(missing)})"
        )
    if encoder.token_dim != token_dim:
        raise ValueError(f"understanding encoder {name} reads {encoder.token_dim}-channel tokens, the VAE makes {token_dim}")
    return "tokens"


class HarmonModel(nn.Module):
    """Harmon: a shared MAR encoder for understanding and generation around a causal LLM (or, decoupled, a separate
    understanding encoder)."""

    def __init__(
        self,
        config: HarmonConfig,
        *,
        vae: LatentAutoencoder,
        encoder: GenerationEncoder,
        decoder: TokenDecoder,
        head: DiffusionHead,
        llm: LanguageBackbone,
        proj_in: nn.Module | None = None,
        proj_out: nn.Module | None = None,
        understanding_encoder: VisualEncoder | None = None,
        understanding_proj_in: nn.Module | None = None,
    ) -> None:
        """Compose the components; ``proj_in`` / ``proj_out`` (the connectors) are created when not given.

        ``understanding_encoder``: ``None`` (or ``encoder`` itself) for the shared design; else the decoupled
        understanding encoder named by ``config.understanding_encoder``, with ``understanding_proj_in``
        (Linear·SiLU·Linear from its ``hidden_size`` to the LLM's, created when not given)."""
        super().__init__()
        for registry, component, role in (
            (ENCODERS, encoder, "encoder"),
            (DECODERS, decoder, "decoder"),
            (HEADS, head, "head"),
            (BACKBONES, llm, "llm"),
        ):
            registry.check(component, role)
        for name in ("buffer_size", "token_dim", "embed_dim"):
            if not hasattr(encoder, name):
                raise InterfaceError(f"the generation encoder must provide {name!r} (GenerationEncoder)")
        self.config = config
        self.vae = vae
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.llm = llm
        hidden = llm.config.hidden_size
        self.proj_in = proj_in if proj_in is not None else mlp_connector(encoder.embed_dim, hidden, hidden)
        self.proj_out = proj_out if proj_out is not None else mlp_connector(hidden, hidden, encoder.embed_dim)
        if understanding_encoder is encoder:
            understanding_encoder = None  # one object for both roles: that is the shared design
        if (understanding_encoder is None) != (config.understanding_encoder is None):
            raise ValueError(
                "config.understanding_encoder and the understanding_encoder given must agree: "
                f"config says {config.understanding_encoder.name if config.understanding_encoder else 'shared'!r}, "
                f"got {type(understanding_encoder).__name__ if understanding_encoder is not None else 'none (shared)'}"
            )
        if understanding_encoder is None and understanding_proj_in is not None:
            raise ValueError("understanding_proj_in belongs to a decoupled understanding_encoder; the shared design "
                             "uses proj_in")
        # shared: no module of its own (the state dict keeps the original keys); decoupled: encoder + connector
        self.understanding_encoder = understanding_encoder
        self.understanding_proj_in = None
        self._understanding_input = "shared"
        if understanding_encoder is not None:
            self._understanding_input = understanding_input_kind(understanding_encoder, config.token_dim)
            self.understanding_proj_in = (
                understanding_proj_in if understanding_proj_in is not None
                else mlp_connector(understanding_encoder.hidden_size, hidden, hidden)
            )

    @classmethod
    def from_config(cls, config: HarmonConfig) -> "HarmonModel":
        """A randomly initialised model with every component built through its registry."""
        understanding = config.understanding_encoder
        return cls(
            config,
            vae=build_kl_autoencoder(config.vae),
            encoder=config.encoder.build(ENCODERS),
            decoder=config.decoder.build(DECODERS),
            head=config.head.build(HEADS),
            llm=config.backbone.build(BACKBONES),
            understanding_encoder=understanding.build(ENCODERS) if understanding is not None else None,
        ).eval()

    # -------------------------------------------------------------------------------------------- save / load
    CONFIG_NAME = "harmon_config.json"
    WEIGHTS_NAME = "model.safetensors"

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``harmon_config.json`` and ``model.safetensors`` (all components) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))
        save_model(self, str(folder / self.WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "HarmonModel":
        """Load a folder written by :meth:`save_pretrained` (strict: every tensor must fit)."""
        folder = Path(folder)
        config_path, weights_path = folder / cls.CONFIG_NAME, folder / cls.WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{folder} is not a saved HarmonModel: {path.name} is missing")
        with saved_weights_follow():  # components' own pretrained weights are in the file: skip loading them
            model = cls.from_config(HarmonConfig.model_validate_json(config_path.read_text()))
        state_dict = load_file(str(weights_path))
        _restore_tied_weights(model, state_dict)
        load_state_dict_strict(model, state_dict, str(weights_path))
        return model.eval()

    # ------------------------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in[0].weight.dtype

    @property
    def buffer_size(self) -> int:
        return self.encoder.buffer_size

    @property
    def shared_encoder(self) -> bool:
        """True when one encoder object serves both understanding and generation (the paper's design)."""
        return self.understanding_encoder is None

    def understanding_modules(self) -> tuple[nn.Module, nn.Module]:
        """``(encoder, connector)`` of the understanding path: ``(self.encoder, self.proj_in)`` — the very
        generation modules — when shared, else ``(understanding_encoder, understanding_proj_in)``."""
        if self.understanding_encoder is None:
            return self.encoder, self.proj_in
        return self.understanding_encoder, self.understanding_proj_in

    @property
    def understanding_reads_pixels(self) -> bool:
        """Whether understanding needs pixels (a pixel encoder) rather than this model's VAE tokens."""
        return self._understanding_input == "pixels"

    @property
    def understanding_image_size(self) -> int:
        """Square side understanding images are resized to: the understanding encoder's ``image_size`` for a pixel
        encoder, else the model's ``image_size``."""
        if self.understanding_reads_pixels:
            return int(self.understanding_encoder.image_size)
        return self.config.image_size

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(m, n)`` of an image of ``height × width`` pixels."""
        stride = self.config.latent_stride
        if height % stride or width % stride or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {stride}, got {height}×{width}")
        return height // stride, width // stride

    # ------------------------------------------------------------------------------------- pixels <-> tokens
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → tokens ``(B, m, n, C)`` (VAE posterior mode × ``vae_scale``)."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode() * self.config.vae_scale
        p = self.config.patch_size
        return rearrange(latents, "b c (m p) (n q) -> b m n (c p q)", p=p, q=p).to(self.dtype)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, m, n, C)`` → pixels ``(B, 3, H, W)`` (roughly in [-1, 1]); ``tokens`` is not modified."""
        p = self.config.patch_size
        latents = rearrange(tokens / self.config.vae_scale, "b m n (c p q) -> b c (m p) (n q)", p=p, q=p)
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    # ----------------------------------------------------------------------------------------- visual path
    def visual_features(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, m, n, C)`` → ``(x_enc, z_enc)``.

        ``x_enc (B, K + seen, D)``: the encoder output, buffer first; ``z_enc (B, seen + K, H)``: ``proj_in(x_enc)``
        with the buffer moved to the end, ready for the LLM.
        """
        batch, m, n, channels = tokens.shape
        flat = tokens.reshape(batch, m * n, channels)
        if mask is None:
            mask = flat.new_zeros(batch, m * n)
        x_enc = self.encoder(flat, mask, (m, n))
        z_enc = self.proj_in(x_enc)
        k = self.buffer_size
        return x_enc, torch.cat([z_enc[:, k:], z_enc[:, :k]], dim=1)

    def _through_llm(
        self,
        x_enc: torch.Tensor,
        z_enc: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: DynamicCache | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the visual embeddings through the LLM after the prompt (cached, or given as ``prompt_embeds``)
        and return ``x_enc + proj_out(llm_out)`` with the buffer back in front: ``(B, K + seen, D)``."""
        batch, length, _ = z_enc.shape
        attention_mask = attention_mask.to(device=z_enc.device, dtype=torch.bool)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, length)], dim=1)
        position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        if past_key_values is not None:
            inputs_embeds = z_enc
            position_ids = position_ids[:, -length:]
        else:
            if prompt_embeds is None:
                raise ValueError("either a prompt KV cache or the prompt embeddings are needed")
            inputs_embeds = torch.cat([prompt_embeds, z_enc], dim=1)
        output = self.llm_hidden_states(inputs_embeds, attention_mask, position_ids, cache=past_key_values)
        z_llm = output.last_hidden_state[:, -length:]
        k = self.buffer_size
        z_llm = torch.cat([z_llm[:, -k:], z_llm[:, :-k]], dim=1) if k else z_llm
        return x_enc + self.proj_out(z_llm)

    def encoder_step(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: DynamicCache | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder → ``proj_in`` → LLM (after the prompt) → residual ``proj_out``: tokens ``(B, m, n, C)``, mask
        ``(B, m·n)`` → ``(B, K + seen, D)``. With a cache, the cache grows by the visual length: cut it back."""
        x_enc, z_enc = self.visual_features(tokens, mask)
        return self._through_llm(x_enc, z_enc, attention_mask, past_key_values, prompt_embeds)

    # ------------------------------------------------------------------------------------------- generation
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids.to(self.device))

    def llm_hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ):
        """The LLM's decoder (no LM head) on ``inputs_embeds (B, T, H)``; with ``cache``, appends to it.
        Returns the transformers output (``.last_hidden_state``)."""
        decoder = self.llm.get_decoder()
        kwargs = {_cache_keyword(type(decoder)): cache} if cache is not None else {}
        return decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **kwargs,
        )

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> DynamicCache:
        """KV cache of the prompt rows. As the original, the prefill attends to padding (right-padded prompts make
        that harmless: padding comes after every real token) and every later step masks it out."""
        cache = DynamicCache()
        self.llm_hidden_states(self.embed_text(input_ids), cache=cache)
        return cache

    @torch.no_grad()
    def generate_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_shape: tuple[int, int],
        num_steps: int = 64,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        random_source: RandomSource | None = None,
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        sampler: str = "exact",
        head_steps: int | None = None,
        compile_head: bool = False,
    ) -> torch.Tensor:
        """Masked-autoregressive sampling of latent tokens.

        ``input_ids``/``attention_mask`` ``(R, T)`` are right-padded prompt rows: ``R = B`` without guidance,
        ``R = 2B`` (``[cond; uncond]``) when ``guidance_scale`` ≠ 1. Returns the conditional rows' tokens
        ``(B, m, n, C)``. Randomness (generation orders, every noise draw) comes from ``random_source``, by
        default built on ``generator``. ``callback(step, num_steps, tokens)`` runs after each step.

        ``sampler``: ``"exact"`` (default) runs the head's fused sampling loop (``head.prepare_sampler``: same
        draws in the same order, same samples as ``"plain"`` to float round-off, several times faster) and asks
        the decoder for the predicted positions' conditions only (a decoder whose ``forward`` takes
        ``positions``: the MAR decoder then runs its last block at those positions); ``"plain"`` the
        straightforward loop (whole decoder output, indexed; ``head.sample``), kept to re-measure against; ``"fast"`` the fused
        loop on the head's schedule respaced to ``head_steps`` denoising steps (default: a quarter of the head's),
        coupled to the exact sampler's draws (its quality cost is in ``docs/performance.md``). ``compile_head``
        wraps the fused loop's step in ``torch.compile`` (CUDA graphs on CUDA; untested there).
        """
        m, n = image_shape
        seq_len = m * n
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if not 1 <= num_steps <= seq_len:
            raise ValueError(f"num_steps must be between 1 and the number of tokens {seq_len}, got {num_steps}")
        guided = guidance_scale != 1.0
        rows = input_ids.shape[0]
        if guided and rows % 2:
            raise ValueError(f"guidance needs [cond; uncond] prompt rows, got an odd number of rows ({rows})")
        images = rows // 2 if guided else rows
        if isinstance(generator, (list, tuple)) and len(generator) != images:
            raise ValueError(f"generator: got a list of {len(generator)} generators for {images} images")
        source = as_random_source(generator, random_source)
        head_sample = self._head_sampler(sampler, head_steps, compile_head)
        # exact/fast: the decoder computes its last block at the predicted positions only (plain: everywhere)
        decoder_at_positions = sampler != "plain" and _accepts_keyword(type(self.decoder).forward, "positions")
        share_encoder = sampler != "plain"  # exact/fast: one encoder pass per guidance pair (plain: both halves)
        device, dtype = self.device, self.dtype
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)

        cache = self.prefill(input_ids)
        prompt_length = cache.get_seq_length()
        tokens = torch.zeros(rows, seq_len, self.config.token_dim, device=device, dtype=dtype)
        mask = torch.ones(rows, seq_len, device=device, dtype=dtype)
        orders = source.orders(images, seq_len, device)
        if guided:
            orders = torch.cat([orders, orders])

        lengths = mask_schedule(seq_len, num_steps)
        steps: Iterable[int] = range(num_steps)
        if progress is not None:
            steps = progress(steps)
        for step in steps:
            if step == num_steps - 1:
                to_predict, next_mask = mask.bool(), mask
            else:
                next_mask = torch.zeros_like(mask).scatter_(1, orders[:, : lengths[step]], 1.0)
                to_predict = mask.bool() & ~next_mask.bool()
            if guided and share_encoder:
                # both halves hold the same tokens, mask and buffer and the encoder does not read the prompt: one
                # encoder pass for each guidance pair, repeated for the unconditional rows (exact, not approximate)
                x_half, z_half = self.visual_features(tokens[:images].view(images, m, n, -1), mask[:images])
                x_enc = self._through_llm(
                    torch.cat([x_half, x_half]), torch.cat([z_half, z_half]), attention_mask, past_key_values=cache
                )
            else:
                x_enc = self.encoder_step(tokens.view(rows, m, n, -1), mask, attention_mask, past_key_values=cache)
            cache.crop(prompt_length - cache.get_seq_length())
            if decoder_at_positions:  # the conditions of the tokens predicted now, and only those
                conditions = self.decoder(x_enc, mask, (m, n), positions=to_predict)
            else:
                conditions = self.decoder(x_enc, mask, (m, n))[to_predict]
            mask = next_mask
            if guided and guidance_schedule == "linear":
                # float32 tensor arithmetic, as the original computes it from its mask_len tensor
                # computed in float32, then handed to the head as a Python number so that it follows the head's
                # dtype (a float32 tensor here broke bfloat16 sampling)
                left = torch.tensor([float(lengths[step])])
                scale = float(1 + (guidance_scale - 1) * (seq_len - left) / seq_len)
            else:
                scale = guidance_scale
            if to_predict.any():
                sampled = head_sample(
                    conditions, temperature=temperature, guidance_scale=scale, random_source=source,
                    row_groups=rows,
                )
                tokens[to_predict] = sampled.to(dtype)
            if guided:
                # as the original (``cur_tokens[bsz//2:] = cur_tokens[:bsz//2]``): the unconditional rows take the
                # conditional rows' tokens, so both halves feed the encoder the same tokens at the next step
                tokens[images:] = tokens[:images]
            if callback is not None:
                callback(step, num_steps, tokens[:images].view(images, m, n, -1))
        return tokens[:images].view(images, m, n, -1)

    def _head_sampler(self, sampler: str, head_steps: int | None, compile_head: bool) -> Callable[..., torch.Tensor]:
        """The head's sampling function for one :meth:`generate_tokens` call (``head.sample``'s contract)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if head_steps is not None and sampler != "fast":
            raise ValueError(f"head_steps applies to sampler='fast' only (got sampler={sampler!r})")
        if sampler == "plain":
            return self.head.sample
        prepare = getattr(self.head, "prepare_sampler", None)
        if prepare is None:
            if sampler == "fast":
                raise ValueError(f"sampler='fast' needs a head with prepare_sampler; {type(self.head).__name__} has none")
            return self.head.sample  # a head without a fused loop: its own sample() is its exact sampler
        return prepare(num_steps=head_steps, fast=sampler == "fast", compile=compile_head)

    @torch.no_grad()
    def generate_images(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """:meth:`generate_tokens` then VAE decoding: pixels ``(B, 3, H, W)``."""
        return self.decode_tokens(self.generate_tokens(input_ids, attention_mask, **kwargs))

    # ---------------------------------------------------------------------------------------- understanding
    def understanding_embeddings(
        self, pixels: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The understanding path, ``(B, N, H)`` LLM-side visual embeddings, from pixels ``(B, 3, H, W)`` in
        [-1, 1] or, for a path that reads VAE tokens, tokens ``(B, m, n, C)`` from :meth:`encode_image`.

        * shared: tokens → ``encoder`` (nothing masked) → ``proj_in``, buffer moved to the end (N = m·n + K);
        * decoupled token encoder (MAR): the same on its own encoder and ``understanding_proj_in``;
        * decoupled pixel encoder: ``preprocess`` (its size, mean/std) → ``encode`` → ``understanding_proj_in``
          (N = its number of features); ``tokens`` cannot stand in for pixels there.
        """
        encoder = self.understanding_encoder
        if not self.understanding_reads_pixels:
            if tokens is None:
                if pixels is None:
                    raise ValueError("understanding needs pixels (or the VAE tokens of encode_image)")
                tokens = self.encode_image(pixels)
            if encoder is None:
                return self.visual_features(tokens)[1]
            x_enc = encoder.encode(tokens.to(self.dtype))  # (B, K + m·n, D), buffer first
            z_enc = self.understanding_proj_in(x_enc)
            k = encoder.buffer_size
            return torch.cat([z_enc[:, k:], z_enc[:, :k]], dim=1)
        if pixels is None:
            raise ValueError(
                f"the understanding encoder ({self.config.understanding_encoder.name}) reads pixels: pass pixels, "
                "VAE tokens cannot stand in for them"
            )
        features = encoder.encode(encoder.preprocess(pixels.to(self.device)))
        return self.understanding_proj_in(features.to(self.dtype))

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` → the LLM-side visual embeddings ``(B, N, H)`` of the understanding path
        (shared: N = m·n + K)."""
        return self.understanding_embeddings(pixels)

    def splice_image_embeddings(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
    ) -> torch.Tensor:
        """Text embeddings of ``input_ids`` with the rows of ``image_embeds (B, N, H)`` placed, in order, at the
        positions holding ``image_token_id`` (each prompt must hold exactly N of them)."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == image_token_id
        per_row = is_image.sum(dim=1)
        if not bool((per_row == image_embeds.shape[1]).all()) or input_ids.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"each prompt needs {image_embeds.shape[1]} image placeholder tokens (id {image_token_id}) for "
                f"{image_embeds.shape[0]} image(s); found {per_row.tolist()}"
            )
        text_embeds = self.embed_text(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        return text_embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(text_embeds.dtype))

    @torch.no_grad()
    def answer(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Decode an answer after ``inputs_embeds`` with transformers ``generate``: the new token ids ``(B, T')``."""
        return self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
            **generate_kwargs,
        )

    # --------------------------------------------------------------------------------------------- training
    def random_training_mask(self, batch: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """MAR's training mask: a masking ratio from a normal(1, 0.25) truncated to [mask_ratio_min, 1], then the
        first ``ceil(L·ratio)`` positions of a random order per row are masked."""
        ratio = torch.empty(1)
        torch.nn.init.trunc_normal_(ratio, mean=1.0, std=0.25, a=self.config.mask_ratio_min, b=1.0, generator=generator)
        num_masked = int(math.ceil(seq_len * float(ratio)))
        orders = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(batch)])
        mask = torch.zeros(batch, seq_len).scatter_(1, orders[:, :num_masked], 1.0)
        return mask.to(device=self.device, dtype=self.dtype)

    def text_to_image_loss(
        self,
        tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Diffusion loss on the masked tokens of ``tokens (B, m, n, C)`` (from :meth:`encode_image`) given the
        prompts; each token row is repeated ``diffusion_batch_mul`` times for the head."""
        batch, m, n, channels = tokens.shape
        if mask is None:
            mask = self.random_training_mask(batch, m * n, generator)
        x_enc = self.encoder_step(tokens, mask, attention_mask, prompt_embeds=self.embed_text(input_ids))
        z = self.decoder(x_enc, mask, (m, n))
        repeats = self.head.config.diffusion_batch_mul
        target = tokens.reshape(batch * m * n, channels).repeat(repeats, 1)
        z = z.reshape(batch * m * n, -1).repeat(repeats, 1)
        return self.head.loss(target, z, mask.reshape(-1).repeat(repeats), generator=generator)

    def image_to_text_loss(
        self,
        tokens: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_token_id: int,
        *,
        pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy on the answer tokens (``labels`` ≥ 0; -100 elsewhere) given the image, through
        the understanding path (:meth:`understanding_embeddings`); the visual features' gradient is scaled by
        ``config.visual_grad_scale``.

        The image comes as VAE ``tokens`` (from :meth:`encode_image`) and/or ``pixels`` in [-1, 1]: each path
        reads what it needs (a decoupled pixel encoder needs ``pixels``; passing both always works)."""
        z_enc = self.understanding_embeddings(pixels, tokens=tokens)
        z_enc = scale_gradient(z_enc, self.config.visual_grad_scale)
        inputs_embeds = self.splice_image_embeddings(input_ids, z_enc, image_token_id)
        hidden = self.llm_hidden_states(inputs_embeds, attention_mask.to(self.device)).last_hidden_state[:, :-1]
        labels = labels.to(self.device)[:, 1:]
        keep = labels >= 0
        if not bool(keep.any()):
            raise ValueError("labels hold no answer token (all are negative)")
        logits = self.llm.get_output_embeddings()(hidden[keep])
        return F.cross_entropy(logits.float(), labels[keep])

    def reconstruction_loss(
        self,
        tokens: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_token_id: int,
        *,
        pixels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """RecA's reconstruction loss (Xie et al., 2025, arXiv 2509.07295): the text→image diffusion loss on the
        masked tokens of an image, conditioned on the model's *own understanding embeddings* of that image.

        The image goes through the understanding path (:meth:`understanding_embeddings`: shared, the MAR encoder
        with nothing masked and ``proj_in``; decoupled, the understanding encoder and its connector) with the
        gradient scaled by ``config.visual_grad_scale`` as in :meth:`image_to_text_loss`; the embeddings replace
        the ``image_token_id`` placeholders of ``input_ids`` (:meth:`splice_image_embeddings`); that prompt
        conditions the masked-autoregressive loss of :meth:`text_to_image_loss` on the image's VAE ``tokens``
        ``(B, m, n, C)``. ``pixels`` are needed by a decoupled pixel encoder (and are VAE-encoded when ``tokens``
        is None)."""
        if tokens is None:
            if pixels is None:
                raise ValueError("reconstruction_loss needs the image: pass tokens (encode_image) or pixels")
            tokens = self.encode_image(pixels.to(self.device))
        z_understanding = self.understanding_embeddings(pixels, tokens=tokens)
        z_understanding = scale_gradient(z_understanding, self.config.visual_grad_scale)
        prompt_embeds = self.splice_image_embeddings(input_ids, z_understanding, image_token_id)
        batch, m, n, channels = tokens.shape
        if mask is None:
            mask = self.random_training_mask(batch, m * n, generator)
        x_enc = self.encoder_step(tokens, mask, attention_mask.to(self.device), prompt_embeds=prompt_embeds)
        z = self.decoder(x_enc, mask, (m, n))
        repeats = self.head.config.diffusion_batch_mul
        target = tokens.reshape(batch * m * n, channels).repeat(repeats, 1)
        z = z.reshape(batch * m * n, -1).repeat(repeats, 1)
        return self.head.loss(target, z, mask.reshape(-1).repeat(repeats), generator=generator)

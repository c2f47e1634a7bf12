"""Typed interfaces (``typing.Protocol``) of the roles a Harmon model is made of.

Notation: ``B`` batch, ``m × n`` the latent grid (image H/16 × W/16), ``L = m·n`` tokens, ``C`` token channels
(16 for KL-16), ``K`` buffer slots, ``D`` encoder width, ``D'`` decoder width, ``H`` LLM hidden size. Masks are
float with 1 = masked (hidden from the encoder, to be predicted), as in the reference implementation.

:class:`HarmonModel` depends only on these protocols, so any registered component that implements them can
replace the reference one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class VisualEncoder(Protocol):
    """Image features: what every component of the ``ENCODERS`` registry provides.

    ``encode(x)`` → features ``(B, N, hidden_size)``. A *pixel* encoder (:class:`UnderstandingEncoder`: SigLIP,
    VQGAN, the KL VAE, plugins) reads pixels prepared by its own ``preprocess``; a *token* encoder
    (:class:`GenerationEncoder`: MAR) reads VAE tokens ``(B, m, n, C)``, the model tokenising pixels first.
    """

    hidden_size: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class UnderstandingEncoder(VisualEncoder, Protocol):
    """A pixel encoder that can serve as Harmon's (decoupled) understanding encoder, with its own preprocessing.

    ``preprocess(pixels)``: ``(B, 3, H, W)`` floats in [-1, 1] (any size) → ``encode``'s input
    ``(B, 3, image_size, image_size)``: padded to a square with gray, resized, then normalised per channel as
    ``((pixels + 1) / 2 - image_mean) / image_std`` (transformers' convention on [0, 1] pixels; mean = std = 0.5
    keeps [-1, 1]). ``encode(preprocess(pixels))`` → ``(B, N, hidden_size)``, N fixed by ``image_size``.
    :class:`harmon.encoders.common.PixelPreprocessing` implements ``preprocess`` from the three attributes.
    """

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class GenerationEncoder(VisualEncoder, Protocol):
    """A MAR-style encoder over latent tokens with buffer slots.

    ``forward(tokens, mask, image_shape)``: tokens ``(B, L, C)``, mask ``(B, L)`` (1 = masked; every row hides
    the same number of tokens), ``image_shape = (m, n)`` → ``(B, K + seen, D)``: the ``K`` buffer slots first
    (filled with the unconditional ``fake_latent``), then the embeddings of the seen tokens in raster order; the
    masked tokens are dropped. ``encode`` of a :class:`VisualEncoder` is not required to work on pixels for a
    token encoder (the model tokenizes images first); it must accept tokens ``(B, m, n, C)``.
    """

    buffer_size: int
    token_dim: int

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]
    ) -> torch.Tensor: ...


@runtime_checkable
class TokenDecoder(Protocol):
    """Per-token conditions for the diffusion head.

    ``forward(x, mask, image_shape)``: encoder-side features ``(B, K + seen, D)``, mask ``(B, L)`` →
    ``(B, L, D')``, one condition vector per latent token (buffer dropped).

    Optional: a ``positions`` keyword (bool ``(B, L)``) returning only ``conditions[positions]`` as ``(N, D')``;
    the exact and fast samplers use it when ``forward`` accepts it, to skip work for tokens not predicted yet.
    """

    embed_dim: int

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]
    ) -> torch.Tensor: ...


@runtime_checkable
class LanguageBackbone(Protocol):
    """A decoder-only LLM with the Hugging Face causal-LM surface (e.g. ``Qwen2ForCausalLM``).

    ``get_decoder()(inputs_embeds (B, T, H), attention_mask (B, T_past + T), position_ids (B, T),
    past_key_values, use_cache)`` → ``.last_hidden_state (B, T, H)`` and ``.past_key_values`` (a transformers
    ``Cache``); ``get_output_embeddings()`` maps hidden states to vocabulary logits; ``generate`` decodes text.
    """

    config: Any

    def get_input_embeddings(self) -> torch.nn.Module: ...

    def get_output_embeddings(self) -> torch.nn.Module: ...

    def get_decoder(self) -> torch.nn.Module: ...

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


class RandomSource(Protocol):
    """Where every random draw of the sampler comes from (default: a ``torch.Generator``).

    ``orders(batch, seq_len, device)`` → ``(batch, seq_len)`` int64, one random permutation per image;
    ``randn(shape, device, dtype, groups)`` → standard normal draws; the first dimension of ``shape`` is made of
    ``groups`` equal blocks, one per image row, so a per-image source can draw each block from its own generator.
    """

    def orders(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor: ...

    def randn(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, groups: int = 1
    ) -> torch.Tensor: ...


@runtime_checkable
class DiffusionHead(Protocol):
    """A per-token diffusion model over ``C``-channel tokens conditioned on ``D'``-vectors.

    ``forward(x, t, c)``: noisy tokens ``(N, C)``, integer timesteps ``(N,)``, conditions ``(N, D')`` →
    ``(N, 2C)`` (ε and the learned-range variance interpolation). ``sample(c, temperature, guidance_scale,
    random_source, row_groups)`` → ``(N, C)``; with guidance ≠ 1 the first half of ``c`` is conditional, the second
    unconditional; the rows form ``row_groups`` equal per-image blocks. ``loss(target, c, mask)`` → scalar training loss.
    """

    token_dim: int

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor: ...

    def sample(
        self,
        c: torch.Tensor,
        temperature: float,
        guidance_scale: float | torch.Tensor,
        random_source: RandomSource,
        row_groups: int = 1,
    ) -> torch.Tensor: ...

    def loss(
        self, target: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class LatentAutoencoder(Protocol):
    """The image tokenizer, with diffusers' ``AutoencoderKL`` surface.

    ``encode(pixels (B, 3, H, W))`` → an output whose ``latent_dist.mode()`` is ``(B, C, H/f, W/f)``;
    ``decode(latents)`` → an output whose ``.sample`` is ``(B, 3, H, W)``.
    """

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any: ...

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any: ...

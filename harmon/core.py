"""``HarmonCore``: the one assembly of Harmon's own modules, a diffusers ``ModelMixin``.

It holds the generation encoder, the MAR decoder, the diffusion head and the ``proj_in`` / ``proj_out``
connectors (everything but the LLM, the VAE and the tokenizer, which are standard transformers / diffusers
components), and, when the config names a decoupled ``understanding_encoder``, that encoder and its
``understanding_proj_in`` connector (a shared core has neither, so its weights keep the original keys). Its only
config entry is the whole :class:`~harmon.configs.HarmonConfig` as a dict, so a saved folder rebuilds every
registered component by name.

Every module is built here (from the config, or taken as given — the conversion of the original release and
tests pass theirs), randomly initialised: building reads no weight file, and a component spec's ``pretrained``
weights are not part of the saved config (``HarmonModel.from_config`` loads them after building; a saved core's
weights are its own files). :class:`~harmon.model.HarmonModel` (training) and :class:`~harmon.pipelines.HarmonPipeline`
(inference) both use a core, never their own assembly. The entry points the sampling loop calls —
:meth:`HarmonCore.visual_features` (also ``forward``), :meth:`HarmonCore.merge_llm_output`,
:meth:`HarmonCore.token_conditions`, :meth:`HarmonCore.understanding_features` — are decorated with diffusers'
``apply_forward_hook``, so accelerate's offload hooks see every one of them, as they see ``AutoencoderKL.decode``.

:func:`llm_hidden_states` and :func:`through_llm` run the LLM side of an encoder step; they are the single
implementation the pipeline's loop and the training losses share.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import DynamicCache

from harmon.checkpoints import CheckpointKeyError
from harmon.configs import HarmonConfig
from harmon.interfaces import UnderstandingEncoder, VisualEncoder
from harmon.layers import mlp_connector
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS, InterfaceError, protocol_members

CORE_MODULES = ("encoder", "decoder", "head", "proj_in", "proj_out", "understanding_encoder", "understanding_proj_in")


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


@functools.lru_cache(maxsize=None)
def _accepts_keyword(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


class HarmonCore(ModelMixin, ConfigMixin):
    """Encoder + decoder + diffusion head + connectors of a Harmon model (see the module docstring).

    ``components``: modules to use instead of building them (any of :data:`CORE_MODULES`); not part of the saved
    config."""

    config_name = "config.json"
    ignore_for_config = ["components"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, harmon_config: dict[str, Any] | None = None, components: dict[str, nn.Module] | None = None):
        super().__init__()
        config = HarmonConfig.model_validate(harmon_config or {}).architecture()
        if harmon_config is not None:  # saved as the architecture alone: an older config's weight path is dropped
            self.register_to_config(harmon_config=config.model_dump(mode="json"))
        given = dict(components or {})
        unknown = sorted(set(given) - set(CORE_MODULES))
        if unknown:
            raise ValueError(f"components: unknown core module(s) {unknown}; known: {list(CORE_MODULES)}")
        hidden = config.backbone.resolve(BACKBONES).hidden_size
        self.encoder = given.get("encoder") or config.encoder.build(ENCODERS)
        self.decoder = given.get("decoder") or config.decoder.build(DECODERS)
        self.head = given.get("head") or config.head.build(HEADS)
        for registry, component, role in (
            (ENCODERS, self.encoder, "encoder"), (DECODERS, self.decoder, "decoder"), (HEADS, self.head, "head"),
        ):
            registry.check(component, role)
        for name in ("buffer_size", "token_dim", "embed_dim"):
            if not hasattr(self.encoder, name):
                raise InterfaceError(f"the generation encoder must provide {name!r} (GenerationEncoder)")
        self.proj_in = given.get("proj_in") or mlp_connector(self.encoder.embed_dim, hidden, hidden)
        self.proj_out = given.get("proj_out") or mlp_connector(hidden, hidden, self.encoder.embed_dim)

        understanding = given.get("understanding_encoder")
        if understanding is self.encoder:
            understanding = None  # one object for both roles: that is the shared design
        if understanding is None and config.understanding_encoder is not None and "understanding_encoder" not in given:
            understanding = config.understanding_encoder.build(ENCODERS)
        if (understanding is None) != (config.understanding_encoder is None):
            raise ValueError(
                "config.understanding_encoder and the understanding_encoder given must agree: "
                f"config says {config.understanding_encoder.name if config.understanding_encoder else 'shared'!r}, "
                f"got {type(understanding).__name__ if understanding is not None else 'none (shared)'}"
            )
        if understanding is None and given.get("understanding_proj_in") is not None:
            raise ValueError("understanding_proj_in belongs to a decoupled understanding_encoder; the shared design "
                             "uses proj_in")
        self.understanding_encoder = understanding
        self.understanding_proj_in = None
        self._understanding_input = "shared"
        if understanding is not None:
            self._understanding_input = understanding_input_kind(understanding, config.token_dim)
            self.understanding_proj_in = given.get("understanding_proj_in") or mlp_connector(
                understanding.hidden_size, hidden, hidden
            )
        self._harmon = config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "HarmonCore":
        """diffusers' loading (every serialization: safetensors or not, variants, shards), made strict: missing,
        unexpected and mis-shaped keys raise :class:`~harmon.checkpoints.CheckpointKeyError` naming them
        (diffusers only warns about the first two)."""
        wants_info = kwargs.pop("output_loading_info", False)
        source = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except ValueError as error:
            found = re.findall(r"(\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got torch\.Size\(\[([^\]]*)\]\)",
                               str(error))
            if not found:
                raise
            shapes = "; ".join(f"{key} ({got},) (expected ({want},))" for key, want, got in found)
            raise CheckpointKeyError(f"{source} does not fit HarmonCore: mis-shaped keys: {shapes}") from error
        problems = [
            f"{label}: {', '.join(sorted(info.get(field) or []))}"
            for label, field in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"))
            if info.get(field)
        ]
        if info.get("mismatched_keys"):
            problems.append("mis-shaped keys: " + ", ".join(str(k[0]) for k in info["mismatched_keys"]))
        if problems:
            raise CheckpointKeyError(f"{source} does not fit HarmonCore: " + "; ".join(problems))
        return (model, info) if wants_info else model

    # ------------------------------------------------------------------------------------------------ basics
    @property
    def harmon(self) -> HarmonConfig:
        """The typed :class:`HarmonConfig` this core was built from."""
        return self._harmon

    @property
    def buffer_size(self) -> int:
        return self.encoder.buffer_size

    @property
    def shared_encoder(self) -> bool:
        """True when one encoder object serves both understanding and generation (the paper's design)."""
        return self.understanding_encoder is None

    @property
    def understanding_reads_pixels(self) -> bool:
        """Whether understanding needs pixels (a pixel encoder) rather than the VAE's tokens."""
        return self._understanding_input == "pixels"

    @property
    def understanding_image_size(self) -> int:
        """Square side understanding images are resized to by default: a pixel encoder's ``image_size``, else the
        config's ``understanding_image_size`` (the release's choice per preset: 512 for harmon-1.5b) or
        ``image_size``."""
        if self.understanding_reads_pixels:
            return int(self.understanding_encoder.image_size)
        return self.harmon.understanding_image_size or self.harmon.image_size

    def num_understanding_tokens(self, image_size: int | None = None) -> int | None:
        """How many visual embeddings (``<image>`` placeholders) understanding makes for a square image of
        ``image_size`` on the token path: m·n + buffer. ``None`` for a pixel encoder (its feature count is fixed by
        its own ``image_size``: the pipeline reads it off the features)."""
        if self.understanding_reads_pixels:
            return None
        side = (image_size or self.understanding_image_size) // self.harmon.latent_stride
        buffer = self.understanding_encoder.buffer_size if self.understanding_encoder is not None else self.buffer_size
        return side * side + buffer

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(m, n)`` of an image of ``height × width`` pixels."""
        stride = self.harmon.latent_stride
        if height % stride or width % stride or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {stride}, got {height}×{width}")
        return height // stride, width // stride

    @property
    def decoder_takes_positions(self) -> bool:
        """Whether the decoder can compute the conditions of chosen positions only (``positions=`` keyword)."""
        return _accepts_keyword(type(self.decoder).forward, "positions")

    # ----------------------------------------------------------------------------------------- entry points
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder side of a MAR step: :meth:`visual_features`."""
        return self.visual_features(tokens, mask)

    @apply_forward_hook
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

    @apply_forward_hook
    def merge_llm_output(self, x_enc: torch.Tensor, z_llm: torch.Tensor) -> torch.Tensor:
        """``x_enc + proj_out(z_llm)`` with the buffer (last ``K`` LLM positions) moved back in front:
        ``(B, K + seen, D)``."""
        k = self.buffer_size
        z_llm = torch.cat([z_llm[:, -k:], z_llm[:, :-k]], dim=1) if k else z_llm
        return x_enc + self.proj_out(z_llm)

    @apply_forward_hook
    def token_conditions(
        self, x_enc: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int],
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder: ``(B, L, D')`` conditions, or with ``positions`` (bool ``(B, L)``) only those rows
        ``(N, D')`` (computed there only when the decoder supports it)."""
        if positions is None:
            return self.decoder(x_enc, mask, image_shape)
        if self.decoder_takes_positions:
            return self.decoder(x_enc, mask, image_shape, positions=positions)
        return self.decoder(x_enc, mask, image_shape)[positions]

    @apply_forward_hook
    def understanding_features(
        self, tokens: torch.Tensor | None = None, pixels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The understanding path, ``(B, N, H)`` LLM-side visual embeddings, from VAE ``tokens (B, m, n, C)``
        (shared, or a decoupled token encoder) or ``pixels (B, 3, H, W)`` in [-1, 1] (a decoupled pixel encoder,
        its own ``preprocess``)."""
        encoder = self.understanding_encoder
        if not self.understanding_reads_pixels:
            if tokens is None:
                raise ValueError("tokens: the understanding path reads VAE tokens (encode the image first)")
            if encoder is None:
                return self.visual_features(tokens)[1]
            x_enc = encoder.encode(tokens.to(self.proj_in[0].weight.dtype))  # (B, K + m·n, D), buffer first
            z_enc = self.understanding_proj_in(x_enc)
            k = encoder.buffer_size
            return torch.cat([z_enc[:, k:], z_enc[:, :k]], dim=1)
        if pixels is None:
            raise ValueError(
                f"pixels: the understanding encoder ({self.harmon.understanding_encoder.name}) reads pixels; "
                "VAE tokens cannot stand in for them"
            )
        features = encoder.encode(encoder.preprocess(pixels))
        return self.understanding_proj_in(features.to(self.proj_in[0].weight.dtype))


# ---------------------------------------------------------------------------------------------------- the LLM side
@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_class: type) -> str:
    """The keyword a transformers decoder takes its KV cache by (``cache`` from transformers 5.2x on, earlier
    ``past_key_values``)."""
    parameters = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def onload(module: nn.Module) -> None:
    """Run the module's model-offload hook (accelerate's ``CpuOffload``) as its ``forward`` would — diffusers'
    ``apply_forward_hook`` for a call that bypasses ``forward``, such as the LLM's decoder without its LM head.
    Sequential offload needs nothing here: its hooks sit on every leaf module, which are called as usual (running
    the root's hook by hand would place the whole model and unbalance them)."""
    from accelerate.hooks import CpuOffload, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    for one in hooks:
        if isinstance(one, CpuOffload):
            one.pre_forward(module)


def embed_text(llm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings ``(B, T, H)`` of ``input_ids`` (on the caller's device)."""
    onload(llm)
    return llm.get_input_embeddings()(input_ids)


def llm_hidden_states(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
):
    """The LLM's decoder (no LM head) on ``inputs_embeds (B, T, H)``; with ``cache``, appends to it. Returns the
    transformers output (``.last_hidden_state``)."""
    onload(llm)
    decoder = llm.get_decoder()
    kwargs = {_cache_keyword(type(decoder)): cache} if cache is not None else {}
    return decoder(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=cache is not None, **kwargs,
    )


def through_llm(
    core: HarmonCore,
    llm: nn.Module,
    x_enc: torch.Tensor,
    z_enc: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values: DynamicCache | None = None,
    prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the visual embeddings ``z_enc`` through the LLM after the prompt (cached, or given as
    ``prompt_embeds``) and return :meth:`HarmonCore.merge_llm_output`: ``(B, K + seen, D)``. With a cache, the
    cache grows by the visual length: the caller cuts it back."""
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
    output = llm_hidden_states(llm, inputs_embeds, attention_mask, position_ids, cache=past_key_values)
    return core.merge_llm_output(x_enc, output.last_hidden_state[:, -length:])


def prefill(llm: nn.Module, input_ids: torch.Tensor) -> DynamicCache:
    """KV cache of the prompt rows. As the original, the prefill attends to padding (right-padded prompts make that
    harmless: padding comes after every real token) and every later step masks it out."""
    cache = DynamicCache()
    llm_hidden_states(llm, embed_text(llm, input_ids), cache=cache)
    return cache


def splice_image_embeddings(
    llm: nn.Module, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Text embeddings of ``input_ids`` with the rows of ``image_embeds (B, N, H)`` placed, in order, at the
    positions holding ``image_token_id`` (each prompt must hold exactly N of them)."""
    is_image = input_ids == image_token_id
    per_row = is_image.sum(dim=1)
    if not bool((per_row == image_embeds.shape[1]).all()) or input_ids.shape[0] != image_embeds.shape[0]:
        raise ValueError(
            f"each prompt needs {image_embeds.shape[1]} image placeholder tokens (id {image_token_id}) for "
            f"{image_embeds.shape[0]} image(s); found {per_row.tolist()}"
        )
    text_embeds = embed_text(llm, torch.where(is_image, torch.zeros_like(input_ids), input_ids))
    return text_embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(text_embeds.dtype))


__all__ = ["CORE_MODULES", "HarmonCore", "embed_text", "llm_hidden_states", "onload", "prefill", "splice_image_embeddings", "through_llm",
           "understanding_input_kind"]

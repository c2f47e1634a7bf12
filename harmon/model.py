"""HarmonModel: one MAR encoder, a language backbone, a MAR decoder, a diffusion head and a VAE, composed through
the interfaces of :mod:`harmon.interfaces`.

* understanding — image → VAE tokens → encoder (nothing masked) → ``proj_in`` → spliced into the prompt at the
  image placeholder → the LLM answers (``generate``). That is the shared design (one encoder object for both
  tasks). With a decoupled ``understanding_encoder`` (``config.understanding_encoder``, Janus-like) understanding
  runs through it and its own ``understanding_proj_in`` instead: a pixel encoder (SigLIP, VQGAN, the KL VAE, a
  plugin) on its own preprocessing, or a second MAR encoder on this model's VAE tokens
  (:meth:`HarmonModel.understanding_embeddings`, used by :meth:`image_embeddings` and :meth:`image_to_text_loss`);
* generation — the entry points of a masked-autoregressive step (:meth:`encoder_step`, ``decoder``, ``head``); the
  sampling loop itself is :class:`harmon.pipelines.HarmonPipeline`'s (``HarmonPipeline.from_model(model, tokenizer)``);
* training — :meth:`text_to_image_loss` and :meth:`image_to_text_loss`.

The modules are assembled once, by :class:`harmon.core.HarmonCore` (``model.core``); this class adds the LLM and
the VAE and keeps the original checkpoint's flat keys (``encoder.…``, ``llm.…``, ``vae.…``).

Batches for classifier-free guidance are laid out as the original: rows ``[cond_0 … cond_{B-1}, uncond_0 …
uncond_{B-1}]``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from transformers import DynamicCache

from harmon.checkpoints import load_state_dict_strict, read_state_dict
from harmon.configs import HarmonConfig
from harmon.core import (
    CORE_MODULES, HarmonCore, embed_text, llm_hidden_states, prefill, splice_image_embeddings, through_llm,
)
from harmon.core import understanding_input_kind  # noqa: F401  (re-exported: it lived here)
from harmon.encoders.vae import build_kl_autoencoder
from harmon.interfaces import (
    DiffusionHead,
    GenerationEncoder,
    LanguageBackbone,
    LatentAutoencoder,
    TokenDecoder,
    VisualEncoder,
)
from harmon.latents import latents_to_tokens, tokens_to_latents, vae_encode
from harmon.registry import BACKBONES

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


class HarmonModel(nn.Module):
    """Harmon: a shared MAR encoder for understanding and generation around a causal LLM (or, decoupled, a separate
    understanding encoder)."""

    def __init__(
        self,
        config: HarmonConfig,
        *,
        vae: LatentAutoencoder,
        llm: LanguageBackbone,
        encoder: GenerationEncoder | None = None,
        decoder: TokenDecoder | None = None,
        head: DiffusionHead | None = None,
        proj_in: nn.Module | None = None,
        proj_out: nn.Module | None = None,
        understanding_encoder: VisualEncoder | None = None,
        understanding_proj_in: nn.Module | None = None,
        core: HarmonCore | None = None,
    ) -> None:
        """The LLM and the VAE around a :class:`~harmon.core.HarmonCore`: ``core`` itself, or one assembled from
        the modules given (any left out are built from ``config``; ``proj_in`` / ``proj_out`` created).

        ``understanding_encoder``: ``None`` (or ``encoder`` itself) for the shared design; else the decoupled
        understanding encoder named by ``config.understanding_encoder``, with ``understanding_proj_in``
        (Linear·SiLU·Linear from its ``hidden_size`` to the LLM's, created when not given)."""
        super().__init__()
        BACKBONES.check(llm, "llm")
        if core is None:
            given = dict(encoder=encoder, decoder=decoder, head=head, proj_in=proj_in, proj_out=proj_out,
                         understanding_proj_in=understanding_proj_in)
            given = {name: module for name, module in given.items() if module is not None}
            if understanding_encoder is not None:
                given["understanding_encoder"] = understanding_encoder
            core = HarmonCore(harmon_config=config.model_dump(mode="json"), components=given)
        elif any(m is not None for m in (encoder, decoder, head, proj_in, proj_out, understanding_encoder,
                                          understanding_proj_in)):
            raise ValueError("give either core or the core's modules, not both")
        self.config = config.architecture()  # a weight path is a build step, not part of the model
        self.__dict__["core"] = core  # not a submodule: its modules are registered below under their own names
        self.vae = vae
        self.llm = llm
        for name in CORE_MODULES:
            setattr(self, name, getattr(core, name))
        if getattr(vae.config, "scaling_factor", config.vae_scale) != config.vae_scale:
            # diffusers' convention: latents = posterior × scaling_factor; the saved VAE carries Harmon's scale
            vae.register_to_config(scaling_factor=config.vae_scale)

    @classmethod
    def from_core(cls, core: HarmonCore, llm: LanguageBackbone, vae: LatentAutoencoder) -> "HarmonModel":
        """A model over ``core``'s modules (shared, not copied) with ``llm`` and ``vae``."""
        return cls(core.harmon, vae=vae, llm=llm, core=core)

    @classmethod
    def from_config(cls, config: HarmonConfig) -> "HarmonModel":
        """A model with every component built through its registry (random), then the ``pretrained`` weights the
        config's component specs name loaded into their components (strict; timm's build-then-load). The model
        keeps :meth:`HarmonConfig.architecture`: no weight path is stored, so :meth:`save_pretrained` writes none."""
        model = cls._construct(config.architecture())
        for role in config.pretrained_weights():
            getattr(config, role).load_pretrained(model.component(role), HarmonConfig.ROLE_REGISTRIES[role])
        return model

    @classmethod
    def _construct(cls, config: HarmonConfig) -> "HarmonModel":
        """Every component built from ``config``, randomly initialised (no weight file read), in eval mode."""
        return cls(config, vae=build_kl_autoencoder(config.vae), llm=config.backbone.build(BACKBONES)).eval()

    def component(self, role: str) -> nn.Module:
        """The module of a :class:`HarmonConfig` component role (``backbone`` is ``llm``)."""
        if role not in HarmonConfig.COMPONENT_ROLES:
            raise ValueError(f"role: unknown component role {role!r}; known: {', '.join(HarmonConfig.COMPONENT_ROLES)}")
        return self.llm if role == "backbone" else getattr(self, role)

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
        # built, not initialised from any pretrained weights (an older config's path is dropped): every tensor
        # comes from the folder
        model = cls._construct(HarmonConfig.model_validate_json(config_path.read_text()).architecture())
        state_dict = read_state_dict(weights_path)  # a truncated file is named
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
        return self.core.buffer_size

    @property
    def shared_encoder(self) -> bool:
        """True when one encoder object serves both understanding and generation (the paper's design)."""
        return self.core.shared_encoder

    def understanding_modules(self) -> tuple[nn.Module, nn.Module]:
        """``(encoder, connector)`` of the understanding path: ``(self.encoder, self.proj_in)`` — the very
        generation modules — when shared, else ``(understanding_encoder, understanding_proj_in)``."""
        if self.understanding_encoder is None:
            return self.encoder, self.proj_in
        return self.understanding_encoder, self.understanding_proj_in

    @property
    def understanding_reads_pixels(self) -> bool:
        """Whether understanding needs pixels (a pixel encoder) rather than this model's VAE tokens."""
        return self.core.understanding_reads_pixels

    @property
    def understanding_image_size(self) -> int:
        """Square side understanding images are resized to by default (see :class:`~harmon.core.HarmonCore`)."""
        return self.core.understanding_image_size

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(m, n)`` of an image of ``height × width`` pixels."""
        return self.core.latent_grid(height, width)

    # ------------------------------------------------------------------------------------- pixels <-> tokens
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → tokens ``(B, m, n, C)`` (VAE posterior mode × ``vae_scale``)."""
        return latents_to_tokens(vae_encode(self.vae, pixels, self.config.vae_scale), self.config.patch_size).to(self.dtype)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, m, n, C)`` → pixels ``(B, 3, H, W)`` (roughly in [-1, 1]); ``tokens`` is not modified."""
        latents = tokens_to_latents(tokens, self.config.patch_size)
        return self.vae.decode((latents / self.config.vae_scale).to(self.vae.dtype)).sample

    # ----------------------------------------------------------------------------------------- visual path
    def visual_features(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, m, n, C)`` → ``(x_enc, z_enc)`` (:meth:`HarmonCore.visual_features`)."""
        return self.core.visual_features(tokens, mask)

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
        x_enc, z_enc = self.core.visual_features(tokens, mask)
        return through_llm(self.core, self.llm, x_enc, z_enc, attention_mask, past_key_values, prompt_embeds)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embed_text(self.llm, input_ids.to(self.device))

    def llm_hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ):
        """The LLM's decoder (no LM head) on ``inputs_embeds (B, T, H)``; with ``cache``, appends to it.
        Returns the transformers output (``.last_hidden_state``)."""
        return llm_hidden_states(self.llm, inputs_embeds, attention_mask, position_ids, cache)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> DynamicCache:
        """KV cache of the prompt rows (:func:`harmon.core.prefill`)."""
        return prefill(self.llm, input_ids.to(self.device))

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
        if not self.understanding_reads_pixels:
            if tokens is None:
                if pixels is None:
                    raise ValueError("understanding needs pixels (or the VAE tokens of encode_image)")
                tokens = self.encode_image(pixels)
            return self.core.understanding_features(tokens=tokens)
        return self.core.understanding_features(pixels=pixels.to(self.device) if pixels is not None else None)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` → the LLM-side visual embeddings ``(B, N, H)`` of the understanding path
        (shared: N = m·n + K)."""
        return self.understanding_embeddings(pixels)

    def splice_image_embeddings(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
    ) -> torch.Tensor:
        """Text embeddings of ``input_ids`` with the rows of ``image_embeds (B, N, H)`` placed, in order, at the
        positions holding ``image_token_id`` (:func:`harmon.core.splice_image_embeddings`)."""
        return splice_image_embeddings(self.llm, input_ids.to(self.device), image_embeds, image_token_id)

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

    def text_to_image_conditions(
        self,
        tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """The MAR decoder's per-token conditions ``(B, m·n, D)`` for ``tokens (B, m, n, C)`` under ``mask
        (B, m·n)`` (1 = masked) given the prompts: what the diffusion head is conditioned on in training."""
        m, n = tokens.shape[1:3]
        x_enc = self.encoder_step(tokens, mask, attention_mask, prompt_embeds=self.embed_text(input_ids))
        return self.decoder(x_enc, mask, (m, n))

    def diffusion_loss(
        self,
        tokens: torch.Tensor,
        conditions: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The head's diffusion loss on the masked tokens of ``tokens (B, m, n, C)`` under ``conditions
        (B, m·n, D)``; each token row is repeated ``diffusion_batch_mul`` times."""
        batch, m, n, channels = tokens.shape
        repeats = self.head.config.diffusion_batch_mul
        target = tokens.reshape(batch * m * n, channels).repeat(repeats, 1)
        z = conditions.reshape(batch * m * n, -1).repeat(repeats, 1)
        return self.head.loss(target, z, mask.reshape(-1).repeat(repeats), generator=generator)

    def text_to_image_loss(
        self,
        tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Diffusion loss on the masked tokens of ``tokens (B, m, n, C)`` (from :meth:`encode_image`) given the
        prompts (:meth:`text_to_image_conditions`, then :meth:`diffusion_loss`); ``mask`` defaults to
        :meth:`random_training_mask`."""
        batch, m, n, _ = tokens.shape
        if mask is None:
            mask = self.random_training_mask(batch, m * n, generator)
        conditions = self.text_to_image_conditions(tokens, input_ids, attention_mask, mask)
        return self.diffusion_loss(tokens, conditions, mask, generator)

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
        batch, m, n, _ = tokens.shape
        if mask is None:
            mask = self.random_training_mask(batch, m * n, generator)
        x_enc = self.encoder_step(tokens, mask, attention_mask.to(self.device), prompt_embeds=prompt_embeds)
        return self.diffusion_loss(tokens, self.decoder(x_enc, mask, (m, n)), mask, generator)

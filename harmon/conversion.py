"""Loading the original Harmon release: ``harmon_*.pth`` + ``kl16.ckpt`` + a Qwen2.5 Instruct folder.

``harmon_*.pth`` is a flat state dict with the prefixes ``llm.`` (Qwen2ForCausalLM), ``mar.`` (the MAR model:
encoder, decoder, ``diffloss``), ``proj_in.`` and ``proj_out.``; ``kl16.ckpt`` holds the LDM-style VAE. The LLM
folder gives the LLM config (and tokenizer); the checkpoint's ``llm.*`` weights win over the folder's.
Conversion is strict: unknown or missing keys raise :class:`~harmon.checkpoints.CheckpointKeyError` naming them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from harmon.backbones.qwen import load_qwen_config, qwen_from_config
from harmon.checkpoints import CheckpointKeyError, load_state_dict_strict, read_state_dict
from harmon.configs import HarmonConfig, qwen_fields_from_transformers, ComponentSpec
from harmon.decoders.mar import convert_original_mar_decoder
from harmon.encoders.mar import convert_original_mar_encoder
from harmon.encoders.vae import convert_ldm_kl_state_dict, build_kl_autoencoder
from harmon.heads.diffusion import convert_original_diffloss
from harmon.model import HarmonModel
from harmon.registry import DECODERS, ENCODERS, HEADS

# keys of the original MAR model that Harmon never uses (MAR's ImageNet class embedding)
IGNORED_ORIGINAL_KEYS = ("mar.class_emb.weight",)

_MAR_ENCODER_PREFIXES = ("z_proj.", "z_proj_ln.", "encoder_blocks.", "encoder_norm.")
_MAR_ENCODER_KEYS = ("fake_latent", "encoder_pos_embed_learned")
_MAR_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.")
_MAR_DECODER_KEYS = ("mask_token", "decoder_pos_embed_learned", "diffusion_pos_embed_learned")


def _renamed(group: dict[str, torch.Tensor], convert, prefix_in: str, prefix_out: str,
             out: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    # convert one key at a time so that every output key remembers its original name
    for key, value in group.items():
        ((new_key, new_value),) = convert({key: value}).items()
        out[prefix_out + new_key] = new_value
        names[prefix_out + new_key] = prefix_in + key


def convert_original_harmon_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Original ``harmon_*.pth`` keys → :class:`HarmonModel` keys (without ``vae.``).

    Returns the converted dict and, for each converted key, its original name. Keys in no known group raise
    :class:`CheckpointKeyError` listing them.
    """
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    encoder, decoder, head, unknown = {}, {}, {}, []
    for key, value in state_dict.items():
        if key in IGNORED_ORIGINAL_KEYS:
            continue
        if key.startswith(("llm.", "proj_in.", "proj_out.")):
            out[key] = value
            names[key] = key
        elif key.startswith("mar.diffloss."):
            head[key[len("mar.diffloss."):]] = value
        elif key.startswith("mar."):
            inner = key[len("mar."):]
            if inner in _MAR_ENCODER_KEYS or inner.startswith(_MAR_ENCODER_PREFIXES):
                encoder[inner] = value
            elif inner in _MAR_DECODER_KEYS or inner.startswith(_MAR_DECODER_PREFIXES):
                decoder[inner] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointKeyError(f"unexpected keys in the Harmon checkpoint: {', '.join(sorted(unknown))}")
    _renamed(encoder, convert_original_mar_encoder, "mar.", "encoder.", out, names)
    _renamed(decoder, convert_original_mar_decoder, "mar.", "decoder.", out, names)
    _renamed(head, convert_original_diffloss, "mar.diffloss.", "head.", out, names)
    return out, names


def _check_tied_embeddings(state_dict: dict[str, torch.Tensor], tied: bool) -> None:
    embed, lm_head = state_dict.get("llm.model.embed_tokens.weight"), state_dict.get("llm.lm_head.weight")
    if tied and embed is not None and lm_head is not None and not torch.equal(embed, lm_head):
        raise CheckpointKeyError(
            "llm.lm_head.weight differs from llm.model.embed_tokens.weight but the LLM config ties them"
        )
    if tied and lm_head is None and embed is not None:
        state_dict["llm.lm_head.weight"] = embed


def read_original_config(original_config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(original_config, dict):
        return original_config
    path = Path(original_config)
    if not path.is_file():
        raise FileNotFoundError(f"original config not found: {path}")
    return json.loads(path.read_text())


def load_original_harmon(
    harmon_checkpoint: str | os.PathLike,
    vae_checkpoint: str | os.PathLike,
    llm_folder: str | os.PathLike,
    *,
    original_config: str | os.PathLike | dict[str, Any] | None = None,
    preset: str | None = None,
    attn_implementation: str = "auto",
) -> HarmonModel:
    """A :class:`HarmonModel` from the original release files (strict, exact conversion, eval mode).

    The architecture comes from ``original_config`` (the original ``mar``/``vae`` constructor arguments and
    ``vae_scale``) or a ``preset`` (``harmon-0.5b``, ``harmon-1.5b``); the LLM shape from ``llm_folder``.
    """
    if (original_config is None) == (preset is None):
        raise ValueError("give exactly one of original_config and preset")
    llm_config = load_qwen_config(llm_folder, attn_implementation)
    if original_config is not None:
        config = HarmonConfig.from_original(read_original_config(original_config), llm_config)
    else:
        config = HarmonConfig.from_preset(
            preset, backbone=ComponentSpec(name="qwen2", config=qwen_fields_from_transformers(llm_config))
        )
    model = HarmonModel(
        config,
        vae=build_kl_autoencoder(config.vae),
        encoder=config.encoder.build(ENCODERS),
        decoder=config.decoder.build(DECODERS),
        head=config.head.build(HEADS),
        llm=qwen_from_config(llm_config),
    )
    state_dict, names = convert_original_harmon_state_dict(read_state_dict(harmon_checkpoint))
    _check_tied_embeddings(state_dict, bool(llm_config.tie_word_embeddings))
    vae_state = convert_ldm_kl_state_dict(read_state_dict(vae_checkpoint), config.vae)
    for key, value in vae_state.items():
        state_dict["vae." + key] = value
    load_state_dict_strict(model, state_dict, f"{harmon_checkpoint} + {vae_checkpoint}", names)
    return model.eval()

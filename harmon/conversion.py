"""Loading the original Harmon release: ``harmon_*.pth`` + ``kl16.ckpt`` + a Qwen2.5 Instruct folder.

``harmon_*.pth`` is a flat state dict with the prefixes ``llm.`` (Qwen2ForCausalLM), ``mar.`` (the MAR model:
encoder, decoder, ``diffloss``), ``proj_in.`` and ``proj_out.``; ``kl16.ckpt`` holds the LDM-style VAE. The LLM
folder gives the LLM config (and tokenizer); the checkpoint's ``llm.*`` weights win over the folder's.
Conversion is strict: unknown, missing or mis-shaped keys raise :class:`~harmon.checkpoints.CheckpointKeyError`
naming them by their names in the original files (a summary: counts and the first names), with the sizes the
checkpoints hold and the preset they fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harmon.backbones.qwen import load_qwen_config, qwen_from_config
from harmon.checkpoints import CheckpointKeyError, load_state_dict_strict, read_state_dict
from harmon.configs import HarmonConfig, qwen_fields_from_transformers, ComponentSpec
from harmon.decoders.mar import convert_original_mar_decoder
from harmon.encoders.mar import convert_original_mar_encoder, original_mar_encoder_name
from harmon.encoders.vae import convert_ldm_kl_state_dict, build_kl_autoencoder
from harmon.heads.diffusion import convert_original_diffloss
from harmon.model import HarmonModel
from harmon.original_config import (
    OriginalConfig, read_original_config, resolve_named_path, to_harmon_config, vae_sizes_from_state_dict,
    variational_quant_conv,
)
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


def resolve_original_files(
    vae_checkpoint: str | os.PathLike | None,
    llm_folder: str | os.PathLike | None,
    original_config: str | os.PathLike | dict[str, Any] | OriginalConfig | None,
) -> tuple[OriginalConfig | None, Path, Path]:
    """The original config (read and validated, when given) and the VAE checkpoint / LLM folder to use: the ones
    given, else those the config names (``vae.ckpt_path``, ``llm.pretrained_model_name_or_path``, resolved
    relative to the config file, then the working directory). Missing both ways: an error naming the argument."""
    config = read_original_config(original_config) if original_config is not None else None
    if vae_checkpoint is None:
        named = config.model.vae.ckpt_path if config is not None else None
        if named is None:
            raise ValueError("vae_checkpoint (--vae) is required: " + (
                f"{config.source} names no vae.ckpt_path" if config is not None else "no original config names it"))
        vae_checkpoint = resolve_named_path(named, config, "vae.ckpt_path", folder_expected=False)
    if llm_folder is None:
        llm = config.model.llm if config is not None else None
        named = llm.pretrained_model_name_or_path if llm is not None else None
        if named is None:
            raise ValueError("llm_folder (--llm) is required: " + (
                f"{config.source} names no llm.pretrained_model_name_or_path" if config is not None
                else "no original config names it"))
        llm_folder = resolve_named_path(named, config, "llm.pretrained_model_name_or_path", folder_expected=True)
    return config, Path(vae_checkpoint), Path(llm_folder)


def load_original_harmon(
    harmon_checkpoint: str | os.PathLike,
    vae_checkpoint: str | os.PathLike | None = None,
    llm_folder: str | os.PathLike | None = None,
    *,
    original_config: str | os.PathLike | dict[str, Any] | OriginalConfig | None = None,
    preset: str | None = None,
    attn_implementation: str = "auto",
) -> HarmonModel:
    """A :class:`HarmonModel` from the original release files (strict, exact conversion, eval mode).

    The architecture comes from ``original_config`` — the release's mmengine Python config
    (``configs/models/qwen2_5_1_5b_kl16_mar_h.py``, read without running it), its JSON form
    (``original_config.json``) or a dict: see :mod:`harmon.original_config` — or a ``preset`` (``harmon-0.5b``,
    ``harmon-1.5b``); the LLM shape from ``llm_folder``. With a config, ``vae_checkpoint`` and ``llm_folder``
    default to the ones it names. VAE sizes the config does not state (``ch``, ``num_res_blocks``) are read from
    the VAE checkpoint.
    """
    if (original_config is None) == (preset is None):
        raise ValueError("give exactly one of original_config and preset")
    config_source, vae_checkpoint, llm_folder = resolve_original_files(vae_checkpoint, llm_folder, original_config)
    llm_config = load_qwen_config(llm_folder, attn_implementation)
    original, vae_original = read_state_dict(harmon_checkpoint), read_state_dict(vae_checkpoint)  # before building
    if config_source is not None and not config_source.model.vae.use_variational:
        vae_original = variational_quant_conv(vae_original)
    if config_source is not None:
        config = to_harmon_config(config_source, llm_config, vae_state_dict=vae_original)
    else:
        config = HarmonConfig.from_preset(
            preset, backbone=ComponentSpec(name="qwen2", config=qwen_fields_from_transformers(llm_config))
        )
    _check_sizes(original, vae_original, config,
                 f"preset {preset!r}" if preset is not None else f"the original config {config_source.source}",
                 f"{harmon_checkpoint} + {vae_checkpoint}", preset)
    model = HarmonModel(
        config,
        vae=build_kl_autoencoder(config.vae),
        encoder=config.encoder.build(ENCODERS),
        decoder=config.decoder.build(DECODERS),
        head=config.head.build(HEADS),
        llm=qwen_from_config(llm_config),
    )
    state_dict, names = convert_original_harmon_state_dict(original)
    _check_tied_embeddings(state_dict, bool(llm_config.tie_word_embeddings))
    try:
        vae_state = convert_ldm_kl_state_dict(vae_original, config.vae)
    except CheckpointKeyError as error:
        raise CheckpointKeyError(f"{vae_checkpoint}: {error}") from None
    for key, value in vae_state.items():
        state_dict["vae." + key] = value
    # every key the model expects, by its original name (for the missing ones)
    names = {**{key: original_harmon_key(key) for key in model.state_dict()}, **names}
    load_state_dict_strict(model, state_dict, f"{harmon_checkpoint} + {vae_checkpoint}", names)
    return model.eval()


# ---------------------------------------------------------------------------------------- key names and sizes
_ORIGINAL_DECODER_NAMES = {
    "pos_embed": "decoder_pos_embed_learned", "diffusion_pos_embed": "diffusion_pos_embed_learned",
    "blocks.": "decoder_blocks.", "norm.": "decoder_norm.",
}
_ORIGINAL_HEAD_NAMES = {"net.time_embed.linear_1.": "net.time_embed.mlp.0.", "net.time_embed.linear_2.": "net.time_embed.mlp.2."}


def _renamed_back(key: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if key == new or (new.endswith(".") and key.startswith(new)):
            return old + key[len(new):]
    return key


def original_harmon_key(key: str) -> str:
    """A :class:`HarmonModel` key → its name in ``harmon_*.pth`` (``vae.*`` keys are named by the VAE converter)."""
    if key.startswith("encoder."):
        return "mar." + original_mar_encoder_name(key[len("encoder."):])
    if key.startswith("decoder."):
        return "mar." + _renamed_back(key[len("decoder."):], _ORIGINAL_DECODER_NAMES)
    if key.startswith("head."):
        return "mar.diffloss." + _renamed_back(key[len("head."):], _ORIGINAL_HEAD_NAMES)
    return key


def _blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
    """How many numbered blocks under ``prefix`` (None when there are none: absent, not zero-deep)."""
    return len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)}) or None


def original_sizes(harmon: dict[str, torch.Tensor], vae: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Sizes read from the original checkpoints' tensor shapes (None where a tensor is absent)."""
    def dim(key: str, axis: int = 0) -> int | None:
        tensor = harmon.get(key)
        return int(tensor.shape[axis]) if tensor is not None else None

    return dict(
        encoder_embed_dim=dim("mar.z_proj.weight"), encoder_depth=_blocks(harmon, "mar.encoder_blocks."),
        decoder_embed_dim=dim("mar.decoder_embed.weight"), decoder_depth=_blocks(harmon, "mar.decoder_blocks."),
        diffloss_w=dim("mar.diffloss.net.input_proj.weight"), diffloss_d=_blocks(harmon, "mar.diffloss.net.res_blocks."),
        llm_hidden_size=dim("llm.model.embed_tokens.weight", 1), llm_layers=_blocks(harmon, "llm.model.layers."),
        **vae_sizes_from_state_dict(vae),
    )


def describe_original_checkpoints(harmon: dict[str, torch.Tensor], vae: dict[str, torch.Tensor]) -> str:
    s = original_sizes(harmon, vae)
    return (f"The checkpoints hold: MAR encoder {s['encoder_embed_dim']} wide x {s['encoder_depth']} blocks, decoder "
            f"{s['decoder_embed_dim']} x {s['decoder_depth']}, diffusion head {s['diffloss_w']} x {s['diffloss_d']}, "
            f"LLM {s['llm_hidden_size']} x {s['llm_layers']} layers, VAE ch {s.get('ch')} x "
            f"{s.get('num_res_blocks')} res blocks")


def _config_sizes(config: HarmonConfig) -> dict[str, int]:
    encoder, decoder, head = (spec.resolve(registry) for spec, registry in
                              ((config.encoder, ENCODERS), (config.decoder, DECODERS), (config.head, HEADS)))
    return dict(encoder_embed_dim=encoder.embed_dim, encoder_depth=encoder.depth, decoder_embed_dim=decoder.embed_dim,
                decoder_depth=decoder.depth, diffloss_w=head.width, diffloss_d=head.depth, ch=config.vae.ch,
                num_res_blocks=config.vae.num_res_blocks)


def _check_sizes(harmon: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], config: HarmonConfig,
                 architecture: str, source: str, preset: str | None) -> None:
    """Before building anything: the sizes the checkpoints hold against the config's. Another architecture
    mis-fits hundreds of tensors; the sizes that differ and the preset that fits say why in one short message."""
    held, expected = original_sizes(harmon, vae), _config_sizes(config)
    differ = [f"{key} {held[key]} (expected {value})" for key, value in expected.items()
              if held.get(key) is not None and held[key] != value]
    if differ:
        raise CheckpointKeyError(
            f"{source} do not fit {architecture}: {', '.join(differ)}. {describe_original_checkpoints(harmon, vae)}. "
            f"{likely_architecture(harmon, vae, preset)}"
        )


def likely_architecture(harmon: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], preset: str | None) -> str:
    """Which released preset the checkpoints' shapes fit, as advice for the error message."""
    sizes = original_sizes(harmon, vae)
    fitting = []
    for name in ("harmon-0.5b", "harmon-1.5b"):
        expected = _config_sizes(HarmonConfig.from_preset(name))
        if all(sizes.get(key) == value for key, value in expected.items()):
            fitting.append(name)
    if fitting and preset not in fitting:
        return f"They fit preset {fitting[0]!r}: pass --preset {fitting[0]} (preset= in Python)."
    return ("They fit no released preset: pass the model's original config (--config <configs/models/*.py or "
            "original_config.json>, original_config= in Python).")

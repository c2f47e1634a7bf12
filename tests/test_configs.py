"""Configs: presets, validation errors that name the field, the original config's translation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from harmon.configs import ComponentSpec, HarmonConfig
from harmon.registry import BACKBONES, DECODERS, ENCODERS, HEADS


def test_harmon_05b_preset_shapes():
    config = HarmonConfig.from_preset("harmon-0.5b")
    encoder = config.encoder.resolve(ENCODERS)
    head = config.head.resolve(HEADS)
    llm = config.backbone.resolve(BACKBONES)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.buffer_size) == (768, 12, 12, 64)
    assert (head.width, head.depth, head.num_sampling_steps) == (1024, 6, 100)
    assert (llm.hidden_size, llm.num_hidden_layers) == (896, 24)
    assert config.vae.ch_mult == (1, 1, 2, 2, 4) and config.vae.embed_dim == 16
    assert config.vae_scale == pytest.approx(0.2325) and config.image_size == 256
    assert encoder.base_grid == (16, 16)


def test_harmon_15b_preset_shapes():
    config = HarmonConfig.from_preset("harmon-1.5b")
    encoder = config.encoder.resolve(ENCODERS)
    decoder = config.decoder.resolve(DECODERS)
    head = config.head.resolve(HEADS)
    llm = config.backbone.resolve(BACKBONES)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.buffer_size) == (1280, 20, 16, 64)
    assert (decoder.embed_dim, decoder.depth) == (1280, 20)
    assert (head.width, head.depth) == (1536, 12)
    assert (llm.hidden_size, llm.num_hidden_layers) == (1536, 28)


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="harmon-0.5b"):
        HarmonConfig.from_preset("harmon-7b")


def test_extra_field_is_forbidden_and_named():
    with pytest.raises(ValidationError, match="vae_scal"):
        HarmonConfig(vae_scal=0.3)


def test_bad_value_names_the_field():
    with pytest.raises(ValidationError, match="vae_scale"):
        HarmonConfig(vae_scale=-1)
    with pytest.raises(ValidationError, match="embed_dim"):
        HarmonConfig.from_preset("tiny", encoder=ComponentSpec(name="mar-tiny", config={"embed_dim": 0}))


def test_components_that_do_not_fit_are_named():
    with pytest.raises(ValidationError, match="decoder.encoder_dim is 64, expected 96"):
        HarmonConfig.from_preset(
            "tiny", encoder=ComponentSpec(name="mar-tiny", config={"embed_dim": 96, "num_heads": 4})
        )
    with pytest.raises(ValidationError, match="head.cond_dim"):
        HarmonConfig.from_preset("tiny", head=ComponentSpec(name="mlp-adaln-tiny", config={"cond_dim": 32}))


def test_unknown_component_name_in_config():
    with pytest.raises(KeyError, match="Did you mean"):
        HarmonConfig.from_preset("tiny", encoder=ComponentSpec(name="mar-tiyn"))


def test_config_json_round_trip():
    config = HarmonConfig.from_preset("tiny")
    assert HarmonConfig.model_validate_json(config.model_dump_json()) == config


def test_from_original_reads_every_size(original_config):
    config = HarmonConfig.from_original(original_config)
    from harmon.original_config import OriginalMARConfig

    mar = OriginalMARConfig.model_validate(original_config["mar"]).model_dump()  # a factory's sizes filled in
    encoder = config.encoder.resolve(ENCODERS)
    head = config.head.resolve(HEADS)
    assert encoder.embed_dim == mar["encoder_embed_dim"] and encoder.buffer_size == mar["buffer_size"]
    assert head.num_sampling_steps == int(mar["num_sampling_steps"]) and head.depth == mar["diffloss_d"]
    assert config.vae.ch == original_config["vae"].get("ch", 128)  # unstated: the released kl16's width


def test_from_original_rejects_unknown_keys(original_config):
    bad = {**original_config, "mar": {**original_config["mar"], "flux_capacitor": 1}}
    with pytest.raises(ValueError, match="flux_capacitor"):
        HarmonConfig.from_original(bad)

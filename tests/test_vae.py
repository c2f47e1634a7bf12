"""KL-16 VAE: parity with the original implementation, the strict LDM -> diffusers converter, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from einops import rearrange

from harmon.encoders.vae import (
    CheckpointKeyError,
    KLAutoencoderConfig,
    build_kl_autoencoder,
    convert_kl_state_dict_to_ldm,
    convert_ldm_kl_state_dict,
    load_ldm_kl_checkpoint,
)
from harmon.checkpoints import read_state_dict
from conftest import assert_close, parity_files

# The decoder output (|x| up to ~2.4, 64x64x3) carries float32 rounding noise of about 1e-5: the recorded
# `vae.decoded` is itself 1.03e-5 max-abs away from a float64 evaluation of the same weights and input, so no
# float32 reimplementation can be held to 1e-5 there. 3e-5 still rejects real mistakes by orders of magnitude
# (a GroupNorm eps of 1e-5 instead of 1e-6 alone gives 5e-3).
POSTERIOR_ATOL = 1e-5
DECODED_ATOL = 3e-5

# tiny architecture for the converter tests: two levels, attention at level 1 (nominal resolution 32 // 2 = 16)
TINY = KLAutoencoderConfig(embed_dim=4, ch=32, ch_mult=(1, 2), resolution=32, attn_resolutions=(16,))


def _random_model(config: KLAutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = build_kl_autoencoder(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor distinct, so a mis-routed weight changes the outputs
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture()
def tiny_ckpt(tmp_path: Path) -> tuple[Path, AutoencoderKL]:
    model = _random_model(TINY)
    path = tmp_path / "kl_tiny.ckpt"
    torch.save({"model": convert_kl_state_dict_to_ldm(model.state_dict(), TINY)}, path)
    return path, model


def _encode_decode(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
        return mode, vae.decode(mode).sample


# --- parity with the original implementation -------------------------------------------------------------


def test_parity_with_original(parity_dir, parity_tensors, original_config):
    checkpoint = parity_files(parity_dir)["vae"]
    config = KLAutoencoderConfig.from_original(original_config["vae"], read_state_dict(checkpoint))
    vae = load_ldm_kl_checkpoint(checkpoint, config)
    assert not vae.training

    with torch.no_grad():
        mode = vae.encode(parity_tensors["vae.image"]).latent_dist.mode()
        z = rearrange(parity_tensors["vae.tokens"] / original_config["vae_scale"], "b m n c -> b c m n")
        decoded = vae.decode(z).sample
    d_mode = assert_close(mode, parity_tensors["vae.posterior_mode"], POSTERIOR_ATOL, "vae.posterior_mode")
    d_dec = assert_close(decoded, parity_tensors["vae.decoded"], DECODED_ATOL, "vae.decoded")
    print(f"\n[vae parity] max-abs-diff posterior_mode={d_mode:.3e} decoded={d_dec:.3e}")


def test_original_layout_names(parity_dir, original_config):
    """The converter's names agree with the released layout: exporting a built model yields exactly its keys."""
    original = read_state_dict(parity_files(parity_dir)["vae"])
    config = KLAutoencoderConfig.from_original(original_config["vae"], original)
    exported = convert_kl_state_dict_to_ldm(build_kl_autoencoder(config).state_dict(), config)
    assert sorted(exported) == sorted(original)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in original.items()}


# --- config --------------------------------------------------------------------------------------------------


def test_config():
    default = KLAutoencoderConfig()
    assert default.attention_levels == (4,)  # released kl16: attention at the 16x16 level only
    assert default.block_out_channels == (128, 128, 256, 256, 512)
    assert TINY.attention_levels == (1,)
    assert KLAutoencoderConfig.from_original({"embed_dim": 16, "ch_mult": [1, 2], "ch": 32}).ch_mult == (1, 2)
    with pytest.raises(ValueError, match="channels"):  # not an AutoencoderKL argument (ckpt_path is one)
        KLAutoencoderConfig.from_original({"embed_dim": 16, "ch_mult": [1, 2], "ckpt_path": "x", "channels": 3})
    with pytest.raises(ValueError, match="ch_mult"):
        KLAutoencoderConfig.from_original({"embed_dim": 16})
    with pytest.raises(ValueError):
        KLAutoencoderConfig(embed_dim=0)
    with pytest.raises(ValueError):
        KLAutoencoderConfig(ch=48)  # not a multiple of the 32 GroupNorm groups
    with pytest.raises(ValueError):
        KLAutoencoderConfig(dropout=0.1)


def test_architecture_blocks():
    vae = build_kl_autoencoder(TINY)
    assert [type(b).__name__ for b in vae.encoder.down_blocks] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert [type(b).__name__ for b in vae.decoder.up_blocks] == ["UpDecoderBlock2D"] * 2
    assert vae.config.scaling_factor == 1.0 and vae.config.latent_channels == 4


# --- converter -----------------------------------------------------------------------------------------------


def test_tiny_checkpoint_round_trip(tiny_ckpt):
    path, source = tiny_ckpt
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _encode_decode(source, x)

    loaded = load_ldm_kl_checkpoint(path, TINY)
    for a, b in zip(_encode_decode(loaded, x), expected):
        assert torch.equal(a, b)

    sd = torch.load(path, weights_only=True)["model"]
    for wrapped in ({"state_dict": sd}, sd):
        torch.save(wrapped, path)
        assert torch.equal(_encode_decode(load_ldm_kl_checkpoint(path, TINY), x)[1], expected[1])


def test_attention_weights_become_linear(tiny_ckpt):
    path, _ = tiny_ckpt
    original = torch.load(path, weights_only=True)["model"]
    assert original["encoder.down.1.attn.0.q.weight"].shape == (64, 64, 1, 1)
    converted = convert_ldm_kl_state_dict(original, TINY)
    w = converted["encoder.down_blocks.1.attentions.0.to_q.weight"]
    assert w.shape == (64, 64)
    assert torch.equal(w, original["encoder.down.1.attn.0.q.weight"][:, :, 0, 0])
    # decoder levels are reversed: LDM up.1 (lowest resolution, applied first) is diffusers up_blocks[0]
    assert torch.equal(
        converted["decoder.up_blocks.0.upsamplers.0.conv.weight"], original["decoder.up.1.upsample.conv.weight"]
    )


@pytest.mark.parametrize(
    "key",
    [
        "encoder.down.1.attn.0.q.weight",
        "decoder.up.0.block.0.nin_shortcut.bias",
        "quant_conv.weight",
        "decoder.mid.attn_1.proj_out.bias",
    ],
)
def test_missing_key(tiny_ckpt, key):
    sd = torch.load(tiny_ckpt[0], weights_only=True)["model"]
    del sd[key]
    with pytest.raises(CheckpointKeyError, match="missing") as err:
        convert_ldm_kl_state_dict(sd, TINY)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "key", ["encoder.down.0.attn.0.q.weight", "decoder.up.1.attn.0.q.weight", "encoder.extra", "model_ema.foo"]
)
def test_unexpected_key(tiny_ckpt, key):
    sd = torch.load(tiny_ckpt[0], weights_only=True)["model"]
    sd[key] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="unexpected") as err:
        convert_ldm_kl_state_dict(sd, TINY)
    assert key in str(err.value)
    assert "missing" not in str(err.value)


def test_misshaped_key(tiny_ckpt):
    sd = torch.load(tiny_ckpt[0], weights_only=True)["model"]
    key = "encoder.down.1.block.0.conv1.weight"
    sd[key] = sd[key][:, :-1]
    with pytest.raises(CheckpointKeyError, match="mis-shaped") as err:
        convert_ldm_kl_state_dict(sd, TINY)
    assert key in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="kl16.ckpt") as err:
        load_ldm_kl_checkpoint(path, TINY)
    assert str(path) in str(err.value)


# --- diffusers save/load -------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tiny_ckpt, tmp_path):
    vae = load_ldm_kl_checkpoint(tiny_ckpt[0], TINY)
    vae.save_pretrained(tmp_path / "vae")
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert [type(b).__name__ for b in reloaded.encoder.down_blocks] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_encode_decode(reloaded, x), _encode_decode(vae, x)):
        assert torch.equal(a, b)

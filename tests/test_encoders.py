"""The encoder zoo: every understanding encoder on tiny configs — shapes, dtype, determinism, preprocessing,
save/load, and its checkpoint converter on a tiny checkpoint the test writes in the original layout (strict)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import harmon.configs  # noqa: F401  (registers the built-in families)
from harmon.checkpoints import CheckpointKeyError
from harmon.encoders.common import preprocess_pixels
from harmon.interfaces import GenerationEncoder, UnderstandingEncoder
from harmon.registry import ENCODERS

# tiny versions of each pixel family (registered name, overrides): 64 px in, 16 features out
PIXEL_ENCODERS = {
    "siglip": ("siglip-tiny", {}),
    "vqgan": ("vqgan-f16", dict(ch=32, ch_mult=(1, 1, 1, 1, 2), z_channels=8, embed_dim=8, n_embed=32, image_size=64)),
    "vae-kl16": ("vae-kl16", dict(ch=32, ch_mult=(1, 1, 1, 1, 2), image_size=64)),
}
HIDDEN = {"siglip": 32, "vqgan": 8, "vae-kl16": 16}


def build(kind: str, seed: int = 0, **extra):
    name, overrides = PIXEL_ENCODERS[kind]
    torch.manual_seed(seed)
    encoder = ENCODERS.create(name, **{**overrides, **extra}).eval()
    if "pretrained" not in extra:
        with torch.no_grad():  # every tensor random (some start at zero or one), so a mis-routed weight shows
            for parameter in encoder.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
    return encoder


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ the zoo
def test_every_family_is_registered_with_the_paper_sizes():
    for name in ("mar-b", "mar-h", "siglip-base-patch16-256", "siglip-so400m-patch14-384",
                 "siglip-large-patch16-256", "vqgan-f16", "vae-kl16"):
        assert name in ENCODERS, name
    base = ENCODERS.get("siglip-base-patch16-256").build_config()
    assert (base.hidden_size, base.num_hidden_layers, base.patch_size, base.image_size) == (768, 12, 16, 256)
    so400m = ENCODERS.get("siglip-so400m-patch14-384").build_config()
    assert (so400m.hidden_size, so400m.num_hidden_layers, so400m.patch_size, so400m.image_size) == (1152, 27, 14, 384)
    large = ENCODERS.get("siglip-large-patch16-256").build_config()
    assert (large.hidden_size, large.num_hidden_layers) == (1024, 24)
    vq = ENCODERS.get("vqgan-f16").build_config()
    assert (vq.embed_dim, vq.n_embed, vq.z_channels, vq.attention_levels) == (256, 16384, 256, (4,))
    assert ENCODERS.get("vae-kl16").build_config().embed_dim == 16
    assert ENCODERS.get("mar-h").build_config().embed_dim == 1280


@pytest.mark.parametrize("kind", sorted(PIXEL_ENCODERS))
def test_pixel_encoder_shapes_dtype_determinism(kind):
    encoder = build(kind)
    assert isinstance(encoder, UnderstandingEncoder) and not isinstance(encoder, GenerationEncoder)
    assert encoder.hidden_size == HIDDEN[kind] and encoder.image_size == 64
    pixels = images()
    with torch.no_grad():
        features = encoder.encode(encoder.preprocess(pixels))
        again = encoder.encode(encoder.preprocess(pixels))
        other = encoder.encode(encoder.preprocess(images(seed=1)))
        alone = encoder.encode(encoder.preprocess(pixels[1:]))
        half = encoder.to(torch.bfloat16).encode(encoder.preprocess(pixels.bfloat16()))
    assert features.shape == (2, 16, HIDDEN[kind]) and features.dtype == torch.float32
    assert torch.equal(features, again)
    assert not torch.allclose(features, other)
    assert torch.allclose(alone[0], features[1], atol=1e-5)  # the batch does not leak between images
    assert half.shape == features.shape and half.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", sorted(PIXEL_ENCODERS))
def test_pixel_encoder_save_load_round_trip(kind, tmp_path):
    encoder = build(kind, seed=0)
    save_model(encoder, str(tmp_path / "encoder.safetensors"))
    fresh = build(kind, seed=1)
    pixels = images()
    with torch.no_grad():
        assert not torch.equal(fresh.encode(fresh.preprocess(pixels)), encoder.encode(encoder.preprocess(pixels)))
        fresh.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
        assert torch.equal(fresh.encode(fresh.preprocess(pixels)), encoder.encode(encoder.preprocess(pixels)))


def test_preprocessing_resizes_pads_and_normalises():
    pixels = images(size=64)
    assert preprocess_pixels(pixels, 64) is pixels  # right size, mean = std = 0.5: the [-1, 1] pixels unchanged
    small = preprocess_pixels(pixels, 32)
    assert small.shape == (2, 3, 32, 32) and small.min() >= -1 and small.max() <= 1
    tall = preprocess_pixels(torch.ones(1, 3, 64, 32), 64)  # padded with the pipeline's gray, centred
    assert tall.shape == (1, 3, 64, 64)
    assert torch.allclose(tall[0, :, 32, 0], torch.full((3,), 2 * 127 / 255 - 1)) and tall[0, 0, 32, 32] == 1
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = preprocess_pixels(pixels, 64, mean, std)
    expected = ((pixels + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalised, expected)
    encoder = build("siglip", image_size=32)
    assert encoder.preprocess(pixels).shape == (2, 3, 32, 32)
    assert encoder.encode(encoder.preprocess(pixels)).shape == (2, 4, 32)


# ------------------------------------------------------------------------------------------------ MAR
def original_mar_encoder_shapes(token_dim: int, dim: int, depth: int, buffer: int, grid: int) -> dict[str, tuple]:
    """The original MAR encoder's tensor names and shapes (as written by MAR / Harmon), by hand."""
    shapes = {
        "z_proj.weight": (dim, token_dim), "z_proj.bias": (dim,),
        "z_proj_ln.weight": (dim,), "z_proj_ln.bias": (dim,),
        "fake_latent": (1, dim), "encoder_pos_embed_learned": (1, buffer + grid * grid, dim),
        "encoder_norm.weight": (dim,), "encoder_norm.bias": (dim,),
    }
    for i in range(depth):
        block = f"encoder_blocks.{i}."
        shapes.update({
            block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
            block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,),
            block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
            block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
            block + "mlp.fc1.weight": (4 * dim, dim), block + "mlp.fc1.bias": (4 * dim,),
            block + "mlp.fc2.weight": (dim, 4 * dim), block + "mlp.fc2.bias": (dim,),
        })
    return shapes


def test_mar_as_understanding_encoder_reads_tokens_and_converts_strictly(tmp_path):
    from harmon.encoders.mar import load_original_mar_encoder

    torch.manual_seed(0)
    encoder = ENCODERS.create("mar-tiny").eval()
    assert isinstance(encoder, GenerationEncoder) and not hasattr(encoder, "preprocess")
    tokens = torch.randn(2, 4, 4, 16)
    with torch.no_grad():
        features = encoder.encode(tokens)
        assert features.shape == (2, 8 + 16, 64) and features.dtype == torch.float32  # buffer kept, nothing masked
        assert torch.equal(features, encoder.encode(tokens))
        assert encoder.to(torch.bfloat16).encode(tokens.bfloat16()).dtype == torch.bfloat16
    encoder.float()

    generator = torch.Generator().manual_seed(1)
    original = {"mar." + k: torch.randn(shape, generator=generator)
                for k, shape in original_mar_encoder_shapes(16, 64, 2, 8, 4).items()}
    original["mar.decoder_embed.weight"] = torch.zeros(1)  # another MAR part: not this encoder's
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: mar\.decoder_embed\.weight"):
        load_original_mar_encoder(encoder, original, prefix="mar.")
    del original["mar.decoder_embed.weight"]
    load_original_mar_encoder(encoder, original, prefix="mar.")
    assert torch.equal(encoder.pos_embed, original["mar.encoder_pos_embed_learned"])
    assert torch.equal(encoder.blocks[1].mlp.fc2.weight, original["mar.encoder_blocks.1.mlp.fc2.weight"])
    broken = dict(original)
    del broken["mar.encoder_blocks.0.attn.qkv.bias"]
    broken["mar.fake_latent"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError, match=r"missing keys: mar\.encoder_blocks\.0\.attn\.qkv\.bias.*"
                                                 r"mis-shaped keys: mar\.fake_latent \(3,\)"):
        load_original_mar_encoder(encoder, broken, prefix="mar.")

    save_model(encoder, str(tmp_path / "mar.safetensors"))
    fresh = ENCODERS.create("mar-tiny").eval()
    fresh.load_state_dict(load_file(str(tmp_path / "mar.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.encode(tokens), encoder.encode(tokens))


# ------------------------------------------------------------------------------------------------ VQGAN
def taming_vqgan_shapes(ch, ch_mult, num_res_blocks, attn_levels, z_channels, embed_dim, n_embed) -> dict[str, tuple]:
    """The taming-transformers VQGAN tensor names and shapes (its Encoder / Decoder / VectorQuantizer), by hand."""
    shapes: dict[str, tuple] = {}

    def resnet(prefix, c_in, c_out):
        shapes.update({f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
                       f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
                       f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
                       f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)})
        if c_in != c_out:
            shapes.update({f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)})

    def attention(prefix, c):
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
        for part in ("q", "k", "v", "proj_out"):
            shapes.update({f"{prefix}.{part}.weight": (c, c, 1, 1), f"{prefix}.{part}.bias": (c,)})

    levels = len(ch_mult)
    shapes.update({"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)})
    c_in = ch
    for level in range(levels):
        c_out = ch * ch_mult[level]
        for i in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{i}", c_in, c_out)
            c_in = c_out
            if level in attn_levels:
                attention(f"encoder.down.{level}.attn.{i}", c_in)
        if level != levels - 1:
            shapes.update({f"encoder.down.{level}.downsample.conv.weight": (c_in, c_in, 3, 3),
                           f"encoder.down.{level}.downsample.conv.bias": (c_in,)})
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        resnet(f"{part}.mid.block_1", c, c)
        attention(f"{part}.mid.attn_1", c)
        resnet(f"{part}.mid.block_2", c, c)
    shapes.update({"encoder.norm_out.weight": (c_in,), "encoder.norm_out.bias": (c_in,),
                   "encoder.conv_out.weight": (z_channels, c_in, 3, 3), "encoder.conv_out.bias": (z_channels,)})
    c_in = ch * ch_mult[-1]
    shapes.update({"decoder.conv_in.weight": (c_in, z_channels, 3, 3), "decoder.conv_in.bias": (c_in,)})
    for level in reversed(range(levels)):
        c_out = ch * ch_mult[level]
        for i in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", c_in, c_out)
            c_in = c_out
            if level in attn_levels:
                attention(f"decoder.up.{level}.attn.{i}", c_in)
        if level != 0:
            shapes.update({f"decoder.up.{level}.upsample.conv.weight": (c_in, c_in, 3, 3),
                           f"decoder.up.{level}.upsample.conv.bias": (c_in,)})
    shapes.update({"decoder.norm_out.weight": (c_in,), "decoder.norm_out.bias": (c_in,),
                   "decoder.conv_out.weight": (3, c_in, 3, 3), "decoder.conv_out.bias": (3,),
                   "quant_conv.weight": (embed_dim, z_channels, 1, 1), "quant_conv.bias": (embed_dim,),
                   "post_quant_conv.weight": (z_channels, embed_dim, 1, 1), "post_quant_conv.bias": (z_channels,),
                   "quantize.embedding.weight": (n_embed, embed_dim)})
    return shapes


@pytest.fixture(scope="module")
def taming_checkpoint(tmp_path_factory):
    shapes = taming_vqgan_shapes(32, (1, 1, 1, 1, 2), 2, {4}, 8, 8, 32)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) * 0.05 for k, s in shapes.items()}
    for key in state:  # GroupNorm weights near one keep activations sane
        if ".norm" in key and key.endswith(".weight"):
            state[key] += 1
    state["quantize.embedding.weight"] = torch.randn(32, 8, generator=generator)
    # a taming training checkpoint also holds its loss module (LPIPS + discriminator): ignored on purpose
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(4, 3, 3, 3)
    path = tmp_path_factory.mktemp("vqgan") / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    return path, state


def test_vqgan_loads_a_taming_checkpoint(taming_checkpoint):
    path, state = taming_checkpoint
    encoder = build("vqgan", pretrained=str(path))
    vq = encoder.vqgan
    assert torch.equal(vq.encoder.conv_in.weight, state["encoder.conv_in.weight"])
    assert torch.equal(vq.decoder.up_blocks[0].attentions[2].to_q.weight,
                       state["decoder.up.4.attn.2.q.weight"][:, :, 0, 0])  # taming's 1x1 conv → linear
    assert torch.equal(vq.decoder.up_blocks[4].resnets[0].conv1.weight, state["decoder.up.0.block.0.conv1.weight"])
    with torch.no_grad():
        features = encoder.encode(encoder.preprocess(images()))
    codebook = state["quantize.embedding.weight"]
    indices = encoder.code_indices(encoder.preprocess(images()))
    assert features.shape == (2, 16, 8) and torch.equal(features, codebook[indices])  # quantized: codebook vectors
    assert len(indices.unique()) > 1

    from harmon.encoders.vqgan import convert_vqgan_state_dict_to_taming

    exported = convert_vqgan_state_dict_to_taming(vq.state_dict(), encoder.config)
    assert set(exported) == {k for k in state if not k.startswith("loss.")}


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_vqgan_converter_names_bad_keys(taming_checkpoint, tmp_path, change):
    from harmon.encoders.vqgan import VQGANEncoderConfig, convert_taming_vqgan_state_dict

    _, state = taming_checkpoint
    state = dict(state)
    if change == "missing":
        del state["encoder.down.4.attn.1.k.weight"]
        expected = r"missing \(1\): encoder\.down\.4\.attn\.1\.k\.weight \(diffusers: encoder\.down_blocks\.4\.attentions\.1\.to_k\.weight\)"
    elif change == "unexpected":
        state["encoder.down.9.block.0.conv1.weight"] = torch.zeros(1)
        expected = r"unexpected \(1\): encoder\.down\.9\.block\.0\.conv1\.weight"
    else:
        state["quantize.embedding.weight"] = torch.zeros(16, 8)
        expected = r"mis-shaped \(1\): quantize\.embedding\.weight: \(16, 8\), expected \(32, 8\)"
    config = VQGANEncoderConfig(**PIXEL_ENCODERS["vqgan"][1])
    with pytest.raises(CheckpointKeyError, match=expected) as info:
        convert_taming_vqgan_state_dict(state, config)
    assert "loss." not in str(info.value)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointKeyError, match=expected):
        build("vqgan", pretrained=str(path))


# ------------------------------------------------------------------------------------------------ KL VAE
def test_vae_kl16_loads_an_ldm_checkpoint(tmp_path):
    from harmon.encoders.vae import convert_kl_state_dict_to_ldm

    source = build("vae-kl16", seed=3)
    arch = source.config.autoencoder()
    original = convert_kl_state_dict_to_ldm(source.vae.state_dict(), arch)  # MAR's kl16.ckpt layout
    assert "encoder.down.4.attn.1.q.weight" in original and original["encoder.down.4.attn.1.q.weight"].ndim == 4
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": original}, path)
    loaded = build("vae-kl16", pretrained=str(path))
    pixels = images()
    with torch.no_grad():
        mode = source.vae.encode(pixels).latent_dist.mode()
        assert torch.equal(loaded.encode(pixels), mode.flatten(2).transpose(1, 2))  # (B, m·n, 16), raster order
        scaled = build("vae-kl16", pretrained=str(path), scale=0.2325)
        assert torch.allclose(scaled.encode(pixels), 0.2325 * loaded.encode(pixels))
    del original["encoder.mid.attn_1.proj_out.bias"]
    original["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": original}, path)
    with pytest.raises(CheckpointKeyError, match=r"missing \(1\): encoder\.mid\.attn_1\.proj_out\.bias .*"
                                                 r"unexpected \(1\): encoder\.extra\.weight"):
        build("vae-kl16", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        build("vae-kl16", pretrained=str(tmp_path / "nowhere.ckpt"))


# ------------------------------------------------------------------------------------------------ SigLIP
def write_released_siglip(folder, vision_config, seed: int = 0):
    """A tiny full ``SiglipModel`` (vision + text towers, logit scale/bias, pooling head), as released."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(vision_config, vision_use_head=True))).eval()
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def released_siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip-released")
    config = ENCODERS.get("siglip-tiny").build_config().to_transformers().to_dict()
    return folder, write_released_siglip(folder, config)


def test_siglip_loads_a_released_folder(released_siglip):
    from harmon.encoders.siglip import SiglipEncoder, convert_siglip_state_dict

    folder, released = released_siglip
    encoder = build("siglip", pretrained=str(folder))
    pixels = images()
    with torch.no_grad():
        expected = released.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.equal(encoder.encode(encoder.preprocess(pixels)), expected)
    assert not any("head" in k for k in encoder.state_dict())  # features = last hidden state: no pooling head
    again = SiglipEncoder.from_pretrained(folder)  # architecture read from the folder
    assert again.config.hidden_size == 32 and "pretrained" not in again.config.model_dump()  # architecture only
    assert torch.equal(again.model.embeddings.patch_embedding.weight, encoder.model.embeddings.patch_embedding.weight)
    # the pure converter on the released state dict: the text tower, logit_* and the head are dropped on purpose
    converted = convert_siglip_state_dict(released.state_dict(), encoder.config)
    assert set(converted) == set(encoder.model.state_dict())


def test_siglip_checkpoint_problems_are_named(released_siglip, tmp_path):
    from harmon.encoders.siglip import convert_siglip_state_dict

    folder, released = released_siglip
    state = dict(released.state_dict())
    del state["vision_model.post_layernorm.bias"]
    state["vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointKeyError, match=r"missing keys: post_layernorm\.bias; "
                                                 r"unexpected keys: vision_model\.encoder\.layers\.9\.mlp\.fc1\.weight"):
        convert_siglip_state_dict(state, ENCODERS.get("siglip-tiny").build_config())
    # the same through the folder loader (transformers' from_pretrained, judged strictly)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["vision_model.post_layernorm.bias"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError, match=r"missing keys: post_layernorm\.bias"):
        build("siglip", pretrained=str(broken))
    with pytest.raises(ValueError, match=r"hidden_size 768 \(the folder has 32\)"):
        ENCODERS.create("siglip-base-patch16-256", pretrained=str(folder))


def test_siglip_hub_id_offline_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'google/siglip-base-patch16-256' is not a local folder.*hf download.*OFFLINE"):
        ENCODERS.create("siglip-base-patch16-256", pretrained="google/siglip-base-patch16-256")

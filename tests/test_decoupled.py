"""Shared vs decoupled understanding encoders on tiny pipelines, and an encoder from a third-party plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from harmon.cli import describe_pipeline, main
from harmon.configs import ComponentSpec, HarmonConfig, to_original_config
from harmon.model import HarmonModel
from harmon.pipelines import HarmonPipeline
from harmon.registry import ENCODERS, InterfaceError, load_plugins
from harmon.testing import tiny_model, tiny_tokenizer

STEPS = 2
IMAGE_ID = 3  # "<image>" in the tiny tokenizer
SIGLIP_32 = ComponentSpec(name="siglip-tiny", config={"image_size": 32})  # its own input size: 2×2 = 4 features
VQGAN_TINY = ComponentSpec(name="vqgan-f16", config=dict(ch=32, ch_mult=(1, 1, 1, 1, 2), z_channels=8,
                                                          embed_dim=8, n_embed=32, image_size=64))
DECOUPLED = {"siglip": (SIGLIP_32, 4, 32), "mar": (ComponentSpec(name="mar-tiny"), 16 + 8, 64),
             "vqgan": (VQGAN_TINY, 16, 64)}  # spec, number of image features, understanding input size
GENERATION_MODULES = ("vae", "encoder", "decoder", "head", "llm", "proj_in", "proj_out")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pipe(understanding_encoder=None) -> HarmonPipeline:
    pipe = HarmonPipeline.from_model(tiny_model(understanding_encoder=understanding_encoder), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shared() -> HarmonPipeline:
    return make_pipe()


@pytest.fixture(scope="module")
def decoupled() -> dict[str, HarmonPipeline]:
    return {}


@pytest.fixture(scope="module")
def shared_image(shared) -> torch.Tensor:
    return shared("a red circle", num_inference_steps=STEPS, generator=seeded(4), output_type="pt").images


def decoupled_pipe(cache: dict, kind: str) -> HarmonPipeline:
    if kind not in cache:
        cache[kind] = make_pipe(DECOUPLED[kind][0])
    return cache[kind]


def pixels(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=seeded(seed)) * 2 - 1


def understanding_batch(num_features: int):
    ids = torch.tensor([[1, 7] + [IMAGE_ID] * num_features + [9, 2, 1, 40, 41, 2]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    return ids, torch.ones_like(ids), labels


class CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


# -------------------------------------------------------------------------------------------- shared vs decoupled
def test_shared_understanding_and_generation_use_one_encoder_object(shared):
    model = shared.model
    encoder, connector = model.understanding_modules()
    assert model.shared_encoder and model.understanding_encoder is None
    assert encoder is model.encoder and connector is model.proj_in
    # the shared state dict keeps the original keys: nothing understanding-specific
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == set(GENERATION_MODULES)
    assert {key.split(".")[0] for key in shared.harmon.state_dict()} == {"encoder", "decoder", "head", "proj_in",
                                                                         "proj_out"}
    with CallCounter(model.encoder) as counter:
        embeds = model.image_embeddings(pixels())
        assert counter.calls == 1 and embeds.shape == (1, 16 + 8, 64)
        shared("a red circle", num_inference_steps=STEPS, generator=seeded(0), output_type="latent")
        assert counter.calls == 1 + STEPS
    # the image→text loss trains the same encoder generation uses
    ids, mask, labels = understanding_batch(24)
    model.zero_grad()
    model.image_to_text_loss(None, ids, mask, labels, IMAGE_ID, pixels=pixels()).backward()
    assert model.encoder.z_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_decoupled_understanding_encoder_is_a_separate_object(decoupled):
    pipe = decoupled_pipe(decoupled, "siglip")
    model = pipe.model
    encoder, connector = model.understanding_modules()
    assert not model.shared_encoder
    assert encoder is model.understanding_encoder is pipe.harmon.understanding_encoder
    assert encoder is not model.encoder and connector is not model.proj_in
    generation = {p.data_ptr() for p in model.encoder.parameters()} | {p.data_ptr() for p in model.proj_in.parameters()}
    understanding = {p.data_ptr() for p in encoder.parameters()} | {p.data_ptr() for p in connector.parameters()}
    assert not generation & understanding
    assert model.understanding_proj_in[0].weight.shape == (64, 32)  # from SigLIP's hidden size to the LLM's
    assert "understanding_encoder.model.embeddings.patch_embedding.weight" in model.state_dict()
    with CallCounter(model.encoder) as generation_calls, CallCounter(encoder.model) as understanding_calls:
        model.image_embeddings(pixels())
        assert (generation_calls.calls, understanding_calls.calls) == (0, 1)
        pipe("a red circle", num_inference_steps=STEPS, generator=seeded(0), output_type="latent")
        assert (generation_calls.calls, understanding_calls.calls) == (STEPS, 1)
    # the image→text loss trains the understanding encoder, not the generation one
    ids, mask, labels = understanding_batch(4)
    model.zero_grad()
    model.image_to_text_loss(None, ids, mask, labels, IMAGE_ID, pixels=pixels()).backward()
    assert encoder.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.understanding_proj_in[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.parameters())
    model.zero_grad()
    with pytest.raises(ValueError, match="reads pixels"):
        model.image_to_text_loss(model.encode_image(pixels()), ids, mask, labels, IMAGE_ID)


@pytest.mark.parametrize("kind", sorted(DECOUPLED))
def test_decoupled_pipelines_generate_and_understand(decoupled, shared, shared_image, kind):
    pipe = decoupled_pipe(decoupled, kind)
    spec, num_features, size = DECOUPLED[kind]
    model = pipe.model
    assert model.config.understanding_encoder == spec and model.understanding_image_size == size
    # generation does not involve the understanding encoder: with the shared model's generation weights, the
    # decoupled pipeline draws the same image
    for name in GENERATION_MODULES:
        getattr(model, name).load_state_dict(getattr(shared.model, name).state_dict())
    image = pipe("a red circle", num_inference_steps=STEPS, generator=seeded(4), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.equal(image, shared_image)
    # understanding: its own number of features, at its own input size
    seen = []
    original = model.understanding_encoder.encode
    model.understanding_encoder.encode = lambda x: seen.append(tuple(x.shape)) or original(x)
    try:
        embeds = model.image_embeddings(pixels(2))
        answer = pipe.understand(PIL.Image.new("RGB", (40, 30), (200, 30, 30)), "colour?", max_new_tokens=4,
                                 min_new_tokens=4, skip_special_tokens=False)
    finally:
        del model.understanding_encoder.encode
    assert embeds.shape == (2, num_features, 64)
    if kind == "mar":  # a MAR understanding encoder reads this model's VAE tokens
        assert seen == [(2, 4, 4, 16), (1, 4, 4, 16)]
    else:
        assert seen == [(2, 3, size, size), (1, 3, size, size)]
    assert isinstance(answer, str) and len(pipe.tokenizer.encode(answer, add_special_tokens=False)) == 4
    ids, mask, labels = understanding_batch(num_features)
    loss = model.image_to_text_loss(model.encode_image(pixels()), ids, mask, labels, IMAGE_ID, pixels=pixels())
    assert loss.ndim == 0 and torch.isfinite(loss)


# -------------------------------------------------------------------------------------------- save / load / info
def test_save_and_load_keep_the_decoupled_choice(decoupled, tmp_path, capsys):
    pipe = decoupled_pipe(decoupled, "siglip")
    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder))
    saved = json.loads((folder / "harmon" / "config.json").read_text())["harmon_config"]
    assert saved["understanding_encoder"] == {"name": "siglip-tiny", "config": {"image_size": 32}}
    keys = load_file(str(folder / "harmon" / "diffusion_pytorch_model.safetensors")).keys()
    assert any(k.startswith("understanding_encoder.") for k in keys) and "understanding_proj_in.2.weight" in keys

    loaded = HarmonPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.model.config.understanding_encoder == SIGLIP_32
    image = PIL.Image.new("RGB", (30, 40), (10, 200, 60))
    assert torch.equal(loaded.model.image_embeddings(pixels()), pipe.model.image_embeddings(pixels()))
    assert loaded.understand(image, "what?", max_new_tokens=5) == pipe.understand(image, "what?", max_new_tokens=5)

    # the HarmonModel folder format keeps it too
    pipe.model.save_pretrained(tmp_path / "model")
    model = HarmonModel.from_pretrained(tmp_path / "model")
    assert model.config.understanding_encoder == SIGLIP_32
    assert torch.equal(model.image_embeddings(pixels()), pipe.model.image_embeddings(pixels()))

    # `harmon info` names it
    info = describe_pipeline(loaded)
    assert info["understanding_encoder"] == "siglip-tiny (decoupled, 32 px)"
    assert info["components"]["harmon.understanding_encoder"]["parameters"] > 0
    assert main(["info", str(folder)]) == 0
    assert "understanding_encoder  siglip-tiny (decoupled, 32 px)" in capsys.readouterr().out


def test_shared_pipeline_info_and_saved_keys(shared, tmp_path):
    info = describe_pipeline(shared)
    assert info["understanding_encoder"] == "shared (the generation encoder)"
    assert not any("understanding" in name for name in info["components"])
    shared.model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "harmon_config.json").read_text())["understanding_encoder"] is None
    assert not any(k.startswith("understanding") for k in load_file(str(tmp_path / "model.safetensors")))


def test_a_pretrained_understanding_encoder_is_not_reloaded_from_its_folder(tmp_path):
    """``pretrained`` initialises the encoder once, after building; saved models and pipelines carry its weights
    and no path to it, so loading them works after the folder is gone (tests/test_pretrained_weights.py has the
    rest of the contract)."""
    import shutil

    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = ENCODERS.get("siglip-tiny").build_config().to_transformers().to_dict()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    released = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    folder = tmp_path / "siglip"
    released.save_pretrained(str(folder))
    pipe = make_pipe(ComponentSpec(name="siglip-tiny", pretrained=str(folder)))
    encoder = pipe.model.understanding_encoder
    assert torch.equal(encoder.model.embeddings.patch_embedding.weight,
                       released.vision_model.embeddings.patch_embedding.weight)
    expected = pipe.model.image_embeddings(pixels())
    pipe.save_pretrained(str(tmp_path / "pipe"))
    pipe.model.save_pretrained(tmp_path / "model")
    shutil.rmtree(folder)
    loaded = HarmonPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.model.image_embeddings(pixels()), expected)
    assert torch.equal(HarmonModel.from_pretrained(tmp_path / "model").image_embeddings(pixels()), expected)
    assert loaded.model.config.understanding_encoder.pretrained is None  # the loaded config names no weights
    with pytest.raises(FileNotFoundError, match="no such folder"):  # a fresh build asked for them does need them
        HarmonModel.from_config(HarmonConfig.from_preset(
            "tiny", understanding_encoder=ComponentSpec(name="siglip-tiny", pretrained=str(folder))))


# -------------------------------------------------------------------------------------------- errors
def test_bad_compositions_are_refused_naming_the_problem(shared):
    with pytest.raises(ValueError, match="encoder 'siglip-tiny' reads pixels"):
        HarmonConfig.from_preset("tiny", encoder=ComponentSpec(name="siglip-tiny"))
    with pytest.raises(ValueError, match=r"understanding_encoder\.base_grid is \(16, 16\), expected \(4, 4\)"):
        HarmonConfig.from_preset("tiny", understanding_encoder=ComponentSpec(name="mar-b"))
    with pytest.raises(ValueError, match="no original config form"):
        to_original_config(HarmonConfig.from_preset("tiny-siglip"))
    model = shared.model
    parts = {name: getattr(model, name) for name in ("vae", "encoder", "decoder", "head", "llm")}
    siglip = ENCODERS.create("siglip-tiny")
    with pytest.raises(ValueError, match="must agree"):
        HarmonModel(model.config, **parts, understanding_encoder=siglip)
    # the same object for both roles is the shared design
    assert HarmonModel(model.config, **parts, understanding_encoder=model.encoder).shared_encoder

    class NoImageSize(torch.nn.Module):
        hidden_size = 8

        def encode(self, pixels):
            return pixels

        def preprocess(self, pixels):
            return pixels

    config = HarmonConfig.from_preset("tiny-siglip")
    with pytest.raises(InterfaceError, match="missing image_mean, image_size, image_std"):
        HarmonModel(config, **parts, understanding_encoder=NoImageSize())


# -------------------------------------------------------------------------------------------- plugins
PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party package's encoder: the interface, the registration decorator, the entry point."""
    from pydantic import BaseModel, ConfigDict
    from torch import nn

    from harmon.encoders.common import PixelPreprocessing
    from harmon.registry import ENCODERS


    class PatchLinearConfig(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        hidden_size: int = 24
        patch_size: int = 8
        image_size: int = 32


    @ENCODERS.register("patch-linear-tiny")
    class PatchLinearEncoder(PixelPreprocessing, nn.Module):
        config_class = PatchLinearConfig
        image_mean = (0.485, 0.456, 0.406)  # ImageNet statistics: preprocess normalises with them
        image_std = (0.229, 0.224, 0.225)

        def __init__(self, config):
            super().__init__()
            self.hidden_size, self.image_size = config.hidden_size, config.image_size
            self.patchify = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)

        def encode(self, pixels):
            return self.patchify(pixels.to(self.patchify.weight.dtype)).flatten(2).transpose(1, 2)
    '''
)

CHECK_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
    from harmon.pipelines import HarmonPipeline
    folder, expected_path, image = sys.argv[1:]
    assert "harmon_patch_plugin" not in sys.modules
    pipe = HarmonPipeline.from_pretrained(folder)          # finds "patch-linear-tiny" through the entry point
    assert "harmon_patch_plugin" in sys.modules
    pipe.set_progress_bar_config(disable=True)
    expected = load_file(expected_path)
    embeds = pipe.model.image_embeddings(expected["pixels"])
    assert torch.equal(embeds, expected["embeds"]), (embeds - expected["embeds"]).abs().max()
    answer = pipe.understand(image, "what is it?", max_new_tokens=6)
    print("ANSWER:" + repr(answer))
    """
)


def test_plugin_encoder_as_understanding_encoder_survives_save_and_a_fresh_process(tmp_path):
    """A simulated third-party package (module + dist-info with a ``harmon.plugins`` entry point) on the path: a
    pipeline uses its encoder by name for understanding, is saved, and a fresh process loads it back and gets
    the same features and answer."""
    package = tmp_path / "site"
    package.mkdir()
    (package / "harmon_patch_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = package / "harmon_patch_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: harmon-patch-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[harmon.plugins]\npatch-linear = harmon_patch_plugin\n")

    sys.path.insert(0, str(package))
    try:
        assert "patch-linear" in load_plugins(force=True)
        pipe = make_pipe("patch-linear-tiny")
        model = pipe.model
        assert model.understanding_encoder.__class__.__module__ == "harmon_patch_plugin"
        assert model.understanding_image_size == 32 and model.understanding_proj_in[0].weight.shape == (64, 24)
        folder = tmp_path / "pipe"
        pipe.save_pretrained(str(folder))
        image = tmp_path / "image.png"
        PIL.Image.new("RGB", (48, 32), (30, 90, 200)).save(image)
        batch = pixels(2)
        embeds = model.image_embeddings(batch)
        assert embeds.shape == (2, 16, 64)  # (32 / 8)² patches
        save_file({"pixels": batch, "embeds": embeds.detach().contiguous()}, str(tmp_path / "expected.safetensors"))
        answer = pipe.understand(str(image), "what is it?", max_new_tokens=6)
    finally:
        sys.path.remove(str(package))
        ENCODERS.unregister("patch-linear-tiny")
        sys.modules.pop("harmon_patch_plugin", None)

    env = {**os.environ, "PYTHONPATH": str(package), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, str(folder), str(tmp_path / "expected.safetensors"),
         str(image)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ANSWER:{answer!r}" in result.stdout

"""Pretrained weights load after construction (timm's build-then-load): a component's config is its architecture,
``pretrained`` is a separate step (``ENCODERS.create(name, pretrained=...)``, a ``ComponentSpec``'s ``pretrained``)
that is never saved, so a saved model or pipeline names no file on the saver's machine and never reads one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from harmon.checkpoints import CheckpointKeyError
from harmon.configs import ComponentSpec, HarmonConfig
from harmon.core import HarmonCore
from harmon.model import HarmonModel
from harmon.pipelines import HarmonPipeline
from harmon.registry import ENCODERS, load_pretrained
from harmon.testing import tiny_tokenizer

KL_TINY = dict(ch=32, ch_mult=(1, 1, 1, 1, 2), image_size=64)  # a tiny vae-kl16 feature encoder


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # every tensor random (some start at zero or one), so a mis-routed weight shows
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return module


def state_file(module: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def assert_same_weights(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def keys_named(data, key: str) -> list[str]:
    """Every place ``key`` occurs as a dict key in a JSON value, recursively (as dotted paths)."""
    found = []
    if isinstance(data, dict):
        for name, value in data.items():
            if name == key:
                found.append(name)
            found += [f"{name}.{inner}" for inner in keys_named(value, key)]
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += [f"{index}.{inner}" for inner in keys_named(value, key)]
    return found


def released_siglip(folder: Path, seed: int = 1):
    """A tiny full ``SiglipModel`` as released (vision + text towers), written to ``folder``."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    vision = ENCODERS.get("siglip-tiny").build_config().to_transformers().to_dict()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(str(folder))
    return model


# ------------------------------------------------------------------------------------------ one component
def test_create_with_pretrained_builds_then_loads_a_state_dict_strictly(tmp_path):
    source = randomised(ENCODERS.create("mar-tiny"), seed=3)
    path = state_file(source, tmp_path / "mar.safetensors")
    loaded = ENCODERS.create("mar-tiny", pretrained=path)
    assert_same_weights(loaded, source.state_dict())
    assert not any(torch.equal(a, b) for a, b in zip(ENCODERS.create("mar-tiny").state_dict().values(),
                                                     source.state_dict().values()) if a.numel() > 1)

    state = dict(source.state_dict())
    missing = sorted(state)[0]
    del state[missing]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointKeyError, match=rf"missing\.safetensors.*missing keys: {missing}"):
        ENCODERS.create("mar-tiny", pretrained=tmp_path / "missing.safetensors")
    state = dict(source.state_dict(), **{"blocks.9.extra.weight": torch.zeros(2)})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointKeyError, match=r"extra\.safetensors.*unexpected keys: blocks\.9\.extra\.weight"):
        ENCODERS.create("mar-tiny", pretrained=tmp_path / "extra.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        ENCODERS.create("mar-tiny", pretrained=tmp_path / "nowhere.safetensors")


def test_a_released_format_error_names_the_file_and_the_key(tmp_path):
    from harmon.encoders.vae import convert_kl_state_dict_to_ldm

    source = randomised(ENCODERS.create("vae-kl16", **KL_TINY), seed=4)
    original = convert_kl_state_dict_to_ldm(source.vae.state_dict(), source.config.autoencoder())
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": original}, path)
    built = ENCODERS.create("vae-kl16", **KL_TINY)
    assert load_pretrained(built, path) is built  # in place: the very module built is loaded
    assert_same_weights(built, source.state_dict())
    del original["encoder.conv_in.bias"]
    torch.save({"model": original}, path)
    with pytest.raises(CheckpointKeyError, match=r"kl16\.ckpt.*missing \(1\): encoder\.conv_in\.bias"):
        ENCODERS.create("vae-kl16", pretrained=path, **KL_TINY)


def test_a_component_config_is_architecture_only():
    for name in ("siglip-tiny", "vqgan-f16", "vae-kl16", "mar-tiny"):
        assert "pretrained" not in ENCODERS.get(name).build_config().model_dump(), name
    with pytest.raises(ValueError, match="pretrained"):  # not a config field any more: refused by extra="forbid"
        ENCODERS.get("siglip-tiny").build_config(pretrained="somewhere")


def test_component_spec_keeps_pretrained_out_of_its_saved_form():
    spec = ComponentSpec(name="siglip-tiny", config={"image_size": 32}, pretrained=Path("weights/siglip"))
    assert spec.pretrained == str(Path("weights/siglip"))
    assert spec.model_dump() == {"name": "siglip-tiny", "config": {"image_size": 32}}
    assert spec.architecture() == ComponentSpec.model_validate_json(spec.model_dump_json())
    legacy = ComponentSpec(name="siglip-tiny", config={"image_size": 32, "pretrained": "weights/siglip"})
    assert legacy.config == {"image_size": 32} and legacy.pretrained == "weights/siglip"  # the older spelling
    with pytest.raises(ValueError, match=r"pretrained is given twice"):
        ComponentSpec(name="siglip-tiny", config={"pretrained": "a"}, pretrained="b")


# ------------------------------------------------------------------------------------------ a whole model
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Pretrained weights for two roles: a released SigLIP folder (understanding) and a MAR encoder state dict."""
    root = tmp_path_factory.mktemp("pretrained")
    siglip = released_siglip(root / "siglip")
    mar = randomised(ENCODERS.create("mar-tiny"), seed=5)
    return {
        "siglip": root / "siglip", "siglip_vision": {k: v.clone() for k, v in siglip.vision_model.state_dict().items()},
        "mar": state_file(mar, root / "mar_encoder.safetensors"), "mar_state": mar.state_dict(),
    }


def config_with_weights(weights: dict) -> HarmonConfig:
    return HarmonConfig.from_preset(
        "tiny",
        encoder=ComponentSpec(name="mar-tiny", pretrained=str(weights["mar"])),
        understanding_encoder=ComponentSpec(name="siglip-tiny", pretrained=str(weights["siglip"])),
    )


def vision_state(model: HarmonModel) -> dict[str, torch.Tensor]:
    return model.understanding_encoder.model.state_dict()


def test_from_config_loads_every_spec_pretrained_after_building(weights):
    model = HarmonModel.from_config(config_with_weights(weights))
    assert_same_weights(model.encoder, weights["mar_state"])
    state = vision_state(model)
    assert set(state) == set(weights["siglip_vision"]) - {k for k in weights["siglip_vision"] if k.startswith("head.")}
    assert all(torch.equal(state[k], weights["siglip_vision"][k]) for k in state)
    assert model.config.pretrained_weights() == {}  # the model keeps the architecture: it names no file
    assert model.core.harmon.pretrained_weights() == {}


def test_saved_configs_name_no_pretrained_weights_and_loading_never_opens_them(weights, tmp_path):
    # copies of the weights, removed after saving: loading must not need (or open) them
    mar, siglip = tmp_path / "mar.safetensors", tmp_path / "siglip"
    shutil.copy(weights["mar"], mar)
    shutil.copytree(weights["siglip"], siglip)
    model = HarmonModel.from_config(config_with_weights({"mar": mar, "siglip": siglip}))
    model.save_pretrained(tmp_path / "model")
    pipe = HarmonPipeline.from_model(model, tiny_tokenizer())
    pipe.save_pretrained(tmp_path / "pipe")
    for folder in (tmp_path / "model", tmp_path / "pipe"):
        for path in folder.rglob("*.json"):
            text = path.read_text()
            assert not keys_named(json.loads(text), "pretrained"), path
            assert str(mar) not in text and str(siglip) not in text, path
    saved = json.loads((tmp_path / "pipe" / "harmon" / "config.json").read_text())["harmon_config"]
    assert saved == json.loads((tmp_path / "model" / HarmonModel.CONFIG_NAME).read_text())

    mar.unlink()
    shutil.rmtree(siglip)
    again = HarmonModel.from_pretrained(tmp_path / "model")
    assert_same_weights(again, model.state_dict())
    loaded = HarmonPipeline.from_pretrained(tmp_path / "pipe")
    assert_same_weights(loaded.harmon, model.core.state_dict())


def _old_style(harmon_config: dict, siglip: str, mar: str) -> dict:
    """``harmon_config`` as older versions saved it: the weight paths inside the component configs."""
    old = json.loads(json.dumps(harmon_config))
    old["understanding_encoder"] = {"name": "siglip-tiny", "config": {"pretrained": siglip}}
    old["encoder"] = {"name": "mar-tiny", "config": {"pretrained": mar}}
    return old


def test_an_old_style_saved_config_with_pretrained_paths_still_loads(weights, tmp_path):
    model = HarmonModel.from_config(config_with_weights(weights))
    model.save_pretrained(tmp_path / "model")
    HarmonPipeline.from_model(model, tiny_tokenizer()).save_pretrained(tmp_path / "pipe")
    gone_siglip, gone_mar = str(tmp_path / "saver" / "siglip-tiny"), str(tmp_path / "saver" / "mar.safetensors")

    config_path = tmp_path / "model" / HarmonModel.CONFIG_NAME
    config_path.write_text(json.dumps(_old_style(json.loads(config_path.read_text()), gone_siglip, gone_mar)))
    again = HarmonModel.from_pretrained(tmp_path / "model")  # the paths are ignored: the weights are the folder's
    assert_same_weights(again, model.state_dict())
    assert again.config.pretrained_weights() == {}
    again.save_pretrained(tmp_path / "resaved")
    assert not keys_named(json.loads((tmp_path / "resaved" / HarmonModel.CONFIG_NAME).read_text()), "pretrained")

    core_config = tmp_path / "pipe" / "harmon" / "config.json"
    data = json.loads(core_config.read_text())
    data["harmon_config"] = _old_style(data["harmon_config"], gone_siglip, gone_mar)
    core_config.write_text(json.dumps(data))
    loaded = HarmonPipeline.from_pretrained(tmp_path / "pipe")
    assert_same_weights(loaded.harmon, model.core.state_dict())
    assert not keys_named(dict(loaded.harmon.config), "pretrained")  # and a re-save writes none
    core = HarmonCore(harmon_config=data["harmon_config"])  # building from it reads no file either
    assert not keys_named(dict(core.config), "pretrained")


# ------------------------------------------------------------------------------------------ the backbone, training
def test_the_backbone_loads_a_transformers_folder_strictly(tmp_path):
    from safetensors.torch import load_file

    from harmon.registry import BACKBONES

    source = randomised(BACKBONES.create("qwen2-tiny"), seed=6)
    source.save_pretrained(str(tmp_path / "qwen"))
    assert_same_weights(BACKBONES.create("qwen2-tiny", pretrained=tmp_path / "qwen"), source.state_dict())
    weights = load_file(str(tmp_path / "qwen" / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(tmp_path / "qwen" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeyError, match=r"qwen does not fit Qwen2ForCausalLM: missing keys: model\.norm\."):
        BACKBONES.create("qwen2-tiny", pretrained=tmp_path / "qwen")  # transformers alone would re-initialise it


def test_training_builds_then_loads_and_exports_no_weight_path(weights, tmp_path):
    from harmon.registry import BACKBONES
    from harmon.training.config import ModelSource
    from harmon.training.modules import build_model

    llm = randomised(BACKBONES.create("qwen2-tiny"), seed=7)
    llm.save_pretrained(str(tmp_path / "qwen"))
    source = ModelSource(preset="tiny", llm_weights=tmp_path / "qwen", config_overrides={
        "encoder": {"name": "mar-tiny", "pretrained": str(weights["mar"])}})
    model = build_model(source)
    assert_same_weights(model.llm, llm.state_dict())
    assert_same_weights(model.encoder, weights["mar_state"])
    model.save_pretrained(tmp_path / "export")
    saved = (tmp_path / "export" / HarmonModel.CONFIG_NAME).read_text()
    assert not keys_named(json.loads(saved), "pretrained") and str(tmp_path / "qwen") not in saved

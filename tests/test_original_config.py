"""The release's own config files: configs/models/*.py (read, never run) and original_config.json.

The two released configs are written here in the original's form (wusize/Harmon ``configs/models``); their
mapping is checked against the presets (real sizes: built on the meta device only). A full conversion from a
``.py`` config runs on the public parity fixture's tiny weights (original layouts) and must reproduce its tensors.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from transformers import AutoTokenizer

from harmon.checkpoints import CheckpointKeyError, read_state_dict
from harmon.cli import main
from harmon.configs import HarmonConfig, to_original_config
from harmon.conversion import load_original_harmon
from harmon.original_config import (
    ConfigCall, OriginalConfigError, read_original_config, read_python_config, to_harmon_config,
)
from harmon.registry import DECODERS, ENCODERS, HEADS

from conftest import assert_close, parity_readme, replay_recorded_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the release's configs/models/qwen2_5_{0_5b_kl16_mar_b,1_5b_kl16_mar_h}.py, in its form (imports, module-level
# names, dict(type=...) builders); {placeholders} vary per test
RELEASE_CONFIG = """\
# Copyright (c) OpenMMLab. All rights reserved.
import torch
from transformers import AutoModelForCausalLM
from src.models.mar.mar import {factory}
from src.models.mar.vae import AutoencoderKL
from src.models.harmon import Harmon
from xtuner.utils import PROMPT_TEMPLATE
from transformers import AutoTokenizer

llm_name_or_path = '{llm}'
prompt_template = PROMPT_TEMPLATE.qwen_chat

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=llm_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=Harmon,
    tokenizer=tokenizer,
    prompt_template=prompt_template,
    vae=dict(type=AutoencoderKL,
             embed_dim=16,
             ch_mult=(1, 1, 2, 2, 4),
             ckpt_path='{vae}'),
    vae_scale=0.2325,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=llm_name_or_path,
        torch_dtype=torch.bfloat16,
        attn_implementation='flash_attention_2',
    ),
    mar=dict(type={factory},
{mar}
             ),
)
"""
RELEASED_MAR = """\
             img_size=256,
             vae_stride=16,
             patch_size=1,
             vae_embed_dim=16,
             mask_ratio_min=0.7,
             label_drop_prob=0.1,
             class_num=1000,
             attn_dropout=0.1,
             proj_dropout=0.1,
             buffer_size=64,
             diffloss_d={diffloss_d},
             diffloss_w={diffloss_w},
             num_sampling_steps="100",
             diffusion_batch_mul=4,
             grad_checkpointing=True,"""
RELEASES = {
    "qwen2_5_0_5b_kl16_mar_b.py": dict(factory="mar_base", llm="Qwen/Qwen2.5-0.5B-Instruct", diffloss_d=6,
                                       diffloss_w=1024, preset="harmon-0.5b"),
    "qwen2_5_1_5b_kl16_mar_h.py": dict(factory="mar_huge", llm="Qwen/Qwen2.5-1.5B-Instruct", diffloss_d=12,
                                       diffloss_w=1536, preset="harmon-1.5b"),
}


def _release_config(tmp_path, name: str, vae: str = "checkpoints/kl16.ckpt"):
    spec = RELEASES[name]
    path = tmp_path / name
    mar = RELEASED_MAR.format(diffloss_d=spec["diffloss_d"], diffloss_w=spec["diffloss_w"])
    path.write_text(RELEASE_CONFIG.format(factory=spec["factory"], llm=spec["llm"], vae=vae, mar=mar))
    return path


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_released_python_configs_map_to_the_released_shapes(tmp_path, name):
    config = read_original_config(_release_config(tmp_path, name))
    assert config.model.mar.type == RELEASES[name]["factory"]
    assert config.model.vae.ckpt_path == "checkpoints/kl16.ckpt"
    assert config.model.llm.pretrained_model_name_or_path == RELEASES[name]["llm"]
    mapped = to_harmon_config(config)
    preset = HarmonConfig.from_preset(RELEASES[name]["preset"])
    for role, registry in (("encoder", ENCODERS), ("decoder", DECODERS), ("head", HEADS)):
        assert getattr(mapped, role).resolve(registry) == getattr(preset, role).resolve(registry), role
    for setting in ("vae", "vae_scale", "vae_stride", "patch_size", "image_size", "mask_ratio_min", "prompt_template"):
        assert getattr(mapped, setting) == getattr(preset, setting), setting
    encoder = mapped.encoder.resolve(ENCODERS)
    assert encoder.norm_eps == 1e-6 and encoder.mlp_ratio == 4.0
    with torch.device("meta"):  # the real-size model builds from the mapped config (no memory on meta)
        from harmon.model import HarmonModel

        model = HarmonModel.from_config(mapped)
    assert len(model.encoder.blocks) == encoder.depth


def test_the_factories_shapes():
    from harmon.original_config import MAR_FACTORIES

    shapes = {name: (f["encoder_embed_dim"], f["encoder_depth"], f["encoder_num_heads"],
                     f["decoder_embed_dim"], f["decoder_depth"], f["decoder_num_heads"], f["mlp_ratio"])
              for name, f in MAR_FACTORIES.items()}
    assert shapes == {"mar_base": (768, 12, 12, 768, 12, 12, 4.0), "mar_large": (1024, 16, 16, 1024, 16, 16, 4.0),
                      "mar_huge": (1280, 20, 16, 1280, 20, 16, 4.0)}


def test_the_python_config_is_read_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.py"
    path.write_text(f"import os\nx = __import__('os').system('touch {marker}')\nmodel = dict(mar=dict())\n")
    with pytest.raises(OriginalConfigError, match=r"evil\.py:2"):
        read_python_config(path)
    path.write_text(f"import os\nos.system('touch {marker}')\nmodel = dict()\n")  # a bare call: data, never called
    assert read_python_config(path) == {}
    assert not marker.exists()
    path.write_text("if True:\n    model = dict()\n")
    with pytest.raises(OriginalConfigError, match=r"evil\.py:1: a If statement"):
        read_python_config(path)
    path.write_text("_base_ = ['x.py']\nmodel = dict()\n")
    with pytest.raises(OriginalConfigError, match="_base_"):
        read_python_config(path)
    path.write_text("m = dict(type=mar)\n")
    with pytest.raises(OriginalConfigError, match="no `model"):
        read_python_config(path)


def test_calls_and_names_are_read_as_data(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from functools import partial\nimport torch.nn as nn\nw = -3\n"
                    "model = dict(a=partial(nn.LayerNorm, eps=1e-6), b=torch.bfloat16, c=(1, w), d={'k': [w]})\n")
    assert read_python_config(path) == {"a": ConfigCall("partial", ("nn.LayerNorm",), {"eps": 1e-6}),
                                        "b": "torch.bfloat16", "c": (1, -3), "d": {"k": [-3]}}


def _json(tmp_path, data) -> str:
    path = tmp_path / "original_config.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("field, value", [("encoder_depth", "two"), ("encoder_depth", 2.7), ("buffer_size", True),
                                          ("mlp_ratio", "4"), ("num_sampling_steps", "many")])
def test_a_bad_number_names_its_field(tmp_path, original_config, field, value):
    data = json.loads(json.dumps(original_config))
    data["mar"][field] = value
    with pytest.raises(OriginalConfigError, match=rf"original config .*original_config\.json: mar\.{field}: ") as caught:
        read_original_config(_json(tmp_path, data))
    assert repr(value) in str(caught.value)


def test_missing_and_unknown_sections_and_keys_are_named(tmp_path, original_config):
    data = {k: v for k, v in original_config.items() if k != "mar"}
    with pytest.raises(OriginalConfigError, match="no 'mar' section"):
        read_original_config(_json(tmp_path, data))
    with pytest.raises(OriginalConfigError, match="no 'vae' section"):
        read_original_config({k: v for k, v in original_config.items() if k != "vae"})
    for where, extra in (("mar", "encoder_width"), ("vae", "channels"), (None, "scale")):
        data = json.loads(json.dumps(original_config))
        (data[where] if where else data)[extra] = 1
        name = f"{where}.{extra}" if where else extra
        with pytest.raises(OriginalConfigError, match=rf"{name}: not an argument of the original "):
            read_original_config(_json(tmp_path, data))
    data = json.loads(json.dumps(original_config))
    del data["vae"]["embed_dim"]
    with pytest.raises(OriginalConfigError, match=r"vae\.embed_dim: missing"):
        read_original_config(data)
    (tmp_path / "broken.json").write_text("{mar: ")
    with pytest.raises(OriginalConfigError, match="broken.json"):
        read_original_config(tmp_path / "broken.json")


def test_what_the_original_refuses_or_this_library_cannot_convert_is_named(tmp_path, original_config):
    def refused(section: str, key: str, value, pattern: str, without: str | None = None):
        data = json.loads(json.dumps(original_config))
        data[section][key] = value
        data[section].pop(without, None)
        with pytest.raises(OriginalConfigError, match=pattern):
            read_original_config(data)

    refused("mar", "type", "mar_huge", r"mar_huge fixes .*encoder_depth")  # the factory fixes the stated sizes
    refused("mar", "type", "mar_gigantic", r"mar\.type: unknown MAR constructor 'mar_gigantic'")
    refused("mar", "norm_layer", {"type": "LayerNorm", "eps": 1e-5}, r"mar\.norm_layer: LayerNorm eps 1e-05")
    refused("mar", "norm_layer", "BatchNorm2d", r"mar\.norm_layer: norm_layer must be a LayerNorm")
    refused("mar", "type", "MAR", r"mar\.norm_layer: LayerNorm eps 1e-05 .*type=MAR without norm_layer",
            without="norm_layer")
    with pytest.raises(OriginalConfigError, match=r"prompt_template\.SYSTEMS: not an argument"):
        read_original_config({**original_config, "prompt_template": {"SYSTEMS": "x"}})
    refused("vae", "type", "VQModel", r"vae\.type: the VAE must be the original AutoencoderKL")
    with pytest.raises(OriginalConfigError, match="unknown prompt template 'PROMPT_TEMPLATE.llama3'"):
        read_original_config({**original_config, "prompt_template": "PROMPT_TEMPLATE.llama3"})


def test_a_json_config_with_the_constructors_full_argument_lists_converts_the_fixture(
    fixture_files, parity_tensors, original_config, tmp_path
):
    """Every argument of MAR.__init__, AutoencoderKL and the Harmon model dict under its original name."""
    data = json.loads(json.dumps(original_config))
    data["type"] = "src.models.harmon.Harmon"
    data["mar"].update(type="MAR", norm_layer={"type": "LayerNorm", "eps": 1e-6})
    data["vae"].update(type="AutoencoderKL", use_variational=True, ckpt_path=str(fixture_files["vae"]))
    data["llm"] = dict(type="AutoModelForCausalLM.from_pretrained", pretrained_model_name_or_path=str(fixture_files["llm"]),
                       torch_dtype="torch.float32", attn_implementation="eager")
    data["tokenizer"] = dict(type="AutoTokenizer.from_pretrained", pretrained_model_name_or_path=str(fixture_files["llm"]),
                             trust_remote_code=True, padding_side="right")
    model = load_original_harmon(fixture_files["harmon"], original_config=_json(tmp_path, data))
    t = parity_tensors
    assert_close(model.encode_image(t["vae.image"]), t["vae.tokens"], 1e-5, "vae.tokens")
    with torch.no_grad():
        assert_close(model.visual_features(t["vae.tokens"])[0], t["und.x_enc"], 1e-5, "und.x_enc")


def _fixture_as_a_release(fixture_files, tmp_path, original_config):
    """The public fixture laid out as a user of the release has it: the checkpoints and the LLM folder under
    ``tmp_path``, a ``.py`` model config in ``configs/`` naming them relatively (VAE ``ch`` not stated: it is read
    from the checkpoint). Returns the config's path."""
    for role, name in (("harmon", "harmon.pth"), ("vae", "kl16.ckpt"), ("llm", "llm")):
        os.symlink(fixture_files[role], tmp_path / name)
    lines = [f"             {key}={value!r}," for key, value in original_config["mar"].items()]
    lines.append("             norm_layer=partial(nn.LayerNorm, eps=1e-6),")
    text = RELEASE_CONFIG.format(factory="MAR", llm="../llm", vae="../kl16.ckpt", mar="\n".join(lines))
    text = text.replace("import torch\n", "import torch\nfrom functools import partial\nimport torch.nn as nn\n", 1)
    text = text.replace("ch_mult=(1, 1, 2, 2, 4)", f"ch_mult={tuple(original_config['vae']['ch_mult'])!r}")
    text = text.replace("vae_scale=0.2325", f"vae_scale={original_config['vae_scale']!r}")
    path = tmp_path / "configs" / "release_tiny.py"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_convert_from_a_python_config_alone_reproduces_the_fixture(fixture_files, parity_dir, parity_tensors,
                                                                    original_config, tmp_path):
    config = _fixture_as_a_release(fixture_files, tmp_path, original_config)
    assert "ch" not in read_original_config(config).model.vae.model_fields_set
    out = tmp_path / "converted"
    # no --vae / --llm: the config names them (relative to the config file)
    assert main(["convert", "--harmon", str(tmp_path / "harmon.pth"), "--config", str(config),
                 "--out", str(out)]) == 0
    from harmon.pipelines import HarmonPipeline

    pipe = HarmonPipeline.from_pretrained(out)
    assert pipe.model.config.vae.ch == original_config["vae"].get("ch", pipe.model.config.vae.ch)
    t = parity_tensors
    readme = parity_readme(parity_dir)
    pipe.set_progress_bar_config(disable=True)
    image = replay_recorded_image(pipe, t, readme)
    assert_close(image, t["e2e.image"], 1e-5, "e2e.image")
    # the written JSON form reads back to the same architecture
    written = read_original_config(out / "original_config.json")
    assert to_harmon_config(written, pipe.llm.config) == pipe.model.config


def test_paths_the_config_names_must_exist(fixture_files, original_config, tmp_path, monkeypatch):
    config = _fixture_as_a_release(fixture_files, tmp_path, original_config)
    os.unlink(tmp_path / "kl16.ckpt")
    with pytest.raises(FileNotFoundError, match=r"vae\.ckpt_path '\.\./kl16\.ckpt' named in .*release_tiny\.py"):
        load_original_harmon(tmp_path / "harmon.pth", original_config=config)
    # a hub id is not downloaded: offline, the error says to download it and pass --llm
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub = _release_config(tmp_path, "qwen2_5_1_5b_kl16_mar_h.py")
    with pytest.raises(OSError, match=r"Qwen/Qwen2\.5-1\.5B-Instruct.*--llm <folder>.*HF_HUB_OFFLINE"):
        load_original_harmon(tmp_path / "harmon.pth", fixture_files["vae"], original_config=hub)
    with pytest.raises(ValueError, match=r"vae_checkpoint \(--vae\) is required"):
        load_original_harmon(tmp_path / "harmon.pth", None, fixture_files["llm"], preset="tiny")
    with pytest.raises(SystemExit, match="--preset needs --vae and --llm"):
        main(["convert", "--harmon", "h.pth", "--preset", "harmon-0.5b", "--out", str(tmp_path / "o")])


def test_a_released_config_on_tiny_checkpoints_says_what_differs(fixture_files, tmp_path):
    """The 1.5B config pointed at small checkpoints: a short error with the sizes each side has, raised before the
    1.5B-sized model is built."""
    config = _release_config(tmp_path, "qwen2_5_1_5b_kl16_mar_h.py", vae=str(fixture_files["vae"]))
    shutil.copy(fixture_files["harmon"], tmp_path / "h.pth")
    with pytest.raises(CheckpointKeyError) as caught:
        load_original_harmon(tmp_path / "h.pth", llm_folder=fixture_files["llm"], original_config=config)
    message = str(caught.value)
    assert len(message) < 1000, len(message)
    assert "do not fit the original config" in message and "qwen2_5_1_5b_kl16_mar_h.py" in message
    assert "encoder_embed_dim 64 (expected 1280)" in message and "diffloss_w 64 (expected 1536)" in message
    assert "VAE ch 32" in message and "ch 32 (expected" not in message  # unstated in the .py: read from the checkpoint
    assert "The checkpoints hold: MAR encoder 64 wide" in message
    assert "fit no released preset" in message


def test_the_written_json_form_round_trips(original_config):
    config = HarmonConfig.from_original(original_config)
    assert HarmonConfig.from_original(to_original_config(config)) == config


def test_from_original_in_python_reads_the_files_the_config_names(fixture_files, original_config, tmp_path):
    from harmon.cli import build_parser
    from harmon.pipelines import HarmonPipeline

    config = _fixture_as_a_release(fixture_files, tmp_path, original_config)
    pipe = HarmonPipeline.from_original(tmp_path / "harmon.pth", original_config=config)
    assert pipe.model.config.vae.ch == int(read_state_dict(fixture_files["vae"])["encoder.conv_in.weight"].shape[0])
    assert pipe.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(fixture_files["llm"])).get_vocab()
    # the CLI's --config is also spelled --original-config, the Python argument's name
    args = build_parser().parse_args(["convert", "--harmon", "h.pth", "--original-config", str(config), "--out", "o"])
    assert args.config == str(config) and args.vae is None and args.llm is None


def test_a_non_variational_vae_converts_exactly(fixture_files, parity_tensors, original_config, tmp_path):
    """``AutoencoderKL(use_variational=False)``: quant_conv gives the mean only and the log-variance is 1. Made
    here from the fixture's VAE by keeping quant_conv's mean rows: the posterior mean must be the recorded one."""
    vae = read_state_dict(fixture_files["vae"])
    embed_dim = vae["post_quant_conv.weight"].shape[0]
    vae["quant_conv.weight"], vae["quant_conv.bias"] = vae["quant_conv.weight"][:embed_dim], vae["quant_conv.bias"][:embed_dim]
    torch.save({"model": vae}, tmp_path / "kl16_mean_only.ckpt")
    data = json.loads(json.dumps(original_config))
    data["vae"]["use_variational"] = False
    model = load_original_harmon(fixture_files["harmon"], tmp_path / "kl16_mean_only.ckpt", fixture_files["llm"],
                                 original_config=data)
    with torch.no_grad():
        posterior = model.vae.encode(parity_tensors["vae.image"]).latent_dist
    assert_close(posterior.mode(), parity_tensors["vae.posterior_mode"], 1e-5, "vae.posterior_mode")
    assert torch.equal(posterior.logvar, torch.ones_like(posterior.logvar))  # as the original's torch.ones_like
    data["vae"]["use_variational"] = True  # the mean-only checkpoint under a variational config: named
    with pytest.raises(CheckpointKeyError, match=r"quant_conv\.weight"):
        load_original_harmon(fixture_files["harmon"], tmp_path / "kl16_mean_only.ckpt", fixture_files["llm"],
                             original_config=data)

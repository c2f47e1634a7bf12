"""Class 5 of issue 14: a saved pipeline loads strictly, component by component, or not at all.

Each damaged copy of a saved tiny pipeline must be refused with an error naming the file (and the tensor keys),
without changing the folder, and without touching a pipeline already in memory. transformers alone would load an
LLM missing a tensor with that weight initialised at random, and a folder without ``tokenizer/`` with a
tokenizer built from nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harmon.checkpoints import CheckpointKeyError, IncompleteFolderError
from harmon.cli import main
from harmon.pipelines import HarmonPipeline
from harmon.testing import tiny_model, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLM = "llm/model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
CORE = "harmon/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipe() -> HarmonPipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(str(folder))
    return folder


def generate(pipe) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def tokenizer_component(folder: Path) -> str:
    """The component folder holding the tokenizer (``tokenizer/``, or a processor's folder)."""
    return next(path.parent.name for path in sorted(folder.glob("*/tokenizer.json")))


def resolve(folder: Path, relative: str) -> Path:
    return folder / relative.format(tok=tokenizer_component(folder))


def edit_tensors(relative: str, change):
    def apply(folder: Path) -> None:
        path = folder / relative
        state = load_file(str(path))
        change(state)
        save_file(state, str(path), metadata={"format": "pt"})
    return apply


def first_key(prefix: str = ""):
    return lambda state: sorted(k for k in state if k.startswith(prefix))[0]


def drop(key_of):
    return lambda state: state.pop(key_of(state))


def reshape(key_of):
    def change(state):
        key = key_of(state)
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    return change


def truncate(relative: str, keep: int | None = None):
    def apply(folder: Path) -> None:
        path = folder / relative
        data = path.read_bytes()
        path.write_bytes(data[: keep if keep is not None else len(data) - 64])
    return apply


def write(relative: str, text: str):
    return lambda folder: resolve(folder, relative).write_text(text)


def remove(relative: str):
    def apply(folder: Path) -> None:
        path = resolve(folder, relative)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return apply


def index_edit(change):
    def apply(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        change(index)
        (folder / "model_index.json").write_text(json.dumps(index))
    return apply


CASES = {
    # LLM tensors: transformers would log and re-initialise / ignore these
    "llm-missing-tensor": (edit_tensors(LLM, drop(first_key("model.layers.1."))), CheckpointKeyError,
                           [LLM, "missing keys: model.layers.1."]),
    "llm-unexpected-tensor": (edit_tensors(LLM, lambda s: s.update({"model.extra.weight": torch.zeros(2)})),
                              CheckpointKeyError, [LLM, "unexpected keys: model.extra.weight"]),
    "llm-misshaped-tensor": (edit_tensors(LLM, reshape(lambda s: "model.norm.weight")), CheckpointKeyError,
                             [LLM, r"mis-shaped keys: model.norm.weight \(65,\) \(expected \(64,\)\)"]),
    "llm-truncated": (truncate(LLM), IncompleteFolderError, [LLM, "not a readable safetensors"]),
    "llm-header-only": (truncate(LLM, keep=6), IncompleteFolderError, [LLM, "not a readable safetensors"]),
    "llm-weights-missing": (remove(LLM), IncompleteFolderError, ["llm", r"no weights file \(\*.safetensors or \*.bin\)"]),
    "llm-config-corrupt": (write("llm/config.json", '{"hidden_size": '), IncompleteFolderError,
                           ["llm/config.json", "is not a readable"]),
    "llm-config-missing": (remove("llm/config.json"), IncompleteFolderError, ["llm/config.json", "missing"]),
    "llm-config-other-shape": (
        lambda f: (f / "llm/config.json").write_text(json.dumps(
            {**json.loads((f / "llm/config.json").read_text()), "intermediate_size": 96})),
        CheckpointKeyError, [LLM, "mis-shaped keys: model.layers.0.mlp"]),
    # VAE and core
    "vae-missing-tensor": (edit_tensors(VAE, drop(first_key("decoder."))), CheckpointKeyError,
                           [VAE, "missing keys: decoder."]),
    "vae-misshaped-tensor": (edit_tensors(VAE, reshape(first_key("encoder.conv_in.bias"))), CheckpointKeyError,
                             [VAE, "mis-shaped keys: encoder.conv_in.bias"]),
    "vae-truncated": (truncate(VAE), IncompleteFolderError, [VAE, "not a readable safetensors"]),
    "core-truncated": (truncate(CORE), IncompleteFolderError, [CORE, "not a readable safetensors"]),
    "core-missing-tensor": (edit_tensors(CORE, drop(lambda s: "encoder.z_proj.weight")), CheckpointKeyError,
                            [CORE, "missing keys: encoder.z_proj.weight"]),
    "core-config-corrupt": (write("harmon/config.json", "[1, 2"), IncompleteFolderError,
                            ["harmon/config.json", "not a readable"]),
    # tokenizer and scheduler
    "tokenizer-folder-missing": (remove("{tok}"), IncompleteFolderError, ["{tok}/ is missing"]),
    "tokenizer-vocabulary-missing": (remove("{tok}/tokenizer.json"), IncompleteFolderError,
                                     ["{tok}", "holds no vocabulary"]),
    "tokenizer-config-corrupt": (write("{tok}/tokenizer_config.json", "{"), IncompleteFolderError,
                                 ["{tok}/tokenizer_config.json", "is not a readable"]),
    "scheduler-config-corrupt": (write("scheduler/scheduler_config.json", "nope"), IncompleteFolderError,
                                 ["scheduler/scheduler_config.json", "is not a readable"]),
    "scheduler-folder-missing": (remove("scheduler"), IncompleteFolderError, ["scheduler/ is missing"]),
    # the index
    "index-corrupt": (write("model_index.json", '{"_class_name": "HarmonPipeline",'), IncompleteFolderError,
                      ["model_index.json", "not a readable pipeline index"]),
    "index-not-an-object": (write("model_index.json", "[1, 2]"), IncompleteFolderError,
                            ["model_index.json", "holds a JSON list"]),
    "index-without-vae": (index_edit(lambda i: i.pop("vae")), IncompleteFolderError,
                          ["model_index.json", "component 'vae' is missing"]),
    "index-bad-entry": (index_edit(lambda i: i.update(llm="transformers")), IncompleteFolderError,
                        ["model_index.json", "component 'llm'"]),
}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_pipeline_folder_is_refused_naming_the_file_and_key(pipe, saved, tmp_path, case):
    damage, error, expected = CASES[case]
    folder = tmp_path / case
    shutil.copytree(saved, folder)
    expected = [part.format(tok=tokenizer_component(folder)) for part in expected]
    damage(folder)
    before = folder_digest(folder)
    reference = generate(pipe)
    with pytest.raises(error) as caught:
        HarmonPipeline.from_pretrained(folder)
    message = str(caught.value)
    for part in expected:
        assert re.search(part, message), f"{part!r} not in {message!r}"
    assert folder_digest(folder) == before  # nothing written, nothing moved
    assert torch.equal(generate(pipe), reference)  # the pipeline in memory is untouched


@pytest.mark.parametrize("form", ["pickle", "sharded", "variant"])
def test_every_serialization_is_checked_strictly(pipe, tmp_path, form):
    folder = tmp_path / form
    save = {"pickle": dict(safe_serialization=False), "sharded": dict(max_shard_size="20KB"),
            "variant": dict(variant="fp16")}[form]
    pipe.save_pretrained(str(folder), **save)
    load = {"variant": "fp16"} if form == "variant" else {}
    reference = generate(pipe)
    if form == "pickle":
        weights = folder / "vae" / "diffusion_pytorch_model.bin"  # (transformers 5 writes the LLM as safetensors)
        state = torch.load(weights, weights_only=True)
        del state["decoder.conv_out.bias"]
        torch.save(state, weights)
        expected = (CheckpointKeyError, rf"{weights} does not fit .*missing keys: decoder.conv_out.bias")
    elif form == "sharded":
        shard = sorted((folder / "llm").glob("model-*.safetensors"))[-1]
        shard.unlink()
        expected = (IncompleteFolderError, rf"{shard} is missing \(listed in model.safetensors.index.json\)")
    else:
        weights = next((folder / "vae").glob("*.fp16.safetensors"))
        truncate(str(weights.relative_to(folder)))(folder)
        expected = (IncompleteFolderError, rf"{weights} is not a readable safetensors file")
    with pytest.raises(expected[0], match=expected[1]):
        HarmonPipeline.from_pretrained(folder, **load)
    assert torch.equal(generate(pipe), reference)


def test_a_missing_variant_is_named(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path), variant="fp16")
    with pytest.raises(ValueError, match="variant=bf16"):
        HarmonPipeline.from_pretrained(tmp_path, variant="bf16")


def test_the_intact_folder_still_loads_and_generates_the_same_image(pipe, saved):
    loaded = HarmonPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(generate(loaded), generate(pipe))


def test_harmon_info_on_a_corrupt_index_is_one_line_exit_2(saved, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    shutil.copytree(saved, folder)
    (folder / "model_index.json").write_text("{")
    assert main(["info", str(folder)]) == 2  # returned, not raised: no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "harmon info: error:" in lines[0] and "model_index.json" in lines[0], lines


@pytest.mark.parametrize("case", ["llm-missing-tensor", "tokenizer-folder-missing", "vae-truncated"])
def test_cli_verbs_refuse_a_damaged_folder_in_one_line(saved, tmp_path, capsys, case):
    damage, _, expected = CASES[case]
    folder = tmp_path / case
    shutil.copytree(saved, folder)
    expected = [part.format(tok=tokenizer_component(folder)) for part in expected]
    damage(folder)
    out = tmp_path / "out"
    assert main(["generate", str(folder), "--prompt", "a cat", "--steps", "2", "--out", str(out)]) == 2
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(expected[0].split("/")[0] in line for line in err), err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "missing-tensor"])
def test_a_damaged_saved_model_folder_is_refused_naming_the_file(tmp_path, damage):
    from harmon.model import HarmonModel

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    weights = folder / HarmonModel.WEIGHTS_NAME
    if damage == "truncated":
        truncate(HarmonModel.WEIGHTS_NAME)(folder)
        expected = (ValueError, "not a readable safetensors")
    else:
        edit_tensors(HarmonModel.WEIGHTS_NAME, drop(lambda s: "proj_out.0.weight"))(folder)
        expected = (CheckpointKeyError, "missing keys: proj_out.0.weight")
    with pytest.raises(expected[0], match=expected[1]) as caught:
        HarmonModel.from_pretrained(folder)
    assert str(weights) in str(caught.value)

"""harmon.toy's data, tokenizer, preset and embedded-name resolution (fast: no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harmon.toy import pretrained_folder, resolve_embedded
from harmon.toy.data import (
    COLOURS,
    Digit,
    Scene,
    caption,
    digit_split,
    questions,
    render,
    scenes,
    write_dataset,
)
from harmon.toy.tokenizer import VOCAB_SIZE, toy_tokenizer


def test_held_out_digits_are_the_datasets_own_other_images():
    split = digit_split()
    for value in range(10):
        train, test = set(split["train"][value]), set(split["test"][value])
        assert train and test and not train & test
        assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    used_train = {d.sample for s in scenes(300, "train") for d in s.digits}
    used_test = {d.sample for s in scenes(300, "test") for d in s.digits}
    assert not used_train & used_test


def test_scenes_are_seeded_and_render_deterministically():
    assert scenes(20, seed=3) == scenes(20, seed=3)
    assert scenes(20, seed=3) != scenes(20, seed=4)
    scene = scenes(1, seed=3)[0]
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))


def test_render_places_a_coloured_digit_on_its_side_only():
    image = np.asarray(render(Scene((Digit(3, "red", "right", 5),))), dtype=np.float32)
    assert image.shape == (64, 64, 3)
    assert image[:, :32].max() == 0  # the left half is black
    right = image[:, 32:]
    lit = right.max(axis=2) > 64
    assert lit.sum() > 40
    r, g, b = right[lit].mean(axis=0)
    assert r > 3 * g and r > 3 * b


def test_render_refuses_a_digit_without_a_sample():
    with pytest.raises(ValueError, match="sample"):
        render(Scene((Digit(3, "red", "left"),)))


def test_captions_and_questions():
    scene = Scene((Digit(3, "red", "left", 1), Digit(7, "blue", "right", 2)))
    assert caption(scene) == "a red 3 on the left and a blue 7 on the right"
    asked = {q: a for _, q, a in questions(scene)}
    assert asked["What digit is on the left?"] == "3"
    assert asked["What colour is the 7?"] == "blue"
    assert asked["How many digits are there?"] == "two"
    assert asked["Where is the 3?"] == "left"
    single = {q: a for _, q, a in questions(Scene((Digit(5, "green", "right", 1),)))}
    assert single["What digit is on the left?"] == "none"
    assert single["How many digits are there?"] == "one"
    # the same digit twice: no question names it
    twice = [q for _, q, _ in questions(Scene((Digit(4, "red", "left", 1), Digit(4, "blue", "right", 2))))]
    assert not any("the 4" in q for q in twice)


def test_write_dataset_reads_back_through_the_training_engine(tmp_path):
    from harmon.training.config import CaptionSource, DataConfig, LlavaSource
    from harmon.training.data import CaptionRecords, LlavaRecords

    root = write_dataset(tmp_path / "toy", count=6, seed=1)
    data = DataConfig(root=root, image_size=64, ratios={"text_to_image": 1},
                      text_to_image=[{"format": "caption", "data_info": "data_info.json"}])
    captions = CaptionRecords(CaptionSource(data_info="data_info.json"), data)
    llava = LlavaRecords(LlavaSource(path="llava.json"), data)
    described = json.loads((root / "scenes.json").read_text())
    assert len(captions) == len(llava) == len(described) == 6
    first = Scene(tuple(Digit(**d) for d in described[0]))
    assert captions.caption(0) == caption(first)
    assert np.array_equal(np.asarray(captions.image(0)), np.asarray(render(first)))
    turns = llava.entries[0]["turns"]
    assert {(q, a) for q, a in turns[:-1]} == {(q, a) for _, q, a in questions(first)}
    assert turns[-1][1] == caption(first)
    # the condition probes' labels: each slot's digit and colour class, "empty" for an empty slot
    from harmon.toy.data import EMPTY_COLOUR, EMPTY_DIGIT, PROBE_REGIONS, PROBE_TARGETS
    from harmon.training.config import ConditionProbeConfig

    probes = ConditionProbeConfig(weight=1.0, regions=PROBE_REGIONS, targets=PROBE_TARGETS)
    for i, scene_digits in enumerate(described):
        scene = Scene(tuple(Digit(**d) for d in scene_digits))
        text, labels = captions.caption_and_region_labels(i, probes)
        assert text == caption(scene)
        for r, side in enumerate(PROBE_REGIONS):
            digit = scene.on(side)
            expected = [digit.value, COLOURS.index(digit.colour)] if digit else [EMPTY_DIGIT, EMPTY_COLOUR]
            assert labels[r].tolist() == expected


def test_the_recipes_probe_the_slots_the_data_labels():
    """Every toy recipe with condition probes names the data's regions and class counts."""
    from harmon.toy.data import PROBE_REGIONS, PROBE_TARGETS
    from harmon.toy.train import RECIPES, STAGES
    from harmon.training.config import load_config

    probed = []
    for stage in STAGES:
        recipe = load_config(RECIPES / f"{stage}.yaml", check_files=False)
        if recipe.condition_probes is not None:
            probed.append(stage)
            assert recipe.condition_probes.regions == PROBE_REGIONS
            assert recipe.condition_probes.targets == PROBE_TARGETS
    assert probed == ["stage2", "stage3", "drawing", "colour"]


def test_tokenizer_has_one_token_per_word_and_the_chat_specials(tmp_path):
    tokenizer = toy_tokenizer()
    assert len(tokenizer) <= VOCAB_SIZE
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")] \
        == [0, 1, 2, 3]
    text = caption(Scene((Digit(3, "red", "left", 1), Digit(7, "blue", "right", 2))))
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
    for colour in COLOURS:
        assert tokenizer.decode(tokenizer.encode(colour)) == colour
    tokenizer.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).encode(text) == ids


def test_the_preset_fits_the_package_budget():
    from harmon import HarmonConfig, HarmonModel

    config = HarmonConfig.from_preset("harmon-toy")
    assert config.latent_stride == 8 and config.image_size == 64
    model = HarmonModel.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters * 2 <= 5_000_000  # fp16 bytes
    assert model.llm.config.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("argv, tied", [([], True), (["--untied-embeddings"], False)])
def test_prepare_toy_ties_the_word_embeddings_unless_told(tmp_path, argv, tied):
    from harmon import HarmonModel
    from harmon.toy.train import build_parser, prepare_toy, settings_from_args

    args = build_parser().parse_args(["--out", str(tmp_path), "--num-images", "16", "--vae-steps", "1",
                                      "--threads", "1", *argv])
    init = prepare_toy(tmp_path, settings_from_args(args), log=None)["init"]
    llm = HarmonModel.from_pretrained(init).llm
    same = llm.get_input_embeddings().weight.data_ptr() == llm.get_output_embeddings().weight.data_ptr()
    assert same is tied and llm.config.tie_word_embeddings is tied


def test_embedded_names_resolve_and_other_names_pass_through(tmp_path):
    import torch

    assert pretrained_folder("some/folder") is None
    assert resolve_embedded(tmp_path, {"a": 1}) == (tmp_path, {"a": 1})
    folder, kwargs = resolve_embedded("harmon-toy", {})
    assert folder == pretrained_folder("harmon-toy") and (folder / "model_index.json").is_file()
    assert kwargs == {"dtype": torch.float32}
    assert resolve_embedded("harmon-toy", {"dtype": torch.float16})[1] == {"dtype": torch.float16}


def test_a_missing_embedded_folder_is_named(monkeypatch, tmp_path):
    import harmon.toy as toy

    monkeypatch.setattr(toy, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(FileNotFoundError, match="harmon-toy"):
        toy.pretrained_folder("harmon-toy")


def test_untie_word_embeddings_keeps_every_weight_and_splits_the_embeddings(tmp_path):
    import torch

    from harmon import HarmonModel
    from harmon.toy.train import ToyTrainSettings, prepare_toy, untie_word_embeddings

    init = prepare_toy(tmp_path / "run", ToyTrainSettings(num_images=16, vae_steps=1, threads=1), log=None)["init"]
    tied = HarmonModel.from_pretrained(init)
    folder = untie_word_embeddings(init, tmp_path / "untied")
    untied = HarmonModel.from_pretrained(folder)
    llm = untied.llm
    assert llm.config.tie_word_embeddings is False
    assert llm.get_input_embeddings().weight.data_ptr() != llm.get_output_embeddings().weight.data_ptr()
    before, after = tied.state_dict(), untied.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # both embeddings start as the tied matrix
    assert (folder / "tokenizer.json").is_file()  # loadable as the next stage's model.pretrained
    with torch.no_grad():  # and they are two parameters now
        llm.get_output_embeddings().weight.add_(1.0)
    assert not torch.equal(llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="untied already"):
        untie_word_embeddings(folder, tmp_path / "again")


def test_prepare_toy_reuses_a_given_vae_and_sets_the_heads_noise_draws(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from harmon import HarmonModel
    from harmon.toy.train import ToyTrainSettings, prepare_toy

    settings = ToyTrainSettings(num_images=16, threads=1, vae_from="harmon-toy", diffusion_batch_mul=1)
    prepared = prepare_toy(tmp_path, settings, log=None)
    model = HarmonModel.from_pretrained(prepared["init"])
    shipped = AutoencoderKL.from_pretrained(str(pretrained_folder("harmon-toy") / "vae"))
    assert all(torch.equal(v.float(), model.vae.state_dict()[k]) for k, v in shipped.state_dict().items())
    assert prepared["info"]["vae"]["from"] == "harmon-toy" and "mse" not in prepared["info"]["vae"]
    assert model.head.config.diffusion_batch_mul == 1


def test_prepare_toy_names_a_vae_folder_it_cannot_use(tmp_path):
    from harmon.toy.train import ToyTrainSettings, prepare_toy

    with pytest.raises(FileNotFoundError, match="vae_from: .*vae/config.json"):
        prepare_toy(tmp_path, ToyTrainSettings(num_images=16, threads=1, vae_from=tmp_path / "nowhere"), log=None)


def test_load_toy_vae_refuses_another_architecture(tmp_path):
    from diffusers import AutoencoderKL

    from harmon import HarmonConfig, HarmonModel
    from harmon.toy.train import load_toy_vae

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=1, latent_channels=4).save_pretrained(tmp_path / "vae")
    vae = HarmonModel.from_config(HarmonConfig.from_preset("harmon-toy")).vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(ValueError, match=r"vae_from: the VAE in .*vae is not the harmon-toy preset's"):
        load_toy_vae(vae, tmp_path)
    assert all((before[k] == v).all() for k, v in vae.state_dict().items())  # nothing half-loaded


def test_the_cli_flags_reach_the_settings():
    from harmon.toy.train import ToyTrainSettings, build_parser, settings_from_args

    defaults = settings_from_args(build_parser().parse_args([]))
    assert (defaults.vae_from, defaults.untie_after_reading) == (None, False)
    assert defaults.tie_word_embeddings is None and defaults.diffusion_batch_mul is None
    assert defaults == ToyTrainSettings(num_images=defaults.num_images, threads=2)
    given = settings_from_args(build_parser().parse_args(["--vae-from", "harmon-toy", "--untie-after-reading"]))
    assert (given.vae_from, given.untie_after_reading) == ("harmon-toy", True)


def test_harmon_toy_train_runs_from_the_command_line(tmp_path):
    """`harmon toy train` through the project's CLI entry point, one step per stage: its ``--num-images`` is a
    dataset size (the generate verbs' ``--num-images`` is images per prompt, checked against ``--batch-size``,
    which this verb does not have: that check once crashed every `harmon toy train`)."""
    import json

    from accelerate.state import AcceleratorState, GradientState

    from harmon.cli import main

    try:
        code = main(["toy", "train", "--out", str(tmp_path), "--num-images", "32", "--vae-from", "harmon-toy",
                     "--stage-steps", "1", "1", "1", "1", "1", "1", "--threads", "1",
                     "-o", "training.global_batch_size=4", "-o", "training.micro_batch_size=4"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert code == 0
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["settings"]["num_images"] == 32 and info["settings"]["stage_steps"] == [1, 1, 1, 1, 1, 1]
    assert (tmp_path / "harmon-toy" / "model_index.json").is_file()

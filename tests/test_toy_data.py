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

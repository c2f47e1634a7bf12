"""Training building blocks without a model run: recipes, collator, task mixing, data formats, checkpoint
manifests. Fast (no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from harmon.configs import PromptTemplate
from harmon.testing import tiny_tokenizer
from harmon.training.checkpointing import CheckpointError, CheckpointManager, verify_checkpoint
from harmon.training.collator import IGNORE_INDEX, HarmonCollator
from harmon.training.config import TASKS, LlavaSource, DataConfig, load_config
from harmon.training.data import LlavaRecords, MultiTaskDataset, understanding_pixels
from harmon.training.sampler import MultiTaskBatchSampler, TaskSchedule
from harmon.training.synthetic import write_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
IMAGE_TOKENS = 4 * 4 + 8  # tiny preset at 64 px: a 4×4 grid + 8 buffer slots
TEMPLATE = PromptTemplate()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def collator(tokenizer):
    return HarmonCollator(
        tokenizer, image_token_id=3, image_tokens=IMAGE_TOKENS, prompt_template=TEMPLATE,
        generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.",
        max_length=200, max_prompt_length=64, cfg_drop_prob=0.1, seed=0,
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------------- recipes
PAPER = {  # stage: (frozen, learning rates, image size, global batch, ratios text:i2t:t2i)
    1: (["llm"], {"decoder": 1e-4, "encoder": 1e-5, "head": 1e-4, "proj_in": 1e-4, "proj_out": 1e-4},
        256, 4096, (0, 1, 2)),
    2: ([], {"decoder": 1e-4, "encoder": 1e-5, "llm": 1e-5, "head": 1e-4, "proj_in": 1e-4, "proj_out": 1e-4},
        256, 4096, (1, 3, 8)),
    3: ([], {"decoder": 2e-5, "encoder": 2e-6, "llm": 2e-6, "head": 2e-5, "proj_in": 2e-5, "proj_out": 2e-5},
        512, 1024, (1, 3, 16)),
}


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_recipes_carry_the_paper_settings(stage, size):
    config = load_config(CONFIGS / f"stage{stage}_harmon-{size}.yaml", check_files=False)
    frozen, rates, image_size, batch, ratios = PAPER[stage]
    # a decoupled understanding encoder (absent from these presets) would follow the encoder / the connectors
    rates = {**rates, "understanding_encoder": rates["encoder"], "understanding_proj_in": rates["decoder"]}
    assert config.stage == stage
    assert config.frozen_modules == frozen
    assert {name: config.module_lr(name) for name in config.trainable_modules} == rates
    assert "vae" not in config.trainable_modules
    assert config.data.image_size == image_size
    assert config.training.global_batch_size == batch
    assert config.training.max_steps == 50_000
    assert tuple(config.data.ratios.as_dict()[t] for t in TASKS) == (*ratios, 0)  # no reconstruction
    assert config.training.gradient_checkpointing and config.training.mixed_precision == "auto"
    assert (config.model.preset == f"harmon-{size}") == (stage == 1)


def test_accelerate_launch_configs_cover_ddp_fsdp_and_zero2():
    folder = REPO / "experiments" / "accelerate"
    kinds = {yaml.safe_load(p.read_text())["distributed_type"]: p.name for p in folder.glob("*.yaml")}
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED"} <= set(kinds)
    fsdp = yaml.safe_load((folder / kinds["FSDP"]).read_text())["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is True  # frozen and trainable parameters share FSDP units
    zero = yaml.safe_load((folder / kinds["DEEPSPEED"]).read_text())["deepspeed_config"]
    assert zero["zero_stage"] == 2


def test_overrides_replace_dotted_fields():
    config = load_config(
        CONFIGS / "smoke.yaml", check_files=False,
        overrides=["training.max_steps=7", "data.root=/somewhere", "learning_rates.encoder=2e-3"],
    )
    assert config.training.max_steps == 7
    assert str(config.data.root) == "/somewhere"
    assert config.learning_rates["encoder"] == 2e-3


# ------------------------------------------------------------------------------------------------ collator
def test_text_to_image_prompt_is_the_instruction_around_prefix_and_caption(collator, tokenizer):
    kept = [draw for draw in range(20) if not collator.caption_dropped(draw)]
    pixels = torch.zeros(3, 64, 64)
    batch = collator([
        {"task": "text_to_image", "draw": kept[0], "caption": "a red circle on the left", "pixels": pixels},
        {"task": "text_to_image", "draw": kept[1], "caption": "a blue square", "pixels": pixels},
    ])
    expected = encode(tokenizer, TEMPLATE.instruction.format(input="Generate an image: a red circle on the left"))
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert batch["attention_mask"][0].sum() == len(expected)
    assert tokenizer.decode(expected).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # right padding of the shorter row
    short = int(batch["attention_mask"][1].sum())
    assert batch["attention_mask"][1, short:].sum() == 0
    assert bool((batch["input_ids"][1, short:] == tokenizer.pad_token_id).all())
    assert batch["pixels"].shape == (2, 3, 64, 64) and "labels" not in batch


def test_dropped_captions_give_the_unconditional_prompt_about_one_in_ten_seeded(collator, tokenizer):
    drops = [collator.caption_dropped(draw) for draw in range(4000)]
    assert 0.08 < sum(drops) / len(drops) < 0.12
    assert drops == [collator.caption_dropped(draw) for draw in range(4000)]  # seeded: same draws, same drops
    other = HarmonCollator(
        tokenizer, image_token_id=3, image_tokens=IMAGE_TOKENS, prompt_template=TEMPLATE,
        generation_prefix="Generate an image: ", unconditional_prompt="Generate an image.", seed=1,
    )
    assert drops != [other.caption_dropped(draw) for draw in range(4000)]
    draw = drops.index(True)
    sample = {"task": "text_to_image", "draw": draw, "caption": "a red circle", "pixels": torch.zeros(3, 8, 8)}
    batch = collator([sample])
    assert batch["captions"] == [""]
    uncond = encode(tokenizer, TEMPLATE.instruction.format(input="Generate an image."))
    assert batch["input_ids"][0].tolist() == uncond


def test_long_captions_are_cut_but_the_template_is_kept(collator, tokenizer):
    ids = collator.generation_prompt("a red circle " * 50)
    assert len(ids) <= 64
    assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_understanding_rows_expand_the_image_and_label_only_the_answers(collator, tokenizer):
    turns = [("What color is the shape?", "red"), ("Where is it?", "on the left")]
    batch = collator([
        {"task": "image_to_text", "draw": 0, "turns": turns, "pixels": torch.zeros(3, 64, 64)},
        {"task": "image_to_text", "draw": 1, "turns": turns[:1], "pixels": torch.zeros(3, 64, 64)},
    ])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    image_positions = (ids == 3).nonzero().flatten()
    assert len(image_positions) == IMAGE_TOKENS
    assert image_positions.tolist() == list(range(image_positions[0], image_positions[0] + IMAGE_TOKENS))
    prompt = tokenizer.decode(ids[: image_positions[0]].tolist())
    assert prompt == "<|im_start|>user\n"
    after = tokenizer.decode(ids[image_positions[-1] + 1:].tolist())
    assert after.startswith("\nWhat color is the shape?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>")
    # labels: exactly the answers, each ending with <|im_end|>
    answer_spans = []
    current: list[int] = []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            answer_spans.append(current)
            current = []
    if current:
        answer_spans.append(current)
    assert [tokenizer.decode(span) for span in answer_spans] == ["red<|im_end|>", "on the left<|im_end|>"]
    # the shorter second row is right-padded with -100 labels
    length = int(batch["attention_mask"][1].sum())
    assert batch["labels"][1, length:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1, length:].eq(0).all()
    assert mask.sum() == ids.shape[0]


def test_plain_text_labels_every_real_token(collator, tokenizer):
    batch = collator([{"task": "text", "draw": 0, "text": "There is a red circle."},
                      {"task": "text", "draw": 1, "text": "Hi."}])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert batch["labels"][~real].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, int(real[0].sum()) - 1] == collator.end_of_text_id


def test_a_micro_batch_holds_one_task(collator):
    with pytest.raises(ValueError, match="one task"):
        collator([{"task": "text", "draw": 0, "text": "a"},
                  {"task": "text_to_image", "draw": 0, "caption": "b", "pixels": torch.zeros(3, 8, 8)}])


# ---------------------------------------------------------------------------------------------- task mixing
@pytest.mark.parametrize("ratios", [(0, 1, 2), (1, 3, 8), (1, 3, 16)])
def test_schedule_follows_the_ratios_exactly_per_cycle_and_is_seeded(ratios):
    schedule = TaskSchedule(dict(zip(TASKS, ratios)), seed=3)
    cycle = sum(ratios)
    tasks = [schedule.task_at(k) for k in range(10 * cycle)]
    assert Counter(tasks) == Counter({t: 10 * r for t, r in zip(TASKS, ratios) if r})
    assert tasks == [TaskSchedule(dict(zip(TASKS, ratios)), seed=3).task_at(k) for k in range(10 * cycle)]
    assert tasks != [TaskSchedule(dict(zip(TASKS, ratios)), seed=4).task_at(k) for k in range(10 * cycle)]
    for k in (0, 5, cycle + 1, 7 * cycle + 3):
        for task in TASKS:
            assert schedule.count_before(task, k) == tasks[:k].count(task)


def test_sampler_resumes_at_any_micro_step_and_shards_ranks():
    schedule = TaskSchedule({"text": 1, "image_to_text": 3, "text_to_image": 8}, seed=0)
    sizes = {"text": 7, "image_to_text": 11, "text_to_image": 13}
    full = list(MultiTaskBatchSampler(schedule, sizes, 2, seed=0, stop=60))
    resumed = list(MultiTaskBatchSampler(schedule, sizes, 2, seed=0, start=23, stop=60))
    assert resumed == full[23:]
    ranks = [list(MultiTaskBatchSampler(schedule, sizes, 2, seed=0, rank=r, world=2, stop=60)) for r in range(2)]
    for a, b in zip(*ranks):
        assert a[0][0] == b[0][0]  # both ranks run the same task at each micro-step
        assert {draw for _, _, draw in a}.isdisjoint({draw for _, _, draw in b})
    # within one epoch of a task stream each sample is drawn once
    draws = sorted((d, i) for batch in ranks[0] + ranks[1] for t, i, d in batch if t == "text_to_image")
    first_epoch = [i for d, i in draws if d < sizes["text_to_image"]]
    assert sorted(first_epoch) == list(range(sizes["text_to_image"]))


# --------------------------------------------------------------------------------------------------- data
def test_release_layout_llava_and_text_sources_load(tmp_path):
    write_shapes_dataset(tmp_path, count=6)
    data = DataConfig.model_validate({
        "root": str(tmp_path), "image_size": 64, "ratios": {"text": 1, "image_to_text": 1, "text_to_image": 1},
        "text": [{"format": "text", "path": "text.jsonl"}],
        "image_to_text": [{"format": "llava", "path": "llava.json"},
                          {"format": "caption", "data_info": "data_info.json", "question": "Describe it."}],
        "text_to_image": [{"format": "caption", "data_info": "data_info.json"}],
    })
    dataset = MultiTaskDataset(data)
    assert {t: dataset.task_size(t) for t in TASKS} == {"text": 6, "image_to_text": 12, "text_to_image": 6,
                                                               "reconstruction": 0}
    sample = dataset[("text_to_image", 0, 0)]
    caption = json.loads((tmp_path / "annotations" / "00000.json").read_text())["caption"]
    assert sample["caption"] == caption and sample["pixels"].shape == (3, 64, 64)
    assert -1.0 <= float(sample["pixels"].min()) and float(sample["pixels"].max()) <= 1.0
    llava_turns = dataset[("image_to_text", 0, 0)]["turns"]
    assert len(llava_turns) == 2 and llava_turns[1] == ("Describe the picture.", caption)
    assert llava_turns[0][1].split()[-1] in caption  # "red" / "a circle" / "on the left"
    assert dataset[("image_to_text", 6, 0)]["turns"] == [("Describe it.", caption)]
    assert dataset[("text", 0, 0)]["text"] == f"There is {caption}."


def test_llava_entries_without_image_are_skipped_and_placeholders_stripped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    entries = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "Question?\n<image>"},
                                             {"from": "gpt", "value": "Answer."}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]},
    ]
    (tmp_path / "l.json").write_text(json.dumps(entries))
    records = LlavaRecords(LlavaSource(path=tmp_path / "l.json"), DataConfig.model_validate(
        {"ratios": {"image_to_text": 1}, "image_to_text": [{"format": "llava", "path": str(tmp_path / "l.json")}]}))
    assert len(records) == 1 and records.skipped == 1
    assert records.entries[0]["turns"] == [("Question?", "Answer.")]


def test_understanding_images_are_padded_to_square_with_gray():
    from PIL import Image

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    pixels = understanding_pixels(image, 32)
    assert pixels.shape == (3, 32, 32)
    gray = 127 / 255 * 2 - 1
    assert torch.allclose(pixels[:, 0, 16], torch.full((3,), gray), atol=0.02)  # the top band is gray
    assert torch.allclose(pixels[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)


# ------------------------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(manager: CheckpointManager, step: int) -> Path:
    tmp = manager.prepare(step)
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    return manager.commit(tmp, step)


def test_manifest_detects_partial_and_corrupt_checkpoints_and_pruning_keeps_the_last(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    paths = [_fake_checkpoint(manager, step) for step in (1, 2, 3)]
    assert manager.list() == paths[1:]
    assert verify_checkpoint(paths[-1])["step"] == 3
    # a save that never finished is invisible and, if pointed at, refused
    partial = manager.prepare(4)
    (partial / "model.safetensors").write_bytes(b"half")
    assert manager.latest() == paths[-1]
    with pytest.raises(CheckpointError, match="partial"):
        verify_checkpoint(partial)
    # one flipped byte, a truncated file, an extra file
    data = bytearray((paths[-1] / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (paths[-1] / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors fails its SHA-256"):
        verify_checkpoint(paths[-1])
    (paths[-2] / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="model.safetensors has 5 bytes"):
        verify_checkpoint(paths[-2])
    fresh = _fake_checkpoint(manager, 5)
    (fresh / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="stray.bin is not in the manifest"):
        verify_checkpoint(fresh)


# ------------------------------------------------------------------------------------------- image token
def test_a_missing_image_token_is_added_to_the_tokenizer_as_one_special_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from harmon.testing import tiny_model
    from harmon.training.modules import image_token_id

    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_end|>", *(chr(c) for c in range(32, 127))])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert len(tokenizer("<image>", add_special_tokens=False).input_ids) > 1
    model = tiny_model()
    token_id = image_token_id(tokenizer, model)
    assert tokenizer("a<image>b", add_special_tokens=False).input_ids[1] == token_id == len(vocab)
    assert image_token_id(tiny_tokenizer(), model) == 3  # already one token: kept
    tokenizer.add_tokens([f"<filler{i}>" for i in range(300)])  # new ids now lie past the tiny LLM's 256 rows
    with pytest.raises(ValueError, match="model.image_token"):
        image_token_id(tokenizer, model, token="<late_image>")

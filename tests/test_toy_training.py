"""harmon-toy end to end: a shortened run of the real recipe (`harmon.toy.train.train_toy` with fewer images and
steps, SHORT below) understands held-out canvases better than answering by the majority."""

from __future__ import annotations

import time

import pytest

from harmon.toy.eval import understanding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = dict(num_images=600, vae_from="harmon-toy", stage_steps=(10, 500, 10, 10, 10, 10))
# The shipped toy VAE (Harmon's own setting: a trained, frozen tokenizer) and the preset's visual_grad_scale 1.0.
# Measured on the 2-core machine of 2026-12-02, one thread, the CPU shared, understanding on 16 canvases against
# the majority + 0.05 = 0.426: with a 100-step VAE of its own the run answered 0.316 at visual_grad_scale 0.1 (the
# committed settings then, which had passed elsewhere: the run is machine-dependent near that bar), 0.393 with
# 700 stage-II steps and 0.291 on the single-question data; with the shipped VAE, 0.513 at 0.1 and 0.632 at 1.0
# (training 177 s). A 100-step VAE loses the colours (docs/toy.md), so the colour answers could not be learned.
# stage II: understanding only, from the multi-turn conversations (every question of an image answered in one
# sample), so that 500 steps learn to answer. Generation is not asserted: no 3-minute run
# beat chance on the toy GenEval, also scored at one MAR step (fourteen variants measured on 2026-12-04: docs/toy.md,
# "The shortened run"). Scored at 16 MAR steps before that: a 3-minute run that also
# trains generation (stage II half text→image, 100 head steps) drew one digit for a one-digit prompt no more often
# than its untrained init (toy GenEval counting 0.50) and no longer beat the majority on understanding either;
# nor did one whose stage III is 300 text→image steps with the LLM, encoder and proj_in frozen (understanding kept,
# 0.52 against 0.38; layout 0.45 and counting 0.45 on 20 prompts, below the 0.5 of always drawing two; 277 s).
# Tried since, all on the shipped VAE (vae_from), 2000 canvases, one thread, toy GenEval on 20 prompts: stage II as
# 300 text→image steps (layout 0.50); 700 steps with diffusion_batch_mul 1 and lr 2e-3 (layout 0.55, single 0.40,
# 0.25 on 40 prompts); the same at batch 8 for 1400 steps (layout 0.55); 300 understanding steps, then 700
# text→image and 300 head steps (layout 0.50, and the text→image stage erased the answers: understanding 0.0);
# 1200 steps mixing them 2 : 1 and 200 head steps (understanding 0.51 against 0.38, layout 0.50; 0.45 at CFG 8,
# 0.50 at CFG 1). The samples are blobs or blow-ups: the generation path needs thousands of steps (docs/toy.md).
# With the condition probes (stage III as 400 text→image steps at 1e-3 after this stage II, shipped VAE, 274 s):
# layout 0.50, slot colour 0.05, single object 0.3 on 10 one-digit prompts: not clearly above chance either.
SHORT_OVERRIDES = ["training.global_batch_size=16", "training.micro_batch_size=16"]
STAGE_OVERRIDES = {"stage2": ["data.ratios.text=0", "data.ratios.text_to_image=0", "condition_probes=null",
                              'data.image_to_text=[{"format": "llava", "path": "llava.json"}]'],
                   # the probes off in the 10-step stages too: this run asserts understanding only (measured so)
                   "stage3": ["condition_probes=null"], "drawing": ["condition_probes=null"],
                   "colour": ["condition_probes=null"]}


def majority_baseline(result) -> float:
    """Exact match of the best constant answer per question kind (what a model ignoring the image scores)."""
    from collections import Counter

    by_kind: dict[str, Counter] = {}
    for q in result.per_question:
        by_kind.setdefault(q["kind"], Counter())[q["expected"]] += 1
    hits = sum(counter.most_common(1)[0][1] for counter in by_kind.values())
    return hits / len(result.per_question)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from harmon.pipelines import HarmonPipeline
    from harmon.toy.train import ToyTrainSettings, train_toy

    out = tmp_path_factory.mktemp("toy-short")
    started = time.perf_counter()
    info = train_toy(out, ToyTrainSettings(threads=1, overrides=SHORT_OVERRIDES, stage_overrides=STAGE_OVERRIDES,
                                               **SHORT), log=None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    seconds = time.perf_counter() - started
    return HarmonPipeline.from_pretrained(out / "harmon-toy", dtype=torch.float32), info, seconds, out


def test_a_short_run_learns_to_understand(short_run):
    pipe, *_ = short_run
    result = understanding(pipe, 16, seed=0)
    assert result.scores["overall"] > majority_baseline(result) + 0.05, result.scores


def test_the_run_writes_its_timings(short_run):
    _, info, seconds, _ = short_run
    assert list(info["stages"]) == ["reading", "stage2", "stage3", "answers", "drawing", "colour"]
    assert info["shipped_bytes"] < 5_000_000
    assert 0 < info["total_seconds"] <= seconds


def test_untie_after_reading_unties_from_stage_two_on(tmp_path):
    """The wiring of ``untie_after_reading`` (one step per stage, the shipped VAE reused): the reading export is
    tied, stage II starts from its untied copy, and the shipped folder stays untied."""
    import json

    from harmon.model import HarmonModel

    info = one_step_per_stage(tmp_path, untie_after_reading=True)
    reading = HarmonModel.from_pretrained(tmp_path / "reading" / "export" / "harmon_model")
    assert reading.llm.config.tie_word_embeddings is not False
    assert HarmonModel.from_pretrained(tmp_path / "reading-untied").llm.config.tie_word_embeddings is False
    assert list(json.loads((tmp_path / "train_info.json").read_text())["stages"]) == ["reading", "stage2", "stage3",
                                                                                       "answers", "drawing", "colour"]
    llm_config = json.loads((tmp_path / "harmon-toy" / "llm" / "config.json").read_text())
    assert llm_config["tie_word_embeddings"] is False and info["vae"]["from"] == "harmon-toy"


def one_step_per_stage(tmp_path, overrides=(), stage_steps=(1, 1, 1, 1, 1, 1), **settings):
    from accelerate.state import AcceleratorState, GradientState

    from harmon.toy.train import ToyTrainSettings, train_toy

    settings = ToyTrainSettings(num_images=32, threads=1, vae_from="harmon-toy", stage_steps=stage_steps,
                                overrides=["training.global_batch_size=4", "training.micro_batch_size=4", *overrides],
                                **settings)
    try:
        return train_toy(tmp_path, settings, log=None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_the_drawing_stage_keeps_the_understanding_path_and_the_colour_stage_its_encoder(tmp_path):
    """``drawing`` re-fits the generation side only: the LLM, the MAR encoder and proj_in leave it bit for bit as
    the answers stage left them (so every understanding answer is kept), while the decoder, proj_out and the head
    train. ``colour`` trains the LLM too (image→text rehearsed) and still leaves the MAR encoder and proj_in."""
    import torch

    from harmon.model import HarmonModel

    # three steps per stage (the warm-up's first step has learning rate 0); with weight decay, a module the
    # optimizer held would move even without a gradient
    one_step_per_stage(tmp_path, overrides=["optimizer.weight_decay=0.02"], stage_steps=(1, 1, 1, 1, 3, 3))
    states = {stage: HarmonModel.from_pretrained(tmp_path / stage / "export" / "harmon_model").state_dict()
              for stage in ("answers", "drawing", "colour")}
    for before, after, expected in (("answers", "drawing", {"decoder", "proj_out", "head"}),
                                    ("drawing", "colour", {"llm", "decoder", "proj_out", "head"})):
        assert states[before].keys() == states[after].keys()
        changed = {k.split(".")[0] for k in states[before] if not torch.equal(states[before][k], states[after][k])}
        assert changed == expected, (after, changed)


def test_stage_steps_need_one_value_per_stage(tmp_path):
    from harmon.toy.train import ToyTrainSettings, train_toy

    with pytest.raises(ValueError, match=r"stage_steps: 4 values given, one per stage is needed \(reading, stage2, "
                                         r"stage3, answers, drawing, colour\)"):
        train_toy(tmp_path, ToyTrainSettings(stage_steps=(1, 1, 1, 1)), log=None)
    assert not any(tmp_path.iterdir())  # refused before anything was written

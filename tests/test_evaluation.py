"""Benchmark adapters (harmon.evaluation): each writer's layout checked file by file, its seeds, resume and the
split across processes; FID against a hand computation on a tiny stand-in feature network; the lmms-eval model
adapter on the tiny model against a two-item task defined here; the ``harmon bench`` CLI end to end."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import linalg
from torch import nn

from harmon.evaluation.common import image_grid, pipeline_sampler
from harmon.evaluation.dpg import read_dpg_prompts, write_dpg
from harmon.evaluation.fid import folder_fid
from harmon.evaluation.geneval import read_geneval_metadata, write_geneval
from harmon.evaluation.mjhq import write_mjhq
from harmon.evaluation.wise import read_wise_prompts, write_wise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 8


def seed_image(prompt: str, seed: int, size: int = SIZE) -> PIL.Image.Image:
    """What the fake sampler draws: noise from (prompt, seed) alone."""
    rng = np.random.default_rng([seed, sum(map(ord, prompt))])
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class FakeSampler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def __call__(self, prompt, seeds):
        self.calls.append((prompt, list(seeds)))
        return [seed_image(prompt, s) for s in seeds]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------------- GenEval
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
     "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


@pytest.fixture
def geneval_metadata(tmp_path) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in GENEVAL_LINES[:2]) + "\n\n" + json.dumps(GENEVAL_LINES[2]) + "\n")
    return path


def test_geneval_writes_its_layout_file_by_file(geneval_metadata, tmp_path):
    out = tmp_path / "geneval"
    sampler = FakeSampler()
    report = write_geneval(geneval_metadata, out, sampler, grid=True, seed=10, process_index=0, num_processes=1)
    assert report.written == [0, 1, 2] and report.skipped == [] and report.total == 3
    expected = {f"{i:05d}/{name}" for i in range(3)
                for name in ("metadata.jsonl", "grid.png", *(f"samples/{k:04d}.png" for k in range(4)))}
    assert files_under(out) == expected
    for index, line in enumerate(GENEVAL_LINES):
        folder = out / f"{index:05d}"
        assert [json.loads(t) for t in (folder / "metadata.jsonl").read_text().splitlines()] == [line]
        for k in range(4):  # sample k of prompt N: seed + 4N + k
            assert np.array_equal(pixels(folder / "samples" / f"{k:04d}.png"),
                                  np.asarray(seed_image(line["prompt"], 10 + 4 * index + k)))
        grid = pixels(folder / "grid.png")
        assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
        assert np.array_equal(grid[SIZE:, :SIZE], pixels(folder / "samples" / "0002.png"))  # row-major 2×2
    assert sampler.calls[1] == ("a photo of two cats", [14, 15, 16, 17])


def test_geneval_default_is_four_samples_without_grid(geneval_metadata, tmp_path):
    out = tmp_path / "geneval"
    write_geneval(geneval_metadata, out, FakeSampler(), process_index=0, num_processes=1)
    assert files_under(out / "00001") == {"metadata.jsonl", *(f"samples/{k:04d}.png" for k in range(4))}


def test_geneval_resumes_skipping_finished_prompts(geneval_metadata, tmp_path):
    full, partial = tmp_path / "full", tmp_path / "partial"
    write_geneval(geneval_metadata, full, FakeSampler(), process_index=0, num_processes=1)
    write_geneval(geneval_metadata, partial, FakeSampler(), process_index=0, num_processes=1)
    (partial / "00001" / "samples" / "0003.png").unlink()  # an interrupted prompt
    for path in sorted((partial / "00002").rglob("*"), reverse=True):  # a prompt never started
        path.unlink() if path.is_file() else path.rmdir()
    (partial / "00002").rmdir()
    sampler = FakeSampler()
    report = write_geneval(geneval_metadata, partial, sampler, process_index=0, num_processes=1)
    assert report.skipped == [0] and report.written == [1, 2]
    assert [prompt for prompt, _ in sampler.calls] == ["a photo of two cats", "a photo of a red car"]
    assert files_under(partial) == files_under(full)
    for name in files_under(full):
        assert (full / name).read_bytes() == (partial / name).read_bytes(), name
    again = FakeSampler()
    assert write_geneval(geneval_metadata, partial, again, process_index=0, num_processes=1).written == []
    assert again.calls == []


def test_geneval_splits_prompts_across_processes(geneval_metadata, tmp_path):
    single, split = tmp_path / "single", tmp_path / "split"
    write_geneval(geneval_metadata, single, FakeSampler(), process_index=0, num_processes=1)
    shares = [write_geneval(geneval_metadata, split, FakeSampler(), process_index=r, num_processes=2).written
              for r in range(2)]
    assert shares == [[0, 2], [1]]
    assert files_under(split) == files_under(single)
    for name in files_under(single):
        assert (single / name).read_bytes() == (split / name).read_bytes()


def test_geneval_bad_inputs_name_the_file_line_or_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_geneval_metadata(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not valid JSON"):
        read_geneval_metadata(bad)
    bad.write_text(json.dumps({"tag": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 1: .*'prompt'"):
        read_geneval_metadata(bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        write_geneval(good, tmp_path / "out", FakeSampler(), n_samples=0, process_index=0, num_processes=1)
    with pytest.raises(ValueError, match="returned 1 images for 4 seeds"):
        write_geneval(good, tmp_path / "out", lambda p, s: [seed_image(p, 0)], process_index=0, num_processes=1)
    assert not (tmp_path / "out" / "00000" / "metadata.jsonl").exists()  # nothing marked finished
    with pytest.raises(ValueError, match="process_index 2 is not in a world of 2"):
        write_geneval(good, tmp_path / "out", FakeSampler(), process_index=2, num_processes=2)


# -------------------------------------------------------------------------------------------------- DPG-Bench
DPG = {"1": "a cat on a mat", "256": "two dogs under a tree", "17": "a red car"}


def test_dpg_writes_one_grid_per_item_id_as_its_scorer_crops_it(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for item_id, prompt in DPG.items():
        (prompts / f"{item_id}.txt").write_text(prompt + "\n")
    out = tmp_path / "dpg"
    report = write_dpg(prompts, out, FakeSampler(), seed=3, process_index=0, num_processes=1)
    ids = sorted(DPG)
    assert report.written == ids
    assert files_under(out) == {f"{item_id}.png" for item_id in DPG}
    for position, item_id in enumerate(ids):
        grid = PIL.Image.open(out / f"{item_id}.png")
        assert grid.size == (2 * SIZE, 2 * SIZE)
        # compute_dpg_bench.py's crops, in its order: top-left, top-right, bottom-left, bottom-right
        r = SIZE
        crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
        for k, box in enumerate(crops):
            assert np.array_equal(np.asarray(grid.crop(box).convert("RGB")),
                                  np.asarray(seed_image(DPG[item_id], 3 + 4 * position + k)))
    (out / "256.png").unlink()
    sampler = FakeSampler()
    again = write_dpg(prompts, out, sampler, seed=3, process_index=0, num_processes=1)
    assert again.written == ["256"] and sorted(again.skipped) == ["1", "17"]
    assert sampler.calls == [(DPG["256"], [3 + 4 * ids.index("256") + k for k in range(4)])]


def test_dpg_reads_the_prompt_folder_csv_and_json_alike(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    for item_id, prompt in DPG.items():
        (folder / f"{item_id}.txt").write_text(prompt)
    table = tmp_path / "dpg_bench.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "text", "proposition_id"])
        for item_id, prompt in DPG.items():
            for proposition in (1, 2):
                writer.writerow([item_id, prompt, proposition])
    mapping = tmp_path / "prompts.json"
    mapping.write_text(json.dumps(DPG))
    assert read_dpg_prompts(folder) == read_dpg_prompts(table) == read_dpg_prompts(mapping) == dict(sorted(DPG.items()))
    (folder / "a.b.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'a.b' is not a usable DPG-Bench item id"):
        read_dpg_prompts(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dpg_prompts(tmp_path / "nowhere")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt\n1,x\n")
    with pytest.raises(ValueError, match=r"bad.csv: the DPG-Bench CSV has no \['item_id', 'text'\]"):
        read_dpg_prompts(bad)


# ------------------------------------------------------------------------------------------------------- WISE
def test_wise_writes_one_image_per_prompt_id_and_resumes(tmp_path):
    first, second = tmp_path / "cultural_common_sense.json", tmp_path / "natural_science.json"
    first.write_text(json.dumps([{"prompt_id": 1, "Prompt": "the flag of Japan", "Explanation": "e",
                                  "Subcategory": "Festival"},
                                 {"prompt_id": 2, "Prompt": "a sushi plate", "Explanation": "e", "Subcategory": "x"}]))
    second.write_text(json.dumps([{"prompt_id": 701, "Prompt": "ice melting", "Explanation": "e",
                                   "Subcategory": "Physics"}]))
    out = tmp_path / "wise"
    report = write_wise([first, second], out, FakeSampler(), seed=5, process_index=0, num_processes=1)
    assert report.written == [1, 2, 701]
    assert files_under(out) == {"1.png", "2.png", "701.png"}
    assert np.array_equal(pixels(out / "701.png"), np.asarray(seed_image("ice melting", 5 + 701)))
    sampler = FakeSampler()
    assert write_wise([first, second], out, sampler, process_index=0, num_processes=1).skipped == [1, 2, 701]
    assert sampler.calls == []
    second.write_text(json.dumps([{"prompt_id": 2, "Prompt": "again"}]))
    with pytest.raises(ValueError, match="natural_science.json, item 0: prompt_id 2 is given twice"):
        read_wise_prompts([first, second])
    second.write_text(json.dumps([{"id": 3, "Prompt": "x"}]))
    with pytest.raises(ValueError, match="natural_science.json, item 0: a WISE prompt needs 'prompt_id'"):
        read_wise_prompts(second)


# ------------------------------------------------------------------------------------------------- MJHQ-30K
def test_mjhq_writes_the_per_category_layout(tmp_path):
    meta = tmp_path / "meta_data.json"
    meta.write_text(json.dumps({"b2": {"category": "people", "prompt": "a man"},
                                "a1": {"category": "animals", "prompt": "a fox"},
                                "c3": {"category": "people", "prompt": "a woman"}}))
    out = tmp_path / "mjhq"
    report = write_mjhq(meta, out, FakeSampler(), process_index=0, num_processes=1)
    assert report.written == ["a1", "b2", "c3"]
    assert files_under(out) == {"animals/a1.png", "people/b2.png", "people/c3.png"}
    assert np.array_equal(pixels(out / "people" / "c3.png"), np.asarray(seed_image("a woman", 2)))
    only = tmp_path / "only"
    assert write_mjhq(meta, only, FakeSampler(), categories=["animals"], process_index=0, num_processes=1).written == ["a1"]
    with pytest.raises(ValueError, match=r"categories: \['plants'\] not in"):
        write_mjhq(meta, only, FakeSampler(), categories=["plants"], process_index=0, num_processes=1)


# -------------------------------------------------------------------------------------------------------- FID
class PooledColours(nn.Module):
    """Stand-in for Inception: uint8 (N, 3, S, S) → the mean colour of each 2×2 block of the image (12 features)."""

    num_features = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def write_images(folder: Path, seed: int, count: int, shift: float = 0.0) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        array = np.clip(rng.normal(128 + shift, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(array).save(folder / f"{i:03d}.png")
        arrays.append(array)
    return arrays


def reference_fid(real: list[np.ndarray], fake: list[np.ndarray]) -> float:
    """Fréchet distance of the stand-in features, by hand (numpy / scipy)."""
    def stats(arrays):
        x = np.stack([a.astype(np.float64) / 255 for a in arrays])  # (N, H, W, 3); 16 px → 2×2 blocks of 8
        f = x.reshape(len(arrays), 2, 8, 2, 8, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(len(arrays), -1)
        return f.mean(0), np.cov(f, rowvar=False)

    (mu1, s1), (mu2, s2) = stats(real), stats(fake)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_between_folders_equals_the_hand_computation(tmp_path):
    real = write_images(tmp_path / "reference", 0, 40)
    fake = write_images(tmp_path / "generated", 1, 30, shift=20)
    result = folder_fid(tmp_path / "generated", tmp_path / "reference", feature=PooledColours(), image_size=16,
                        batch_size=7)
    expected = reference_fid(real, fake)
    assert result["num_generated"] == 30 and result["num_reference"] == 40
    assert abs(result["fid"] - expected) <= 1e-4 * max(1.0, expected)  # float64 sums in torchmetrics; sqrtm differs
    same = folder_fid(tmp_path / "reference", tmp_path / "reference", feature=PooledColours(), image_size=16)
    assert abs(same["fid"]) < 1e-4 < expected


def test_fid_per_category_and_overall(tmp_path):
    real, fake = {}, {}
    for i, name in enumerate(("animals", "people")):
        real[name] = write_images(tmp_path / "reference" / name, 10 + i, 20)
        fake[name] = write_images(tmp_path / "generated" / name, 20 + i, 20, shift=10 * (i + 1))
    result = folder_fid(tmp_path / "generated", tmp_path / "reference", per_category=True, feature=PooledColours(),
                        image_size=16)
    for name in real:
        expected = reference_fid(real[name], fake[name])
        assert abs(result["per_category"][name] - expected) <= 1e-4 * max(1.0, expected), name
    overall = reference_fid(real["animals"] + real["people"], fake["animals"] + fake["people"])
    assert abs(result["fid"] - overall) <= 1e-4 * max(1.0, overall)
    assert result["num_generated"] == result["num_reference"] == 40
    (tmp_path / "reference" / "plants").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no sub-folder for categor\(ies\) \['plants'\]"):
        folder_fid(tmp_path / "generated", tmp_path / "reference", per_category=True, feature=PooledColours())


def test_fid_refuses_what_it_cannot_compute(tmp_path):
    write_images(tmp_path / "one", 0, 1)
    write_images(tmp_path / "many", 1, 4)
    with pytest.raises(ValueError, match="generated folder .*one: FID needs at least 2 images, found 1"):
        folder_fid(tmp_path / "one", tmp_path / "many", feature=PooledColours(), image_size=16)
    with pytest.raises(FileNotFoundError, match="reference folder not found"):
        folder_fid(tmp_path / "many", tmp_path / "nope", feature=PooledColours(), image_size=16)
    with pytest.raises(ValueError, match="weights_path: .*nothing is downloaded"):
        folder_fid(tmp_path / "many", tmp_path / "many")
    with pytest.raises(FileNotFoundError, match="weights_path: Inception weights not found"):
        folder_fid(tmp_path / "many", tmp_path / "many", weights_path=tmp_path / "missing.pth")


def test_fid_refuses_a_truncated_image_by_name_even_when_pil_accepts_them(tmp_path, monkeypatch):
    import PIL.ImageFile

    write_images(tmp_path / "generated", 0, 4)
    write_images(tmp_path / "reference", 1, 4)
    victim = tmp_path / "generated" / "002.png"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as lmms-eval sets it at import
    with pytest.raises(ValueError, match=r"002\.png is not a readable image"):
        folder_fid(tmp_path / "generated", tmp_path / "reference", feature=PooledColours(), image_size=16)


# -------------------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def pipe():
    from harmon.pipelines import HarmonPipeline
    from harmon.testing import tiny_model, tiny_tokenizer

    pipe = HarmonPipeline.from_model(tiny_model(seed=2), tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_sampler_is_seeded_per_image(pipe, tmp_path):
    sampler = pipeline_sampler(pipe, num_inference_steps=2)
    a = sampler("a red circle", [4, 5])
    b = sampler("a red circle", [5])
    assert len(a) == 2 and a[0].size == (64, 64)
    again = sampler("a red circle", [4, 5])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, again))  # reproducible
    # an image depends on its own seed only, up to the batch's float round-off (measured: 1 level in 0.01% of
    # the pixels); the writers always sample a prompt's seeds as one batch, so their files are exact
    difference = np.abs(np.asarray(a[1], dtype=int) - np.asarray(b[0], dtype=int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(a[1], dtype=int)).mean() > 5
    with pytest.raises(ValueError, match="generator, num_images_per_prompt and output_type are set per call"):
        pipeline_sampler(pipe, generator=torch.Generator())


def test_image_grid_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="image_grid: the images differ in size"):
        image_grid([seed_image("a", 0, 8), seed_image("a", 0, 9)], 2)


# ------------------------------------------------------------------------------------------------ lmms-eval
@dataclass
class Request:
    """The part of lmms-eval's ``Instance`` a simple model reads (``request.args``)."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return self.arguments


def instance(request_type: str, arguments: tuple):
    try:
        from lmms_eval.api.instance import Instance
    except ImportError:
        return Request(request_type, arguments)
    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": arguments[4], "doc_id": arguments[3], "repeats": 1})


@pytest.fixture(scope="module")
def adapter(pipe):
    from harmon.evaluation.lmms import HarmonLMM

    lmm = HarmonLMM(pipeline=pipe, max_new_tokens=6)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    lmm.task_dict = {"two_items": {"test": [
        {"image": images[0], "question": "What colour is it?", "answer": "red"},
        {"image": images[1], "question": "<image>\nIs there a cat?", "answer": "no"},
    ]}}
    return lmm


def to_visual(doc):
    return [doc["image"]]


def test_lmms_generate_until_answers_like_the_pipeline(adapter, pipe):
    docs = adapter.task_dict["two_items"]["test"]
    requests = [instance("generate_until", (doc["question"], {"max_new_tokens": 5, "until": []}, to_visual, i,
                                            "two_items", "test")) for i, doc in enumerate(docs)]
    answers = adapter.generate_until(requests)
    expected = [pipe.understand(doc["image"], doc["question"].replace("<image>", "").strip(), max_new_tokens=5)
                for doc in docs]
    assert answers == expected and all(isinstance(a, str) for a in answers)
    assert any(answers), "the tiny model answered nothing: the comparison would be empty"
    cut = next(a for a in answers if a)[0]  # the first character as a stop string: the answer is cut before it
    stopped = adapter.generate_until([instance("generate_until", (docs[0]["question"], {"max_new_tokens": 5,
                                              "until": [cut]}, to_visual, 0, "two_items", "test"))])
    assert stopped == [expected[0].split(cut, 1)[0]]
    text_only = adapter.generate_until([instance("generate_until", ("Say hi.", {"max_new_tokens": 3}, None, 0,
                                                                    "two_items", "test"))])
    assert isinstance(text_only[0], str)


def test_lmms_loglikelihood_matches_greedy_decoding(adapter, pipe):
    from harmon.core import splice_image_embeddings

    doc = adapter.task_dict["two_items"]["test"][0]
    processor, tokenizer = pipe.processor, pipe.tokenizer
    # greedy decoding by transformers' generate, with its per-step logits: an independent path
    embeds = pipe.image_embeddings([doc["image"]])
    ids, _ = processor.understanding_inputs([doc["question"]], embeds.shape[1])
    inputs = splice_image_embeddings(pipe.llm, ids, embeds, processor.image_token_id)
    out = pipe.llm.generate(inputs_embeds=inputs, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                            min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=tokenizer.pad_token_id)
    greedy = out.sequences[0, -4:].tolist()
    expected = sum(float(torch.log_softmax(logits[0].float(), -1)[t]) for logits, t in zip(out.logits, greedy))
    continuation = tokenizer.decode(greedy)
    assert tokenizer.encode(continuation, add_special_tokens=False) == greedy  # round trip of the tiny tokenizer
    (loglik, is_greedy), (other, other_greedy) = adapter.loglikelihood([
        instance("loglikelihood", (doc["question"], continuation, to_visual, 0, "two_items", "test")),
        instance("loglikelihood", (doc["question"], lambda d: d["answer"], to_visual, 0, "two_items", "test")),
    ])
    assert is_greedy and loglik <= 0
    assert abs(loglik - expected) <= 1e-5 * max(1.0, abs(expected))
    # the same prefix, another last token: less likely, and not what greedy decoding gives
    last = next(t for t in (tokenizer.convert_tokens_to_ids(c) for c in "qxz") if t != greedy[-1])
    wrong = tokenizer.decode(greedy[:-1] + [last])
    assert tokenizer.encode(wrong, add_special_tokens=False) == greedy[:-1] + [last]
    (wrong_loglik, wrong_greedy), = adapter.loglikelihood([
        instance("loglikelihood", (doc["question"], wrong, to_visual, 0, "two_items", "test"))])
    assert not wrong_greedy and wrong_loglik < loglik
    assert other <= 0 and isinstance(other_greedy, bool)


def test_lmms_adapter_refuses_several_images_and_names_the_document(adapter):
    request = instance("generate_until", ("q", {}, lambda doc: [doc["image"], doc["image"]], 1, "two_items", "test"))
    with pytest.raises(ValueError, match="task 'two_items', document 1 has 2 images"):
        adapter.generate_until([request])


def test_lmms_adapter_registration():
    from harmon.evaluation.lmms import LMMS_EVAL_AVAILABLE, HarmonLMM, lmms_eval_manifest

    if LMMS_EVAL_AVAILABLE:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import MODEL_REGISTRY

        assert issubclass(HarmonLMM, lmms) and MODEL_REGISTRY["harmon"] is HarmonLMM
        manifest = lmms_eval_manifest()
        assert manifest.model_id == "harmon" and manifest.simple_class_path == "harmon.evaluation.lmms.HarmonLMM"
    else:
        with pytest.raises(ImportError, match="lmms-eval is not installed"):
            lmms_eval_manifest()
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        HarmonLMM()


# ------------------------------------------------------------------------------------------------------- CLI
def test_harmon_bench_cli_writes_geneval_and_computes_fid_errors(pipe, geneval_metadata, tmp_path, capsys):
    from harmon.cli import main

    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder))
    out = tmp_path / "geneval"
    code = main(["bench", "geneval", str(geneval_metadata), str(folder), "--outdir", str(out), "--steps", "2",
                 "--n-samples", "2", "--device", "cpu"])
    assert code == 0
    assert files_under(out) == {f"{i:05d}/{name}" for i in range(3)
                                for name in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"benchmark": "geneval", "outdir": str(out), "total": 3, "written": 3, "skipped": 0}
    assert main(["bench", "geneval", str(geneval_metadata), str(folder), "--outdir", str(out), "--steps", "2",
                 "--n-samples", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 3
    assert main(["bench", "fid", str(out), str(out)]) == 2
    assert "--inception-weights" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU launch; with CUDA --multi_gpu uses the GPUs")
def test_geneval_under_a_two_process_accelerate_launch_writes_what_one_process_writes(
    pipe, geneval_metadata, tmp_path
):
    import os
    import subprocess
    import sys

    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder))
    single, launched = tmp_path / "single", tmp_path / "launched"
    sampling = ["--steps", "2", "--n-samples", "2"]
    write_geneval(geneval_metadata, single, pipeline_sampler(pipe, num_inference_steps=2), n_samples=2,
                  process_index=0, num_processes=1)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "harmon.evaluation.cli", "geneval", str(geneval_metadata), str(folder), "--outdir", str(launched),
         *sampling],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["written"] for r in reports) == [1, 2]  # process 0: prompts 0 and 2, process 1: prompt 1
    assert files_under(launched) == files_under(single)
    for name in files_under(single):
        assert (single / name).read_bytes() == (launched / name).read_bytes(), name


HARNESS_TASK = """task: harmon_two_items
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["QQQ"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
HARNESS_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def test_lmms_eval_harness_runs_the_adapter_on_a_two_item_task(pipe, tmp_path, monkeypatch):
    """lmms-eval's own ``simple_evaluate`` on a task defined here (the dev extra installs lmms-eval; skipped only
    where it is not installed)."""
    evaluator = pytest.importorskip("lmms_eval.evaluator")
    from lmms_eval.tasks import TaskManager

    from harmon.evaluation.lmms import HarmonLMM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(0)
    docs = []
    for i, (question, answer) in enumerate([("What colour is it?", "red"), ("Is there a cat?", "no")]):
        path = tmp_path / f"image{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        docs.append({"image_path": str(path), "question": question, "answer": answer})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / "harmon_two_items.yaml").write_text(HARNESS_TASK.format(docs=tmp_path / "docs.jsonl"))
    (task_dir / "utils.py").write_text(HARNESS_UTILS)
    out = evaluator.simple_evaluate(
        model=HarmonLMM(pipeline=pipe), tasks=["harmon_two_items"], bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    assert "exact_match,none" in out["results"]["harmon_two_items"]
    responses = [sample["resps"][0][0] for sample in sorted(out["samples"]["harmon_two_items"],
                                                            key=lambda s: s["doc_id"])]
    expected = [pipe.understand(PIL.Image.open(d["image_path"]).convert("RGB"), d["question"], max_new_tokens=4)
                for d in docs]
    assert responses == expected

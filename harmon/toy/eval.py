"""Toy GenEval and the toy understanding benchmark, through the pipeline's public API only.

**Scorers** (:class:`ToyScorer`): small scikit-learn classifiers trained on rendered canvases of the *training*
digit images (never on model outputs), applied per slot (left / right half): a digit classifier with an 11th
class *empty* (an RBF SVM on the slot's 16×16 intensity map, trained with small shifts, noise and contrast
changes so that it tolerates a generator's blur) and a colour classifier (logistic regression on the slot's
intensity-weighted mean colour). Their accuracy on the held-out digit images is reported with the scores.

**Toy GenEval** (:func:`geneval`): ``pipe(prompts, ...)`` on a fixed, seeded prompt set — half one digit
("a red 3 on the left"), half two digits with distinct colours ("a red 3 on the left and a blue 7 on the right") —
then per category, as GenEval's:

========================  ================================================================================
single_object             one-digit prompts: a slot holds the named digit
two_objects               two-digit prompts: both named digits are present (any slots)
counting                  every prompt: the number of non-empty slots is the number of digits named
colors                    one-digit prompts: a slot holds the named digit in the named colour
position                  every prompt: each named digit is on its named side
color_attribution         two-digit prompts: each named digit is present in its own named colour
========================  ================================================================================

``overall`` is the mean of the six (GenEval's overall score). Chance levels: single_object ≈ 0.1, colors ≈ 0.02.

Every category but counting needs the named digit drawn. Two attribute scores, outside GenEval and outside
``overall``, say whether the prompt's layout and colours are followed whatever digit is drawn
(:attr:`GenEvalResult.attributes`):

========================  ================================================================================
layout                    every prompt: the non-empty slots are exactly the named sides
slot_colour               every prompt: each named side holds a digit (any) in its named colour
========================  ================================================================================

**Understanding** (:func:`understanding`): ``pipe.understand(images, questions)`` (greedy) on canvases of held-out
digit images; every question of :func:`harmon.toy.data.questions`; exact match after ``strip().lower()``, per
question kind and overall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from harmon.toy.data import (
    CANVAS,
    COLOURS,
    SIDES,
    Digit,
    Scene,
    caption,
    digit_split,
    questions,
    render,
    scenes,
)

EMPTY = 10
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
ATTRIBUTES = ("layout", "slot_colour")


# --------------------------------------------------------------------------------------------------- scoring
def _slot_pixels(image: np.ndarray, side: str) -> np.ndarray:
    """The 32×32 window of a side's slot, ``(32, 32, 3)`` in [0, 1]."""
    x = 0 if side == "left" else CANVAS // 2
    return image[16:48, x:x + 32]


def _shape_features(slot: np.ndarray) -> np.ndarray:
    intensity = slot.max(axis=2)
    return intensity.reshape(16, 2, 16, 2).mean(axis=(1, 3)).reshape(-1)


def _colour_features(slot: np.ndarray) -> np.ndarray:
    weight = slot.max(axis=2, keepdims=True) ** 2
    mean = (slot * weight).sum(axis=(0, 1)) / max(float(weight.sum()), 1e-6)
    return mean / max(float(mean.max()), 1e-6)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image, dtype=np.float32)
    return array / 255.0 if array.max() > 1.5 else array


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dy, dx = rng.integers(-2, 3, size=2)
    image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    image = image * rng.uniform(0.7, 1.1) + rng.normal(0, rng.uniform(0, 0.06), image.shape)
    return np.clip(image, 0, 1)


class ToyScorer:
    """Per-slot digit (or empty) and colour classifiers trained on canvases of the training digit images."""

    def __init__(self, seed: int = 0, copies: int = 2) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC

        rng = np.random.default_rng((seed, 0x5C0))
        pool = digit_split()["train"]
        shape_x, shape_y, colour_x, colour_y = [], [], [], []
        for value, indices in pool.items():
            for sample in indices:
                for _ in range(copies):
                    side = SIDES[int(rng.integers(2))]
                    colour = COLOURS[int(rng.integers(len(COLOURS)))]
                    image = _augment(_as_array(render(Scene((Digit(value, colour, side, int(sample)),)))), rng)
                    shape_x.append(_shape_features(_slot_pixels(image, side)))
                    shape_y.append(value)
                    other = "right" if side == "left" else "left"
                    shape_x.append(_shape_features(_slot_pixels(image, other)))
                    shape_y.append(EMPTY)
                    colour_x.append(_colour_features(_slot_pixels(image, side)))
                    colour_y.append(COLOURS.index(colour))
        # a faint blob is not a digit: empty slots with low-amplitude noise
        self.digit = SVC(C=10.0, gamma="scale").fit(np.asarray(shape_x), np.asarray(shape_y))
        self.colour = LogisticRegression(max_iter=2000).fit(np.asarray(colour_x), np.asarray(colour_y))

    def read(self, images) -> list[dict[str, tuple[int, str | None]]]:
        """Per image ``{side: (digit or EMPTY, colour or None)}``."""
        arrays = [_as_array(im) for im in images]
        slots = [(a, side) for a in arrays for side in SIDES]
        digits = self.digit.predict(np.stack([_shape_features(_slot_pixels(a, s)) for a, s in slots]))
        colours = self.colour.predict(np.stack([_colour_features(_slot_pixels(a, s)) for a, s in slots]))
        out = []
        for i in range(len(arrays)):
            reading = {}
            for j, side in enumerate(SIDES):
                d, c = int(digits[2 * i + j]), int(colours[2 * i + j])
                reading[side] = (d, None if d == EMPTY else COLOURS[c])
            out.append(reading)
        return out

    def accuracy(self, count: int = 400, seed: int = 1) -> dict[str, float]:
        """Digit (empty included) and colour accuracy on canvases of the held-out digit images."""
        test = scenes(count, "test", seed)
        readings = self.read([render(s) for s in test])
        digit_hits = colour_hits = digit_total = colour_total = 0
        for scene, reading in zip(test, readings):
            for side in SIDES:
                truth = scene.on(side)
                digit_total += 1
                digit_hits += reading[side][0] == (truth.value if truth else EMPTY)
                if truth is not None:
                    colour_total += 1
                    colour_hits += reading[side][1] == truth.colour
        return {"digit": digit_hits / digit_total, "colour": colour_hits / colour_total}


@lru_cache(maxsize=2)
def default_scorer(seed: int = 0) -> ToyScorer:
    return ToyScorer(seed)


# --------------------------------------------------------------------------------------------------- prompts
def geneval_prompts(count: int = 40, seed: int = 0) -> list[Scene]:
    """Half one-digit, half two-digit scenes (distinct colours), balanced over digits and sides, seeded."""
    rng = np.random.default_rng((seed, 0x6E7))
    singles = count // 2
    out = []
    for i in range(singles):
        out.append(Scene((Digit(i % 10, COLOURS[int(rng.integers(len(COLOURS)))], SIDES[(i // 10 + i) % 2]),)))
    for _ in range(count - singles):
        values = rng.integers(10, size=2)
        colours = rng.choice(len(COLOURS), size=2, replace=False)
        out.append(Scene(tuple(Digit(int(v), COLOURS[int(c)], side) for v, c, side in zip(values, colours, SIDES))))
    return out


def score_scene(scene: Scene, reading: dict[str, tuple[int, str | None]]) -> dict[str, bool]:
    """The GenEval categories that apply to ``scene`` and the two attributes, judged on the scorer's ``reading``
    of its image (per side: the digit read, :data:`EMPTY` for none, and the colour)."""
    found = [reading[side] for side in SIDES if reading[side][0] != EMPTY]
    found_values = sorted(d for d, _ in found)
    wanted_values = sorted(d.value for d in scene.digits)
    present = all(any(v == d.value for v, _ in found) for d in scene.digits)
    with_colour = all(any(v == d.value and c == d.colour for v, c in found) for d in scene.digits)
    named = {d.side: d for d in scene.digits}
    result = {
        "counting": len(found) == scene.count,
        "position": all(reading[d.side][0] == d.value for d in scene.digits),
        "layout": all((reading[side][0] != EMPTY) == (side in named) for side in SIDES),
        "slot_colour": all(reading[d.side][0] != EMPTY and reading[d.side][1] == d.colour for d in scene.digits),
    }
    if scene.count == 1:
        result["single_object"] = present
        result["colors"] = with_colour
    else:
        result["two_objects"] = found_values == wanted_values or present
        result["color_attribution"] = with_colour
    return result


@dataclass
class GenEvalResult:
    scores: dict[str, float]          # the six categories and overall
    attributes: dict[str, float]      # layout and slot_colour (not GenEval's; not in overall)
    per_prompt: list[dict]            # prompt, reading, judgements
    seconds: float                    # generation time (the pipeline calls only)
    images: list[Image.Image]


def geneval(
    pipe,
    count: int = 40,
    *,
    seed: int = 0,
    num_inference_steps: int = 64,
    guidance_scale: float = 3.0,
    batch_size: int = 20,
    scorer: ToyScorer | None = None,
    **call_kwargs,
) -> GenEvalResult:
    """Generate one image per prompt of :func:`geneval_prompts` (image ``i`` seeded ``seed·10⁴ + i``) and score
    them. ``call_kwargs`` go to ``pipe(...)`` (e.g. ``sampler="fast", head_steps=25``)."""
    import torch

    scorer = scorer or default_scorer()
    prompts = geneval_prompts(count, seed)
    texts = [caption(s) for s in prompts]
    images: list[Image.Image] = []
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 10_000 + start + k) for k in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=generators, **call_kwargs).images
    seconds = time.perf_counter() - started
    readings = scorer.read(images)
    per_prompt, hits = [], {c: [] for c in (*CATEGORIES, *ATTRIBUTES)}
    for scene, text, reading in zip(prompts, texts, readings):
        judged = score_scene(scene, reading)
        for category, ok in judged.items():
            hits[category].append(ok)
        per_prompt.append({"prompt": text, "reading": reading, **judged})
    means = {c: float(np.mean(v)) if v else float("nan") for c, v in hits.items()}
    scores = {c: means[c] for c in CATEGORIES}
    scores["overall"] = float(np.mean([scores[c] for c in CATEGORIES]))
    return GenEvalResult(scores, {a: means[a] for a in ATTRIBUTES}, per_prompt, seconds, images)


# --------------------------------------------------------------------------------------------- understanding
@dataclass
class UnderstandingResult:
    scores: dict[str, float]   # per question kind and overall exact match
    per_question: list[dict]
    seconds: float


def understanding(pipe, count: int = 50, *, seed: int = 0, batch_size: int = 64) -> UnderstandingResult:
    """Exact-match accuracy of ``pipe.understand`` on every question about ``count`` held-out canvases."""
    test = scenes(count, "test", seed + 1000)
    items = [(render(s), kind, q, a) for s in test for kind, q, a in questions(s)]
    answers: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        answers += pipe.understand([it[0] for it in chunk], [it[2] for it in chunk], max_new_tokens=4)
    seconds = time.perf_counter() - started
    per_question, kinds = [], {}
    for (_, kind, question, expected), answer in zip(items, answers):
        ok = answer.strip().lower() == expected
        kinds.setdefault(kind, []).append(ok)
        per_question.append({"kind": kind, "question": question, "expected": expected, "answer": answer, "ok": ok})
    scores = {kind: float(np.mean(v)) for kind, v in kinds.items()}
    scores["overall"] = float(np.mean([q["ok"] for q in per_question]))
    return UnderstandingResult(scores, per_question, seconds)

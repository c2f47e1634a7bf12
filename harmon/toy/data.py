"""The toy data: 64×64 RGB canvases with one or two coloured handwritten digits, captions and questions.

The digits are scikit-learn's ``load_digits`` (1797 real 8×8 handwritten digits shipped inside the package: nothing
is downloaded). Each dataset image is upsampled to 24×24 (bicubic), coloured (intensity × a palette colour) and
pasted on a black 64×64 canvas in the left or right slot. The dataset's own images are split per class into a
training and a held-out part (:func:`digit_split`), so evaluation sees handwriting the model never saw.

A canvas is described by a :class:`Scene`: one or two :class:`Digit` (value, colour, side). Its caption is
``"a red 3 on the left"`` / ``"a red 3 on the left and a blue 7 on the right"``; its questions
(:func:`questions`) ask for the number of digits, the digit or colour on a side, the colour or side of a digit.

:func:`write_dataset` lays a split out in the training engine's formats (``format: caption`` for text → image and
captioning, ``format: llava`` for the questions, ``format: text`` for the captions as plain text). Everything is
seeded and deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CANVAS = 64
DIGIT_SIZE = 24
SIDES = ("left", "right")
SLOT_ORIGIN = {"left": (4, 20), "right": (36, 20)}  # top-left corner (x, y) of the 24×24 digit in each half
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
COLOURS = tuple(PALETTE)
COUNT_WORDS = {1: "one", 2: "two"}
NONE_ANSWER = "none"


@dataclass(frozen=True)
class Digit:
    value: int
    colour: str
    side: str
    sample: int = -1  # index into load_digits (-1: none chosen, e.g. a prompt)


@dataclass(frozen=True)
class Scene:
    digits: tuple[Digit, ...]  # left first

    @property
    def count(self) -> int:
        return len(self.digits)

    def on(self, side: str) -> Digit | None:
        return next((d for d in self.digits if d.side == side), None)


def caption(scene: Scene) -> str:
    return " and ".join(f"a {d.colour} {d.value} on the {d.side}" for d in scene.digits)


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously: ``(kind, question, answer)``."""
    out = [("count", "How many digits are there?", COUNT_WORDS[scene.count])]
    for side in SIDES:
        digit = scene.on(side)
        out.append(("digit", f"What digit is on the {side}?", str(digit.value) if digit else NONE_ANSWER))
        if digit is not None:
            out.append(("colour", f"What colour is the digit on the {side}?", digit.colour))
    values = [d.value for d in scene.digits]
    for digit in scene.digits:
        if values.count(digit.value) == 1:
            out.append(("colour_of", f"What colour is the {digit.value}?", digit.colour))
            out.append(("side_of", f"Where is the {digit.value}?", digit.side))
    return out


# ------------------------------------------------------------------------------------------------- digits
@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_split(held_out: float = 0.2, seed: int = 0) -> dict[str, dict[int, np.ndarray]]:
    """``{"train" | "test": {digit: indices into load_digits}}``: the dataset's own images split per class."""
    _, labels = _digits()
    rng = np.random.default_rng(seed)
    split: dict[str, dict[int, np.ndarray]] = {"train": {}, "test": {}}
    for value in range(10):
        indices = rng.permutation(np.flatnonzero(labels == value))
        cut = int(round(len(indices) * held_out))
        split["test"][value] = np.sort(indices[:cut])
        split["train"][value] = np.sort(indices[cut:])
    return split


@lru_cache(maxsize=4096)
def _digit_intensity(sample: int) -> np.ndarray:
    image = Image.fromarray((_digits()[0][sample] * 255).astype(np.uint8), mode="L")
    return np.asarray(image.resize((DIGIT_SIZE, DIGIT_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0


def render(scene: Scene) -> Image.Image:
    """The 64×64 RGB canvas of ``scene`` (each digit needs its ``sample``)."""
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    for digit in scene.digits:
        if digit.sample < 0:
            raise ValueError(f"render: digit {digit} has no load_digits sample")
        x, y = SLOT_ORIGIN[digit.side]
        colour = np.asarray(PALETTE[digit.colour], dtype=np.float32)
        canvas[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE] = _digit_intensity(digit.sample)[..., None] * colour
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator, pool: dict[int, np.ndarray] | None, two_share: float = 0.6) -> Scene:
    """One or two digits (two with probability ``two_share``), random values, colours and sides; samples drawn
    from ``pool`` (``digit_split()[...]``), or none when ``pool`` is ``None`` (a prompt)."""
    sides = list(SIDES) if rng.random() < two_share else [SIDES[int(rng.integers(2))]]
    digits = []
    for side in sides:
        value = int(rng.integers(10))
        sample = int(rng.choice(pool[value])) if pool is not None else -1
        digits.append(Digit(value, COLOURS[int(rng.integers(len(COLOURS)))], side, sample))
    return Scene(tuple(digits))


def scenes(count: int, split: str = "train", seed: int = 0, split_seed: int = 0) -> list[Scene]:
    """``count`` random scenes whose digits are images of ``split`` (``"train"`` or ``"test"``)."""
    pool = digit_split(seed=split_seed)[split]
    rng = np.random.default_rng((seed, 0x70F, {"train": 0, "test": 1}[split]))
    return [random_scene(rng, pool) for _ in range(count)]


# ------------------------------------------------------------------------------------------------- writing
CAPTION_QUESTION = "Describe the image."
EMPTY_DIGIT = 10  # the digit class of an empty slot
EMPTY_COLOUR = len(COLOURS)  # the colour class of an empty slot
PROBE_REGIONS = {"left": (0.0, 0.25, 0.5, 0.75), "right": (0.5, 0.25, 1.0, 0.75)}
"""The slots as boxes (x0, y0, x1, y1) in image fractions: the 32×32 windows around the 24×24 digits."""
PROBE_TARGETS = {"digit": 11, "colour": len(COLOURS) + 1}
"""Classes of the condition probes' targets (the ten digits / five colours, and *empty*)."""


def region_labels(scene: Scene) -> dict[str, dict[str, int]]:
    """The condition probes' labels of ``scene`` (``harmon.training.probes``): per slot its digit and colour
    class, :data:`EMPTY_DIGIT` / :data:`EMPTY_COLOUR` when the slot is empty."""
    out = {}
    for side in SIDES:
        digit = scene.on(side)
        out[side] = ({"digit": digit.value, "colour": COLOURS.index(digit.colour)} if digit is not None
                     else {"digit": EMPTY_DIGIT, "colour": EMPTY_COLOUR})
    return out


def write_dataset(root: str | Path, count: int = 4000, split: str = "train", seed: int = 0) -> Path:
    """Write ``count`` scenes of ``split`` under ``root`` in the training engine's layouts::

        images/00000.png, annotations/00000.json ({"caption", "region_labels"}), data_info.json (format: caption)
        llava.json          every question of each image, shuffled, then the caption  (format: llava)
        questions.json      one single-turn conversation per question (and per caption) (format: llava)
        digit_questions.json    the "What digit is on the …?" ones of questions.json         (format: llava)
        text.jsonl          {"text": caption}                                          (format: text)
        scenes.json         the scenes themselves (digit, colour, side, load_digits sample)
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 0xC0A))
    info, llava, single, text, described = [], [], [], [], []
    for i, scene in enumerate(scenes(count, split, seed)):
        image_name, annotation_name = f"images/{i:05d}.png", f"annotations/{i:05d}.json"
        render(scene).save(root / image_name)
        text_caption = caption(scene)
        (root / annotation_name).write_text(json.dumps({"caption": text_caption, "region_labels": region_labels(scene)}))
        info.append({"image": image_name, "annotation": annotation_name})
        asked = questions(scene)
        order = rng.permutation(len(asked))
        turns = []
        for j in order:
            _, question, answer = asked[j]
            turns.append({"from": "human", "value": question if turns else f"<image>\n{question}"})
            turns.append({"from": "gpt", "value": answer})
        turns += [{"from": "human", "value": CAPTION_QUESTION}, {"from": "gpt", "value": text_caption}]
        llava.append({"id": f"{i:05d}", "image": image_name, "conversations": turns})
        for k, (question, answer) in enumerate([(q, a) for _, q, a in asked] + [(CAPTION_QUESTION, text_caption)]):
            single.append({"id": f"{i:05d}-{k}", "image": image_name, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        text.append({"text": text_caption})
        described.append([d.__dict__ for d in scene.digits])
    (root / "data_info.json").write_text(json.dumps(info))
    (root / "llava.json").write_text(json.dumps(llava))
    (root / "questions.json").write_text(json.dumps(single))
    digits = [c for c in single if c["conversations"][0]["value"].startswith("<image>\nWhat digit is on the")]
    (root / "digit_questions.json").write_text(json.dumps(digits))
    (root / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in text))
    (root / "scenes.json").write_text(json.dumps(described))
    return root


def pixels(images: list[Image.Image]) -> np.ndarray:
    """PIL images → ``(N, 3, H, W)`` float32 in [-1, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images])

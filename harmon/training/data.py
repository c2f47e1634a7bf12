"""Training data: the record formats of the three tasks and a dataset keyed by ``(task, index, draw)``.

* :class:`CaptionRecords` — the original release's layout: ``data_info.json`` lists ``{"image", "annotation"}``,
  each annotation a JSON file holding the caption;
* :class:`LlavaRecords` — LLaVA conversations (``conversations`` of ``human``/``gpt`` turns, ``<image>`` in the
  first question);
* :class:`TextRecords` — plain text, one document per line (``.txt``) or per JSON line (``.jsonl``);
* :class:`ImageFolderRecords` — a folder of images (the reconstruction task reads images only, from this or the
  two image layouts above).

Images are RGB PIL images turned into ``(3, S, S)`` tensors in [-1, 1]: generation targets are resized on the
short side and centre-cropped; understanding inputs are padded to a square with gray (127, 127, 127) and resized,
as Harmon's understanding pre-processing does. There is no random flip: captions name left and right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

from harmon.pipelines.image_processing import load_image
from harmon.training.collator import IGNORE_INDEX
from harmon.training.config import (
    TASKS,
    CaptionSource,
    ConditionProbeConfig,
    DataConfig,
    ImageFolderSource,
    LlavaSource,
    TextSource,
)

GRAY = (127, 127, 127)
_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")


def _read_json_list(path: Path, what: str) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the {what} JSON: {error}") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: the {what} must be a JSON list")
    return data


def load_rgb(path: Path) -> Image.Image:
    """RGB as the pipeline reads images: size bounded on the header (no bombs), every PIL mode converted."""
    return load_image(path, argument="training image")


def to_unit_range(image: Image.Image) -> torch.Tensor:
    return TF.to_tensor(image) * 2.0 - 1.0


def generation_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size``, centre-crop ``size × size``: ``(3, size, size)`` in [-1, 1]."""
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return to_unit_range(TF.center_crop(image, [size, size]))


def understanding_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Pad to a square with gray, resize to ``size × size``: ``(3, size, size)`` in [-1, 1]."""
    width, height = image.size
    if width != height:
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        image = TF.pad(image, [left, top, side - width - left, side - height - top], fill=GRAY)
    image = TF.resize(image, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return to_unit_range(image)


# -------------------------------------------------------------------------------------------------- records
class _EntryImages:
    """``image_path`` / ``image`` of records whose entries name their image relative to ``image_folder``."""

    image_folder: Path
    entries: list[dict]

    def image_path(self, index: int) -> Path:
        return self.image_folder / self.entries[index]["image"]

    def image(self, index: int) -> Image.Image:
        return load_rgb(self.image_path(index))


class CaptionRecords(_EntryImages):
    """Image–caption pairs in the release layout (see :class:`~harmon.training.config.CaptionSource`)."""

    def __init__(self, source: CaptionSource, data: DataConfig) -> None:
        self.source = source
        info = data.resolve(source.data_info)
        self.image_folder = data.resolve(source.image_folder) if source.image_folder else info.parent
        self.annotation_folder = data.resolve(source.annotation_folder) if source.annotation_folder else info.parent
        self.entries = _read_json_list(info, "data_info")
        for i, entry in enumerate(self.entries):  # every entry, up front: a bad one is found before training
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "annotation")):
                raise ValueError(f"{info}: entry {i} must hold 'image' and 'annotation' paths")
        self.question = source.question

    def __len__(self) -> int:
        return len(self.entries)

    def annotation(self, index: int) -> tuple[Path, dict]:
        path = self.annotation_folder / self.entries[index]["annotation"]
        try:
            annotation = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read the annotation JSON: {error}") from error
        if not isinstance(annotation, dict) or self.source.caption_key not in annotation:
            raise KeyError(f"{path} has no {self.source.caption_key!r}")
        return path, annotation

    def caption(self, index: int) -> str:
        return str(self.annotation(index)[1][self.source.caption_key]).strip()

    def caption_and_region_labels(self, index: int, probes: ConditionProbeConfig) -> tuple[str, torch.Tensor]:
        """The caption and its ``(regions, targets)`` class labels for the condition probes (-100 where the
        annotation names no class; every named class is checked against the target's class count)."""
        path, annotation = self.annotation(index)
        labels = torch.full((len(probes.regions), len(probes.targets)), IGNORE_INDEX, dtype=torch.long)
        given = annotation.get(probes.labels_key, {})
        if not isinstance(given, dict):
            raise ValueError(f"{path}: {probes.labels_key!r} must map regions to {{target: class}}")
        unknown = sorted(set(given) - set(probes.regions))
        if unknown:
            raise ValueError(f"{path}: {probes.labels_key} names regions {unknown} that condition_probes.regions "
                             f"does not define ({sorted(probes.regions)})")
        for r, region in enumerate(probes.regions):
            for t, (target, classes) in enumerate(probes.targets.items()):
                value = given.get(region, {}).get(target)
                if value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < classes:
                    raise ValueError(f"{path}: {probes.labels_key}.{region}.{target} is {value!r}, not a class in "
                                     f"[0, {classes})")
                labels[r, t] = value
        return str(annotation[self.source.caption_key]).strip(), labels


class LlavaRecords(_EntryImages):
    """LLaVA conversations with an image (see :class:`~harmon.training.config.LlavaSource`)."""

    def __init__(self, source: LlavaSource, data: DataConfig) -> None:
        path = data.resolve(source.path)
        self.image_folder = data.resolve(source.image_folder) if source.image_folder else path.parent
        self.entries: list[dict[str, Any]] = []
        self.skipped = 0
        for i, entry in enumerate(_read_json_list(path, "LLaVA conversations")):
            turns = _checked_turns(entry, path, i) if isinstance(entry, dict) else []
            if not isinstance(entry, dict) or "image" not in entry or not turns:
                self.skipped += 1  # text-only or empty conversations have no place in the image→text task
                continue
            if not isinstance(entry["image"], str):
                raise ValueError(f"{path}: entry {i}: 'image' must be a path string, got {entry['image']!r}")
            self.entries.append({"image": entry["image"], "turns": turns})
        if not self.entries:
            raise ValueError(f"{path}: no conversation with an image")

    def __len__(self) -> int:
        return len(self.entries)


def _checked_turns(entry: dict, path: Path, index: int) -> list[tuple[str, str]]:
    conversations = entry.get("conversations", [])
    if not isinstance(conversations, list) or not all(
        isinstance(m, dict) and isinstance(m.get("value", ""), str) for m in conversations
    ):
        raise ValueError(f"{path}: entry {index}: 'conversations' must be a list of {{'from', 'value': str}} messages")
    return conversation_turns(conversations)


def conversation_turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """LLaVA messages → ``[(question, answer), …]``; ``<image>`` is removed from the questions (the collator
    puts the placeholder in front of the first one)."""
    turns = []
    for i in range(0, len(conversations) - 1, 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            break
        question = _IMAGE_PLACEHOLDER.sub(" ", human.get("value", "")).strip()
        turns.append((question, str(gpt.get("value", "")).strip()))
    return turns


class TextRecords:
    """Plain text, one document per line; only line offsets are kept in memory."""

    def __init__(self, source: TextSource, data: DataConfig) -> None:
        self.path = data.resolve(source.path)
        self.key = source.text_key
        self.jsonl = self.path.suffix == ".jsonl"
        offsets, numbers = [], []
        position = 0
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self._parse(line, number)  # every line checked up front: a corrupt one fails before training
                    offsets.append(position)
                    numbers.append(number)
                position += len(line)
        if not offsets:
            raise ValueError(f"{self.path}: no text")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(numbers, dtype=np.int64)

    def _parse(self, line: bytes, number: int) -> str:
        where = f"{self.path}:{number}"
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not UTF-8 text ({error})") from None
        if not self.jsonl:
            return text
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON line ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.key), str):
            raise ValueError(f"{where}: expected a JSON object with a string {self.key!r}")
        return record[self.key]

    def __len__(self) -> int:
        return len(self.offsets)

    def text(self, index: int) -> str:
        with self.path.open("rb") as handle:
            handle.seek(int(self.offsets[index]))
            line = handle.readline()
        return self._parse(line, int(self.line_numbers[index]))  # a file changed since: still named file:line


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolderRecords:
    """The images under a folder, sub-folders included, sorted by relative path (see
    :class:`~harmon.training.config.ImageFolderSource`)."""

    def __init__(self, source: ImageFolderSource, data: DataConfig) -> None:
        self.folder = data.resolve(source.folder)
        self.paths = sorted(
            path for path in self.folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not self.paths:
            raise ValueError(f"data: no image ({', '.join(IMAGE_SUFFIXES)}) under {self.folder}")

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def image(self, index: int) -> Image.Image:
        return load_rgb(self.image_path(index))


_RECORDS = {"caption": CaptionRecords, "llava": LlavaRecords, "text": TextRecords, "images": ImageFolderRecords}


# -------------------------------------------------------------------------------------------------- dataset
class MultiTaskDataset(Dataset):
    """Samples keyed by ``(task, index, draw)``: ``index`` runs over the task's sources one after another.

    Returns ``{"task", "draw", …}`` plus ``pixels`` and ``caption`` (text→image), ``pixels`` and ``turns``
    (image→text), ``text`` (text), or ``pixels`` (reconstruction: the generation crop, which is both what the
    understanding path reads and the target). Samples with an image also carry ``image_key`` (its file and
    preprocessing), the key of ``training.latent_cache_size``'s cache.
    """

    def __init__(self, data: DataConfig, probes: ConditionProbeConfig | None = None) -> None:
        self.image_size = data.image_size
        self.probes = probes  # text→image samples then carry their captions' region labels
        ratios = data.ratios.as_dict()
        self.sources: dict[str, list] = {}
        for task in TASKS:
            records = []
            if ratios[task] > 0:
                for source in getattr(data, task):
                    records.append(_RECORDS[source.format](source, data))
            self.sources[task] = records
        self.offsets = {task: np.cumsum([0] + [len(r) for r in self.sources[task]]) for task in TASKS}

    def task_size(self, task: str) -> int:
        return int(self.offsets[task][-1])

    def __len__(self) -> int:
        return sum(self.task_size(task) for task in TASKS)

    def _locate(self, task: str, index: int):
        offsets = self.offsets[task]
        if not 0 <= index < offsets[-1]:
            raise IndexError(f"{task} index {index} out of range ({offsets[-1]} samples)")
        source = int(np.searchsorted(offsets, index, side="right") - 1)
        return self.sources[task][source], index - int(offsets[source])

    def __getitem__(self, key: tuple[str, int, int]) -> dict[str, Any]:
        task, index, draw = key
        records, local = self._locate(task, int(index))
        sample: dict[str, Any] = {"task": task, "draw": int(draw)}
        if task != "text":  # for the latent cache: the image file and its preprocessing fix the VAE tokens
            kind = "understanding" if task == "image_to_text" else "generation"
            sample["image_key"] = (kind, str(records.image_path(local)))
        if task == "text_to_image":
            sample["pixels"] = generation_pixels(records.image(local), self.image_size)
            if self.probes is not None and isinstance(records, CaptionRecords):
                sample["caption"], sample["region_labels"] = records.caption_and_region_labels(local, self.probes)
            else:
                sample["caption"] = records.caption(local)
                if self.probes is not None:  # a source without region labels: nothing to probe
                    sample["region_labels"] = torch.full(
                        (len(self.probes.regions), len(self.probes.targets)), IGNORE_INDEX, dtype=torch.long
                    )
        elif task == "reconstruction":
            sample["pixels"] = generation_pixels(records.image(local), self.image_size)
        elif task == "image_to_text":
            sample["pixels"] = understanding_pixels(records.image(local), self.image_size)
            if isinstance(records, CaptionRecords):
                sample["turns"] = [(records.question, records.caption(local))]
            else:
                sample["turns"] = list(records.entries[local]["turns"])
        else:
            sample["text"] = records.text(local)
        return sample

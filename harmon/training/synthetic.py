"""A small synthetic data set for smoke runs and tests: colored shapes drawn with PIL, in the layouts the trainer
reads (release layout for captions, LLaVA JSON for questions, JSON lines for plain text).

``python -m harmon.training.synthetic OUT [--count N] [--size S]`` writes::

    OUT/images/00000.png …          the pictures (a red circle on the left, …)
    OUT/annotations/00000.json …    {"caption": "a red circle on the left"}
    OUT/data_info.json              [{"image": "images/00000.png", "annotation": "annotations/00000.json"}, …]
    OUT/llava.json                  [{"image": "images/00000.png", "conversations": [human/gpt turns]}, …]
    OUT/text.jsonl                  {"text": "There is a red circle on the left."} per line
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right")


def draw_shape(shape: str, color: str, place: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    r = size // 5
    cx = size // 4 if place == "left" else 3 * size // 4
    cy = size // 2
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_shapes_dataset(root: str | Path, count: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` pictures with captions, questions and text under ``root`` (see the module docstring)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    info, llava, text = [], [], []
    for i in range(count):
        color, shape, place = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(PLACES)
        caption = f"a {color} {shape} on the {place}"
        image_name, annotation_name = f"images/{i:05d}.png", f"annotations/{i:05d}.json"
        draw_shape(shape, color, place, size).save(root / image_name)
        (root / annotation_name).write_text(json.dumps({"caption": caption}))
        info.append({"image": image_name, "annotation": annotation_name})
        question, answer = rng.choice([
            ("What color is the shape?", color),
            ("What shape is in the picture?", f"a {shape}"),
            ("Where is the shape?", f"on the {place}"),
        ])
        llava.append({
            "id": f"{i:05d}",
            "image": image_name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
                {"from": "human", "value": "Describe the picture."},
                {"from": "gpt", "value": caption},
            ],
        })
        text.append({"text": f"There is {caption}."})
    (root / "data_info.json").write_text(json.dumps(info, indent=1))
    (root / "llava.json").write_text(json.dumps(llava, indent=1))
    (root / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in text))
    return root


INDEX_FILES = ("data_info.json", "llava.json", "text.jsonl")
"""Written last by :func:`write_shapes_dataset`: their presence marks a complete data set."""


def shapes_dataset_complete(root: str | Path) -> bool:
    return all((Path(root) / name).is_file() for name in INDEX_FILES)


def ensure_shapes_dataset(root: str | Path, count: int = 48, size: int = 64, seed: int = 0) -> bool:
    """Write the shapes data set at ``root`` unless it is complete there; return whether it was written."""
    if shapes_dataset_complete(root):
        return False
    write_shapes_dataset(root, count=count, size=size, seed=seed)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_shapes_dataset(args.out, args.count, args.size, args.seed)
    print(f"wrote {args.count} samples to {args.out}")


if __name__ == "__main__":
    main()

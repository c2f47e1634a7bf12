"""Grad-CAM++ maps of visual encoders (Harmon, arXiv 2503.21979, Fig. 2), through the ``grad-cam`` package.

The maps are computed on an encoder's *token features*: ``pytorch_grad_cam.GradCAMPlusPlus`` hooks the module whose
output is ``(B, K + m*n, D)`` and a reshape transform drops the ``K`` buffer slots and restores the ``m x n`` grid.
Two kinds of target:

* ``probe`` -- a linear-probe class: encoder -> pooled feature -> a head trained by ``experiments.linear_probe``
  (``--probe``), the image's label (or ``--class-index``);
* ``word`` -- for a full Harmon model (a HarmonPipeline folder): the log-probability of ``--word`` as the answer to
  ``--question``, through the LLM (the image embeddings replace the ``<image>`` placeholders, as in
  ``HarmonPipeline.understand``); the hooked features are those of the encoder Harmon understands with (the shared
  MAR, or a decoupled understanding encoder such as SigLIP).

Examples::

    python -m experiments.gradcam --encoder mar-h --weights harmon-1.5b \\
        --probe results/linear_probe/probes/mar-h__harmon-1.5b__train+val__lr0.1_ep90_seed0.pt \\
        --val-dir imagenet/val --num-images 8 --device cuda
    python -m experiments.gradcam --encoder mar-h --weights harmon-1.5b --target word \\
        --question "What animal is this?" --word cat --images cat.jpg dog.jpg --device cuda --dtype bf16
    python -m experiments.gradcam --smoke

Outputs under ``--output-dir`` (default ``results/gradcam``): ``gradcam_<column>.png`` (image | overlay, one row
per image), ``gradcam_grid.png`` (image | one overlay column per encoder/target, as Fig. 2), ``cams.npz`` (the raw
maps in [0, 1]) and ``gradcam.json`` (what each column is).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from harmon import HarmonModel
from harmon.pipelines import HarmonProcessor
from experiments.common import (
    BUNDLED_DATASETS,
    LabeledImages,
    ProbeClassifier,
    TokenFeatures,
    bundled_dataset,
    extract_pooled_features,
    image_folder_dataset,
    load_encoder,
    load_probe,
    reads_pixels,
    resolve_device,
    resolve_dtype,
    save_json,
    torch_threads,
    slug,
    train_linear_probe,
)



# -------------------------------------------------------------------------------------------------------- Grad-CAM
def grid_reshape(buffer_size: int, image_hw: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape transform for ``pytorch_grad_cam``: ``(B, K + m*n, D)`` -> ``(B, D, m, n)`` (fp32), the ``K`` leading
    buffer slots dropped, the grid's aspect taken from the input image's ``image_hw``."""
    height, width = image_hw

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, buffer_size:].float()
        stride = (height * width / grid.shape[1]) ** 0.5
        m, n = round(height / stride), round(width / stride)
        return rearrange(grid, "b (m n) d -> b d m n", m=m, n=n)

    return reshape


def gradcam_plusplus(
    scorer: nn.Module,
    target_layer: nn.Module,
    reshape: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    targets: Sequence[Any],
    batch_size: int = 8,
) -> np.ndarray:
    """Grad-CAM++ maps ``(B, H, W)`` in [0, 1] of ``scorer(pixels)`` for ``targets`` (one per image), on the output of
    ``target_layer``. The CAM object is released explicitly (its context manager would swallow an IndexError)."""
    from pytorch_grad_cam import GradCAMPlusPlus

    cams = []
    cam = GradCAMPlusPlus(model=scorer, target_layers=[target_layer], reshape_transform=reshape)
    try:
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size]
            maps = cam(input_tensor=batch, targets=list(targets[start:start + batch_size]))
            if len(cam.activations_and_grads.gradients) == 0:
                raise RuntimeError("Grad-CAM saw no gradient at the target layer: is the encoder frozen "
                                   "(requires_grad=False) or is the target layer not on the scored path?")
            cams.append(np.asarray(maps, dtype=np.float32))
    finally:
        cam.activations_and_grads.release()
    return np.concatenate(cams)


def class_targets(indices: Sequence[int]) -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(i)) for i in indices]


class WordLogProb(nn.Module):
    """pixels -> ``(B, 1)``: log p(``word`` | image, ``question``) under a Harmon model, summed over the word's tokens
    (teacher-forced). The prompt is ``HarmonPipeline.understand``'s, built by the same
    :class:`~harmon.pipelines.HarmonProcessor` (``<image>`` x N + ``\\n`` + question in the chat template); the
    image embeddings come from ``model.image_embeddings``."""

    def __init__(self, model: nn.Module, tokenizer: Any, question: str, word: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.question = question
        self.processor = HarmonProcessor.from_config(tokenizer, model.config)
        self.word_ids = self.processor.text_ids(word)
        if not self.word_ids:
            raise SystemExit(f"--word {word!r} tokenizes to nothing")
        self.image_token_id = self.processor.image_token_id

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.model
        embeds = model.image_embeddings(pixels)
        ids = self.processor.user_turn(self.question, image_tokens=embeds.shape[1]) + self.word_ids[:-1]
        input_ids = torch.tensor([ids] * len(pixels), device=model.device)
        inputs_embeds = model.splice_image_embeddings(input_ids, embeds, self.image_token_id)
        hidden = model.llm_hidden_states(inputs_embeds).last_hidden_state[:, -len(self.word_ids):]
        logits = model.llm.get_output_embeddings()(hidden).float()
        word = torch.tensor(self.word_ids, device=logits.device)
        logp = logits.log_softmax(-1).gather(-1, word.expand(len(pixels), -1)[..., None])[..., 0]
        return logp.sum(dim=1, keepdim=True)


def understanding_encoder(model: nn.Module) -> nn.Module:
    """The encoder Harmon's understanding path runs: a decoupled ``understanding_encoder`` when the model has one,
    else the shared MAR encoder."""
    decoupled = getattr(model, "understanding_encoder", None)
    return decoupled if isinstance(decoupled, nn.Module) else model.encoder


@contextmanager
def understanding_tap(model: nn.Module) -> Iterator[tuple[nn.Module, int]]:
    """(module to hook, leading buffer slots) for the token features of Harmon's understanding path.

    A token encoder (MAR) is hooked itself: the model calls its ``forward``, whose output is ``(B, K + m*n, D)``. A
    pixel encoder's features come out of its ``encode`` method, which no module hook sees; for the duration of the
    block its ``encode`` output is routed through an ``nn.Identity`` tap (an instance attribute shadowing the
    method, removed afterwards), so that ``model.image_embeddings`` itself stays the scored path."""
    encoder = understanding_encoder(model)
    if not reads_pixels(encoder):
        yield encoder, int(encoder.buffer_size)
        return
    tap = nn.Identity()
    original = encoder.encode
    encoder.encode = lambda pixels: tap(original(pixels))
    try:
        yield tap, 0
    finally:
        del encoder.encode


def resolve_layer(root: nn.Module, dotted: str | None, default: nn.Module) -> nn.Module:
    if not dotted:
        return default
    try:
        return root.get_submodule(dotted)
    except AttributeError as error:
        raise SystemExit(f"--target-layer {dotted!r}: {error}") from error


# ------------------------------------------------------------------------------------------------------ rendering
def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``image (H, W, 3)`` in [0, 1] + ``cam (H, W)`` in [0, 1] -> uint8 RGB heat-map overlay (grad-cam's own)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32), cam.astype(np.float32), use_rgb=True, image_weight=0.5)


def _cell(array: np.ndarray, size: int, caption: str | None = None) -> Image.Image:
    image = Image.fromarray(array if array.dtype == np.uint8 else np.uint8(np.clip(array, 0, 1) * 255))
    image = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    if caption:
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, size, 12], fill=(0, 0, 0))
        draw.text((2, 1), caption[: max(1, size // 6)], fill=(255, 255, 255), font=ImageFont.load_default())
    return image


HEADER = 16


def compose_grid(
    images: np.ndarray,
    columns: dict[str, np.ndarray],
    cell: int = 128,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """A Fig.-2-style grid (hand-written with PIL: a few lines, and its size is exact for the tests): one row per
    image, first column the image, then one overlay column per entry of ``columns`` (``name -> cams (B, H, W)``),
    and a ``HEADER``-pixel title strip. Size: ``(cell * (1 + len(columns)), HEADER + cell * B)``."""
    rows = len(images)
    names = ["image", *columns]
    canvas = Image.new("RGB", (cell * len(names), HEADER + cell * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, name in enumerate(names):
        draw.text((j * cell + 3, 2), name[: max(1, cell // 6)], fill=(0, 0, 0), font=font)
    for i in range(rows):
        canvas.paste(_cell(images[i], cell, captions[i] if captions else None), (0, HEADER + i * cell))
        for j, cams in enumerate(columns.values(), start=1):
            canvas.paste(_cell(overlay(images[i], cams[i]), cell), (j * cell, HEADER + i * cell))
    return canvas


def to_display(images: torch.Tensor, size: int) -> np.ndarray:
    """[0, 1] images ``(B, 3, h, w)`` -> ``(B, size, size, 3)`` float numpy, the resolution the maps come in."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=images.shape[-1] > size).clamp(0, 1)
    return resized.permute(0, 2, 3, 1).numpy()


def resize_cams(cams: np.ndarray, size: int) -> np.ndarray:
    """``(B, h, w)`` maps in [0, 1] -> ``(B, size, size)`` (bilinear)."""
    if cams.shape[-2:] == (size, size):
        return cams
    resized = F.interpolate(torch.from_numpy(cams)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].clamp(0, 1).numpy()


# ------------------------------------------------------------------------------------------------------------ CLI
@dataclass
class Column:
    name: str
    cams: np.ndarray
    target: str
    encoder: str
    weights: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gradcam", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--encoder", nargs="+", help="registered encoder name(s), one overlay column each")
    parser.add_argument("--weights", nargs="+", default=None,
                        help="one per encoder (or one for all): HarmonPipeline / HarmonModel folder, the encoder's "
                             "own weights, or 'random'")
    parser.add_argument("--encoder-config", nargs="+", default=None,
                        help="JSON overrides for ENCODERS.create, one per encoder (or one for all)")
    parser.add_argument("--probe", nargs="+", default=None,
                        help="one probe .pt per encoder (from experiments.linear_probe); without it a probe is "
                             "fitted first on the bundled --dataset's training split")
    parser.add_argument("--target", nargs="+", choices=("probe", "word"), default=["probe"])
    parser.add_argument("--class-index", type=int, default=None,
                        help="probe target class for every image (default: each image's label, else the prediction)")
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--word", default=None, help="word target: the answer word whose log-probability is explained")
    parser.add_argument("--target-layer", default=None,
                        help="dotted module path to hook instead of the encoder's output tokens, relative to the "
                             "feature wrapper, whose .encoder is the HarmonModel (or the bare encoder), e.g. "
                             "encoder.encoder.blocks.0; its output must be (B, K + m*n, D) tokens")
    parser.add_argument("--harmon-encoder", choices=("understanding", "generation"), default="understanding",
                        help="with a Harmon folder: the encoder it understands with (shared MAR, or decoupled) or "
                             "its generation MAR (probe targets)")
    parser.add_argument("--vae", default=None)
    parser.add_argument("--vae-scale", type=float, default=0.2325)
    data = parser.add_argument_group("images")
    data.add_argument("--images", nargs="+", default=None, help="image files")
    data.add_argument("--val-dir", default=None, help="an ImageFolder: the first --num-images images (spread over "
                                                      "classes)")
    data.add_argument("--dataset", choices=BUNDLED_DATASETS, default=None)
    data.add_argument("--limit", type=int, default=None, help="bundled sets: use this many images in total")
    data.add_argument("--num-images", type=int, default=6)
    data.add_argument("--image-size", type=int, default=None, help="override the encoders' input size")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="results/gradcam")
    run.add_argument("--cell-size", type=int, default=128, help="pixels per grid cell")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--fit-probe-epochs", type=int, default=30)
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--smoke", action="store_true",
                     help="tiny random Harmon, 4 digits, a probe fitted on the fly, plus a word target through the "
                          "tiny LLM")
    return parser


def _broadcast(values: Sequence[str] | None, count: int, option: str) -> list[str | None]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise SystemExit(f"{option}: give one value, or one per --encoder ({count})")
    return list(values)


def load_images(args: argparse.Namespace) -> tuple[torch.Tensor, list[int] | None, list[str] | None,
                                                   LabeledImages | None]:
    """[0, 1] images ``(B, 3, S, S)``, their labels (when known), class names, and the bundled training split."""
    size = args.image_size or 256
    if args.images:
        from torchvision.transforms import functional as TF

        pictures = []
        for path in args.images:
            image = Image.open(path).convert("RGB")
            image = TF.center_crop(TF.resize(image, size, antialias=True), size)
            pictures.append(TF.to_tensor(image))
        return torch.stack(pictures), None, None, None
    if args.val_dir:
        split = image_folder_dataset(args.val_dir, size)
        labels = split.labels()
        picks = _spread(labels, args.num_images)
        images = torch.stack([split.dataset[i][0] for i in picks])
        return images, [int(labels[i]) for i in picks], split.classes, None
    if args.dataset:
        train, val = bundled_dataset(args.dataset, seed=0, limit=args.limit)
        labels = val.labels()
        picks = _spread(labels, args.num_images)
        images = torch.stack([val.dataset[i][0] for i in picks])
        return images, [int(labels[i]) for i in picks], val.classes, train
    raise SystemExit("give --images, --val-dir or --dataset")


def _spread(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of ``count`` images, cycling through the classes (the first image of each class, then the second...)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(index)
    picks: list[int] = []
    depth = 0
    while len(picks) < min(count, len(labels)):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(picks) < count:
                picks.append(by_class[label][depth])
        depth += 1
    return picks


def fit_probe(features: TokenFeatures, train: LabeledImages, epochs: int, batch_size: int):
    x, y = extract_pooled_features(features, train, batch_size=batch_size, progress=False)
    result = train_linear_probe(x, y, x[:2], y[:2], num_classes=len(train.classes), epochs=epochs, base_lr=0.5,
                                batch_size=min(64, len(x)), optimizer="sgd", warmup_epochs=1,
                                device=features.device)
    return result.probe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        given = {t.split("=")[0] for t in argv if t.startswith("--")}
        if "--encoder" not in given:
            args.encoder = ["mar-tiny"]
        if not ({"--images", "--val-dir", "--dataset"} & given):
            args.dataset = "digits"
        if "--limit" not in given:
            args.limit = 240
        if "--num-images" not in given:
            args.num_images = 4
        if "--target" not in given:
            args.target = ["probe", "word"]
        if "--word" not in given:
            args.word = "3"
        if "--question" not in given:
            args.question = "Which digit is this?"
        if "--cell-size" not in given:
            args.cell_size = 64
        if "--fit-probe-epochs" not in given:
            args.fit_probe_epochs = 8
        if "--threads" not in given:
            args.threads = 1
    if not args.encoder:
        raise SystemExit("--encoder is required")
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    images, labels, classes, train_split = load_images(args)
    weights_list = _broadcast(args.weights, len(args.encoder), "--weights")
    probes = _broadcast(args.probe, len(args.encoder), "--probe")
    configs = _broadcast(args.encoder_config, len(args.encoder), "--encoder-config")

    columns: list[Column] = []
    for name, weights, probe_path, config in zip(args.encoder, weights_list, probes, configs):
        features = load_encoder(name, weights, vae=args.vae, vae_scale=args.vae_scale, smoke=args.smoke,
                                overrides=json.loads(config) if config else None, image_size=args.image_size,
                                dtype=dtype, harmon_role=args.harmon_encoder).to(device)
        if args.target_layer:  # a layer inside the encoder: gradients must flow through the encoder itself
            features.requires_grad_(True)
        pixels = features.prepare(images.to(device))
        label = features.info["weights"]
        name = features.info["encoder"]  # a Harmon folder's own encoder (mar-b, mar-h, ...), not the flag
        if "probe" in args.target:
            if probe_path:
                probe, record = load_probe(probe_path)
                if record["feature_dim"] != features.hidden_size:
                    raise SystemExit(f"--probe {probe_path} expects {record['feature_dim']}-d features, {name} gives "
                                     f"{features.hidden_size}")
            elif train_split is not None:
                probe = fit_probe(features, train_split, args.fit_probe_epochs, args.batch_size)
            else:
                raise SystemExit(f"{name}: the probe target needs --probe (or a bundled --dataset to fit one)")
            scorer = ProbeClassifier(features, probe.to(device)).eval()
            if args.class_index is not None:
                chosen = [args.class_index] * len(images)
            elif labels is not None:
                chosen = labels
            else:
                with torch.no_grad():
                    chosen = scorer(pixels).argmax(dim=1).tolist()
            layer = resolve_layer(features, args.target_layer, features.tap)
            cams = gradcam_plusplus(scorer, layer, features.reshape_transform, pixels, class_targets(chosen),
                                    args.batch_size)
            columns.append(Column(f"{name} probe", cams, "probe class " + ",".join(map(str, chosen)), name, label))
        if "word" in args.target:
            if not args.word:
                raise SystemExit("the word target needs --word")
            model, tokenizer = features.encoder, features.tokenizer
            if not isinstance(model, HarmonModel) or tokenizer is None:
                raise SystemExit(f"{name}: the word target needs --weights pointing at a HarmonPipeline folder "
                                 "(model + tokenizer)")
            if features.info.get("harmon_encoder") == "generation":
                raise SystemExit("the word target explains the understanding path; with a decoupled model use "
                                 "--harmon-encoder understanding and its understanding encoder's name")
            scorer = WordLogProb(model, tokenizer, args.question, args.word).eval()
            # the LLM stays frozen; gradients must reach the hooked encoder output
            understanding_encoder(model).requires_grad_(True)
            with understanding_tap(model) as (tap, buffer):
                layer = resolve_layer(features, args.target_layer, tap)
                cams = gradcam_plusplus(scorer, layer, grid_reshape(buffer, tuple(pixels.shape[-2:])), pixels,
                                        class_targets([0] * len(images)), args.batch_size)
            model.requires_grad_(False)
            columns.append(Column(f"{name} '{args.word}'", cams, f"log p({args.word!r} | image, "
                                                                  f"{args.question!r})", name, label))
        del features

    size = max(c.cams.shape[-1] for c in columns)  # encoders differ in input size: show every map at the largest
    for column in columns:
        column.cams = resize_cams(column.cams, size)
    display = to_display(images, size)
    captions = [classes[i] if classes else str(i) for i in labels] if labels is not None else None
    paths = {}
    for column in columns:
        grid = compose_grid(display, {column.name: column.cams}, args.cell_size, captions)
        paths[column.name] = output / f"gradcam_{slug(column.name)}.png"
        grid.save(paths[column.name])
    grid_path = output / "gradcam_grid.png"
    compose_grid(display, {c.name: c.cams for c in columns}, args.cell_size, captions).save(grid_path)
    np.savez_compressed(output / "cams.npz", **{slug(c.name): c.cams for c in columns})
    save_json({"columns": [{"name": c.name, "encoder": c.encoder, "weights": c.weights, "target": c.target,
                            "png": str(paths[c.name])} for c in columns],
               "grid": str(grid_path), "images": len(images), "cell_size": args.cell_size},
              output / "gradcam.json")
    report(columns, len(images), grid_path, paths, output, smoke=args.smoke)
    return {"grid": grid_path, "pngs": paths, "columns": columns, "num_images": len(images),
            "cell_size": args.cell_size}


def report(columns: list[Column], num_images: int, grid_path: Path, paths: dict, output: Path, smoke: bool) -> None:
    """Say what the run explained and where it wrote it (stdout)."""
    untrained = smoke and all(str(c.weights).startswith("random") for c in columns)
    print(f"Grad-CAM++ of {num_images} images, {len(columns)} column(s)"
          + (" (--smoke, random weights: the maps show the mechanics, not a trained encoder)" if untrained else ""))
    for column in columns:
        print(f"  {column.name}: {column.target}; encoder weights {column.weights} -> {paths[column.name]}")
    print(f"  all columns: {grid_path}; maps: {output / 'cams.npz'}; record: {output / 'gradcam.json'}")


if __name__ == "__main__":
    main()

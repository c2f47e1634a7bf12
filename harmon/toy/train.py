"""Train harmon-toy from scratch: data → toy VAE → the three-stage recipe (with a reading warm-up, an answers stage
a drawing stage and a colour stage) on the project's training engine.

    harmon toy train --out runs/harmon-toy                 # the shipped weights' recipe (see docs/toy.md)
    python -m harmon.toy.train --out runs/harmon-toy --threads 2

1. the training split (:func:`harmon.toy.data.write_dataset`) is written under ``OUT/data`` in the engine's
   caption / LLaVA / text layouts;
2. the preset's KL VAE is trained on those images (:mod:`harmon.toy.vae`) and ``vae_scale`` measured;
3. a ``harmon-toy`` model (random init, the trained VAE, the toy tokenizer) is saved as ``OUT/init``;
4. ``harmon/toy/recipes/reading.yaml`` (the toy's reading warm-up in place of the paper's stage I: digit
   questions only, as its LLM starts from nothing), ``stage2.yaml``, ``stage3.yaml``, ``answers.yaml`` (image →
   text on every question kind), ``drawing.yaml`` (text → image with the understanding path frozen) and
   ``colour.yaml`` (the caption's colour asked of MAR's first step, image → text rehearsed) run one
   after the other with :func:`harmon.training.train`, each from the previous one's export;
5. the last export is written as an fp16 pipeline folder ``OUT/harmon-toy`` (what the package ships) and the
   timings go to ``OUT/train_info.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).with_name("recipes")
STAGES = ("reading", "stage2", "stage3", "answers", "drawing", "colour")
"""The recipes run in order (``recipes/<name>.yaml``), each from the previous one's export."""


@dataclass
class ToyTrainSettings:
    """What a run changes; the defaults are the shipped weights' run."""

    seed: int = 0
    num_images: int = 8000
    vae_steps: int = 800
    stage_steps: tuple[int, ...] | None = None  # one per STAGES entry, in order; None: the recipes'
    threads: int | None = 2
    overrides: list[str] = field(default_factory=list)  # extra -o KEY=VALUE for every stage
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # extra KEY=VALUE for one stage (by name)
    visual_grad_scale: float | None = None  # over the preset's (1.0) when given
    tie_word_embeddings: bool | None = None  # over the preset's (tied, as Qwen2.5) when given; see docs/toy.md
    vae_from: str | Path | None = None  # a trained toy VAE to reuse (a pipeline folder or "harmon-toy"), not trained
    diffusion_batch_mul: int | None = None  # over the preset's head (4, MAR's) when given: noise draws per token
    untie_after_reading: bool = False  # tied through the reading warm-up, untied from stage II on; see docs/toy.md


def _log(message: str) -> None:
    print(message, flush=True)


def train_toy(out: str | Path, settings: ToyTrainSettings | None = None, log=_log) -> dict[str, Any]:
    """Run the whole recipe into ``out``; returns (and writes to ``out/train_info.json``) what it measured."""
    from harmon.training.config import load_config
    from harmon.training.trainer import train

    settings = settings or ToyTrainSettings()
    unknown = sorted(set(settings.stage_overrides) - set(STAGES))
    if unknown:
        raise ValueError(f"stage_overrides: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    if settings.stage_steps is not None and len(settings.stage_steps) != len(STAGES):
        raise ValueError(f"stage_steps: {len(settings.stage_steps)} values given, one per stage is needed "
                         f"({', '.join(STAGES)})")
    log = log or (lambda message: None)
    out = Path(out)
    started = time.perf_counter()
    prepared = prepare_toy(out, settings, log)
    info: dict[str, Any] = prepared["info"]
    init = prepared["init"]
    data_dir = prepared["data"]

    previous = init
    info["stages"] = {}
    for i, stage in enumerate(STAGES):
        overrides = [f"output_dir={out / stage}", f"data.root={data_dir}", f"model.pretrained={previous}",
                     f"seed={settings.seed}", *settings.overrides, *settings.stage_overrides.get(stage, [])]
        if settings.stage_steps is not None:
            overrides.append(f"training.max_steps={settings.stage_steps[i]}")
        recipe = load_config(RECIPES / f"{stage}.yaml", overrides=overrides)
        stage_started = time.perf_counter()
        result = train(recipe)
        seconds = time.perf_counter() - stage_started
        last = result.history[-1] if result.history else {}
        info["stages"][stage] = {"steps": result.step, "seconds": seconds,
                                 "last": {k: v for k, v in last.items() if k.startswith("loss/")}}
        log(f"stage {stage}: {result.step} steps in {seconds:.0f} s; last losses {info['stages'][stage]['last']}")
        previous = result.export_dir / "harmon_model"
        if stage == "reading" and settings.untie_after_reading:
            previous = untie_word_embeddings(previous, out / "reading-untied")
            log(f"untied the word embeddings: {previous}")

    shipped = write_shipped_folder(result.export_dir / "harmon_model", out / "harmon-toy")
    info["shipped_folder"] = str(shipped)
    info["shipped_bytes"] = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    info["total_seconds"] = time.perf_counter() - started
    (out / "train_info.json").write_text(json.dumps(info, indent=1, default=str))
    log(f"done in {info['total_seconds']:.0f} s; pipeline folder {shipped} ({info['shipped_bytes'] / 1e6:.2f} MB)")
    return info


def prepare_toy(out: str | Path, settings: ToyTrainSettings | None = None, log=_log) -> dict[str, Any]:
    """Steps 1-3 of :func:`train_toy`: the training split under ``out/data``, the toy VAE trained on it and
    ``vae_scale`` measured, the random-init model saved as ``out/init``. Returns ``data`` and ``init`` (folders),
    ``vae_state`` and ``vae_scale`` (for building other models on the same VAE) and ``info`` (what it measured)."""
    import torch

    from harmon.configs import HarmonConfig
    from harmon.model import HarmonModel
    from harmon.toy.data import pixels, render, scenes, write_dataset
    from harmon.toy.tokenizer import toy_tokenizer
    from harmon.toy.vae import latent_scale, reconstruction_mse, train_vae

    settings = settings or ToyTrainSettings()
    log = log or (lambda message: None)
    out = Path(out)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    info: dict[str, Any] = {"settings": {**settings.__dict__, "stage_steps": settings.stage_steps},
                            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    started = time.perf_counter()

    data_dir = write_dataset(out / "data", settings.num_images, "train", settings.seed)
    info["data_seconds"] = time.perf_counter() - started
    log(f"data: {settings.num_images} canvases in {data_dir} ({info['data_seconds']:.0f} s)")

    torch.manual_seed(settings.seed)
    config = HarmonConfig.from_preset("harmon-toy")
    model = HarmonModel.from_config(config)
    train_scenes = scenes(settings.num_images, "train", settings.seed)
    images = torch.from_numpy(pixels([render(s) for s in train_scenes]))
    if settings.vae_from is not None:  # Harmon's own setting: a pretrained tokenizer, frozen
        info["vae"] = {"from": str(settings.vae_from), **load_toy_vae(model.vae, settings.vae_from)}
    else:
        info["vae"] = train_vae(model.vae, images, steps=settings.vae_steps, seed=settings.seed, log=log)
    held_out = torch.from_numpy(pixels([render(s) for s in scenes(256, "test", settings.seed)]))
    info["vae"]["held_out_mse"] = reconstruction_mse(model.vae, held_out)
    scale = latent_scale(model.vae, images)
    info["vae"]["vae_scale"] = scale
    model.vae.requires_grad_(False)
    # the preset with the measured scale; the fresh modules keep their init, the VAE its training
    vae_state = model.vae.state_dict()
    torch.manual_seed(settings.seed)
    update = {"vae_scale": scale}
    if settings.visual_grad_scale is not None:
        update["visual_grad_scale"] = settings.visual_grad_scale
    if settings.diffusion_batch_mul is not None:
        update["head"] = with_config(config.head, diffusion_batch_mul=settings.diffusion_batch_mul)
    if settings.tie_word_embeddings is not None:
        update["backbone"] = with_config(config.backbone, tie_word_embeddings=settings.tie_word_embeddings)
    model = HarmonModel.from_config(config.model_copy(update=update))
    model.vae.load_state_dict(vae_state)
    init = out / "init"
    model.save_pretrained(init)
    toy_tokenizer().save_pretrained(str(init))
    log(f"vae: held-out mse {info['vae']['held_out_mse']:.5f}, vae_scale {scale:.4f}")
    return {"data": data_dir, "init": init, "vae_state": vae_state, "vae_scale": scale, "info": info}


def with_config(spec, **values):
    """A component spec (``HarmonConfig.head``, ``.backbone``, ...) with ``values`` over its config overrides."""
    return spec.model_copy(update={"config": {**spec.config, **values}})


def untie_word_embeddings(model_folder: str | Path, folder: str | Path) -> Path:
    """The ``HarmonModel`` of ``model_folder`` with its LLM's input and output word embeddings made two parameters
    (both start as the tied matrix), saved with its tokenizer to ``folder``. Nothing else changes: the other weights
    load strictly into the untied model."""
    import shutil

    from harmon.model import HarmonModel

    model_folder, folder = Path(model_folder), Path(folder)
    tied = HarmonModel.from_pretrained(model_folder)
    if tied.config.backbone.config.get("tie_word_embeddings") is False:
        raise ValueError(f"untie_word_embeddings: {model_folder} is untied already")
    config = tied.config.model_copy(update={"backbone": with_config(tied.config.backbone, tie_word_embeddings=False)})
    untied = HarmonModel.from_config(config)
    untied.load_state_dict(tied.state_dict(), strict=True)  # the tied matrix fills both embeddings
    untied.save_pretrained(folder)
    for file in model_folder.iterdir():  # the tokenizer and chat template
        if file.is_file() and not (folder / file.name).exists():
            shutil.copy2(file, folder / file.name)
    return folder


def load_toy_vae(vae, source: str | Path) -> dict[str, Any]:
    """Load the trained VAE of ``source`` (a pipeline folder with ``vae/``, or an embedded name such as
    ``"harmon-toy"``) into ``vae`` (the preset's, built from the config), strictly: its architecture must be the
    preset's. Returns the load's seconds."""
    from diffusers import AutoencoderKL

    from harmon.toy import pretrained_folder

    started = time.perf_counter()
    folder = pretrained_folder(str(source)) or Path(source)
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"vae_from: {folder} has no vae/config.json (a pipeline folder, or 'harmon-toy')")
    state = AutoencoderKL.from_pretrained(str(folder / "vae")).float().state_dict()
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    differs = sorted(set(expected).symmetric_difference(state)) + sorted(
        k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if differs:  # checked before loading: load_state_dict would copy the matching tensors before it raised
        raise ValueError(f"vae_from: the VAE in {folder / 'vae'} is not the harmon-toy preset's ({len(differs)} "
                         f"tensors missing, extra or of another shape, e.g. {differs[:3]})")
    vae.load_state_dict(state, strict=True)
    return {"seconds": time.perf_counter() - started}


def write_shipped_folder(model_folder: Path, folder: Path) -> Path:
    """The trained ``HarmonModel`` folder (an export's ``harmon_model/``) as an fp16 pipeline folder (half the
    bytes; loaded back in fp32 by default), written to ``folder`` in the form the package ships it: package data
    only, so without the one-line ``harmon_pipeline.py`` that ``save_pretrained`` adds for diffusers' generic
    loader, and ``model_index.json`` naming the class plainly."""
    import torch
    from transformers import AutoTokenizer

    from harmon.model import HarmonModel
    from harmon.pipelines import HarmonPipeline
    from harmon.pipelines.pipeline_harmon import PIPELINE_MODULE

    model = HarmonModel.from_pretrained(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    HarmonPipeline.from_model(model, tokenizer).to(torch.float16).save_pretrained(str(folder))
    (Path(folder) / f"{PIPELINE_MODULE}.py").unlink()
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = HarmonPipeline.__name__
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m harmon.toy.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/harmon-toy"), help="run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=ToyTrainSettings.num_images)
    parser.add_argument("--vae-steps", type=int, default=ToyTrainSettings.vae_steps)
    parser.add_argument("--stage-steps", type=int, nargs=len(STAGES), metavar=tuple(s.upper() for s in STAGES),
                        help="optimizer steps of the reading warm-up, stages II and III, the answers stage, the "
                        "drawing refinement and the colour stage (default: the recipes')")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--untied-embeddings", action="store_true",
                        help="separate LLM input and output word embeddings (the preset ties them); measured "
                        "trade-off in docs/toy.md")
    parser.add_argument("--vae-from", metavar="FOLDER",
                        help="reuse the trained VAE of a pipeline folder (or 'harmon-toy', the shipped one) instead of "
                        "training one (--vae-steps is then unused)")
    parser.add_argument("--untie-after-reading", action="store_true",
                        help="tie the word embeddings through the reading warm-up, untie them from stage II on")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe field for every stage, e.g. training.micro_batch_size=16")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    train_toy(args.out, settings_from_args(args))
    return 0


def settings_from_args(args: argparse.Namespace) -> ToyTrainSettings:
    """The :class:`ToyTrainSettings` that :func:`build_parser`'s arguments ask for."""
    return ToyTrainSettings(
        seed=args.seed, num_images=args.num_images, vae_steps=args.vae_steps,
        stage_steps=tuple(args.stage_steps) if args.stage_steps else None, threads=args.threads or None,
        overrides=list(args.override), tie_word_embeddings=False if args.untied_embeddings else None,
        untie_after_reading=args.untie_after_reading, vae_from=args.vae_from,
    )


if __name__ == "__main__":
    raise SystemExit(main())

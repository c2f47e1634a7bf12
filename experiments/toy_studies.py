"""The paper's training studies in miniature on harmon-toy (issue 15), over several seeds, on a CPU.

    python -m experiments.toy_studies --out runs/toy_studies --seeds 0 1 2 --steps 1500

Variants (Harmon, arXiv 2503.21979):

* ``unified``   — text : image→text : text→image = 1 : 3 : 8 (the toy's stage-II mix), shared MAR encoder;
* ``gen_only``  — text→image only (Fig. 6 a, b: what understanding data adds to generation);
* ``und_only``  — image→text only (Fig. 6 a, b: what generation data adds to understanding);
* ``decoupled`` — the unified mix with a separately trained understanding encoder (a second MAR encoder of the
  same size, ``understanding_encoder``; Fig. 6 c, d: shared vs decoupled).

For each seed the data (:func:`harmon.toy.data.write_dataset`) and the toy VAE (:func:`harmon.toy.train
.prepare_toy`; frozen in every recipe) are made once and shared by the variants; each variant starts from a
random init seeded by the seed and trains with the toy's stage-II recipe (everything trains) for ``--steps``
steps, changing only ``data.ratios`` (and, for ``decoupled``, the model config). Then, for each:

* toy GenEval (:func:`harmon.toy.eval.geneval`: ``--prompts`` prompts, ``--mar-steps`` MAR steps, CFG 3);
* toy understanding (:func:`harmon.toy.eval.understanding`: ``--canvases`` held-out canvases, exact match);
* a linear probe of each trained encoder: logistic regression on its mean-pooled features of one-digit canvases
  (trained on canvases of the training digit images, scored on canvases of the held-out ones) → the digit; for
  ``decoupled`` both encoders (``generation`` and ``understanding``).

``OUT/results.json`` (every run) and ``OUT/table.md`` (mean ± std over the seeds). Public API only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

VARIANTS = {
    "unified": {"ratios": {"text": 1, "image_to_text": 3, "text_to_image": 8}},
    "gen_only": {"ratios": {"text": 0, "image_to_text": 0, "text_to_image": 1}},
    "und_only": {"ratios": {"text": 0, "image_to_text": 1, "text_to_image": 0}},
    "decoupled": {"ratios": {"text": 1, "image_to_text": 3, "text_to_image": 8}, "decoupled": True},
}
PROBE_TRAIN, PROBE_TEST = 600, 300


def one_digit_canvases(count: int, split: str, seed: int):
    """``count`` one-digit canvases of ``split``'s digit images and their digits."""
    from harmon.toy.data import digit_split, pixels, random_scene, render

    rng = np.random.default_rng((seed, 0x9B0, {"train": 0, "test": 1}[split]))
    pool = digit_split()[split]
    scenes = [random_scene(rng, pool, two_share=0.0) for _ in range(count)]
    labels = np.array([s.digits[0].value for s in scenes])
    return torch.from_numpy(pixels([render(s) for s in scenes])), labels


@torch.no_grad()
def pooled_features(model, images: torch.Tensor, which: str) -> np.ndarray:
    """Mean-pooled features: ``generation`` = the MAR encoder's output on the VAE tokens (nothing masked),
    ``understanding`` = the understanding path's LLM-side embeddings (shared: the same encoder then ``proj_in``)."""
    out = []
    for start in range(0, len(images), 100):
        tokens = model.encode_image(images[start:start + 100])
        if which == "generation":
            features, _ = model.visual_features(tokens)
        else:
            features = model.understanding_embeddings(tokens=tokens)
        out.append(features.float().mean(dim=1).numpy())
    return np.concatenate(out)


def linear_probe(model, seed: int, which: str) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_images, train_labels = one_digit_canvases(PROBE_TRAIN, "train", seed)
    test_images, test_labels = one_digit_canvases(PROBE_TEST, "test", seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(pooled_features(model, train_images, which), train_labels)
    return float(probe.score(pooled_features(model, test_images, which), test_labels))


def initial_model(prepared: dict, seed: int, decoupled: bool, folder: Path,
                  visual_grad_scale: float | None = None) -> Path:
    """The toy preset (random init seeded by ``seed``; with ``decoupled``, a second MAR encoder for understanding;
    ``visual_grad_scale`` over the preset's when given) with the prepared VAE, saved with the toy tokenizer."""
    from harmon.configs import PRESETS, ComponentSpec, HarmonConfig
    from harmon.model import HarmonModel
    from harmon.toy.tokenizer import toy_tokenizer

    overrides: dict = {"vae_scale": prepared["vae_scale"]}
    if visual_grad_scale is not None:
        overrides["visual_grad_scale"] = visual_grad_scale
    if decoupled:
        encoder = PRESETS["harmon-toy"]["encoder"]
        overrides["understanding_encoder"] = ComponentSpec(name=encoder.name, config=dict(encoder.config))
    torch.manual_seed(seed)
    model = HarmonModel.from_config(HarmonConfig.from_preset("harmon-toy", **overrides))
    model.vae.load_state_dict(prepared["vae_state"])
    model.save_pretrained(folder)
    toy_tokenizer().save_pretrained(str(folder))
    return folder


def run_variant(name: str, prepared: dict, seed: int, args, out: Path) -> dict:
    from harmon.pipelines import HarmonPipeline
    from harmon.toy.eval import geneval, understanding
    from harmon.toy.train import RECIPES
    from harmon.training.config import load_config
    from harmon.training.trainer import train

    spec = VARIANTS[name]
    run = out / f"{name}-seed{seed}"
    init = initial_model(prepared, seed, spec.get("decoupled", False), run / "init", args.visual_grad_scale)
    overrides = [f"output_dir={run / 'train'}", f"data.root={prepared['data']}", f"model.pretrained={init}",
                 f"seed={seed}", f"training.max_steps={args.steps}", f"data.ratios={json.dumps(spec['ratios'])}",
                 "training.log_every=100",
                 # the paper's losses only: the studies compare Harmon's recipe, measured before the toy's
                 # condition probes existed (and an understanding-only variant has no text→image batch to probe)
                 "condition_probes=null"]
    started = time.perf_counter()
    result = train(load_config(RECIPES / "stage2.yaml", overrides=overrides))
    row: dict = {"variant": name, "seed": seed, "train_seconds": time.perf_counter() - started}
    pipe = HarmonPipeline.from_pretrained(result.export_dir)
    pipe.set_progress_bar_config(disable=True)
    generated = geneval(pipe, args.prompts, seed=seed, num_inference_steps=args.mar_steps)
    row.update({f"geneval/{k}": v for k, v in generated.scores.items()})
    row.update({f"understanding/{k}": v for k, v in understanding(pipe, args.canvases, seed=seed).scores.items()})
    model = pipe.model.eval()
    row["probe/generation_encoder"] = linear_probe(model, seed, "generation")
    row["probe/understanding_path"] = linear_probe(model, seed, "understanding")
    return row


def table(rows: list[dict], keys: list[str], variants=tuple(VARIANTS), label: str = "variant") -> str:
    """Mean ± std over the seeds of each variant's ``keys`` as a markdown table."""
    lines = [f"| {label} | {' | '.join(keys)} |", f"|---|{'---|' * len(keys)}"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        cells = [f"{np.mean([r[k] for r in mine]):.3f} ± {np.std([r[k] for r in mine]):.3f}" for k in keys]
        lines.append(f"| {name} (n={len(mine)}) | {' | '.join(cells)} |")
    return "\n".join(lines)


def run_grid(args, run_one, one_vae: bool = False) -> list[dict]:
    """Every ``(seed, variant)`` of ``args.seeds × args.variants`` not yet in ``args.out/results.json``:
    :func:`~harmon.toy.train.prepare_toy` once per seed (or, with ``one_vae``, once for all: the first seed's), then
    ``run_one(variant, prepared, seed, args, out)`` → a row, saved after each run (a rerun resumes)."""
    from harmon.toy.train import ToyTrainSettings, prepare_toy

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.is_file() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    shared = None
    for seed in args.seeds:
        prepared = shared
        for name in args.variants:
            if (name, seed) in done:
                continue
            if prepared is None:
                settings = ToyTrainSettings(seed=seed, num_images=args.num_images, vae_steps=args.vae_steps,
                                            threads=args.threads, vae_from=args.vae_from)
                prepared = prepare_toy(out / f"prepared-seed{seed}", settings)
                shared = prepared if one_vae else None
            row = run_one(name, prepared, seed, args, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
            results_path.write_text(json.dumps({"settings": vars(args) | {"out": str(out)}, "rows": rows},
                                               indent=1, default=str))
    return rows


def grid_parser(description: str, out: str, variants: tuple[str, ...]) -> argparse.ArgumentParser:
    """The arguments every :func:`run_grid` script takes (output folder, seeds, variants, steps, data, threads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--steps", type=int, default=1500, help="training steps per variant")
    parser.add_argument("--canvases", type=int, default=50, help="toy understanding canvases")
    parser.add_argument("--num-images", type=int, default=8000, help="training canvases")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-from", metavar="FOLDER", default=None,
                        help="reuse this pipeline folder's trained VAE (or 'harmon-toy', the shipped one) for every "
                        "seed instead of training one per seed")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = grid_parser(__doc__.splitlines()[0], "runs/toy_studies", VARIANTS)
    parser.add_argument("--prompts", type=int, default=40, help="toy GenEval prompts")
    parser.add_argument("--mar-steps", type=int, default=16)
    parser.add_argument("--visual-grad-scale", type=float, default=None,
                        help="the understanding gradient into the shared encoder (default: the preset's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_grid(args, run_variant)
    keys = ["geneval/overall", "geneval/single_object", "geneval/colors", "geneval/position",
            "understanding/overall", "understanding/digit", "probe/generation_encoder", "probe/understanding_path"]
    text = table(rows, keys)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

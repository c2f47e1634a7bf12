"""Linear probing of a frozen visual encoder (Harmon, arXiv 2503.21979, Sec. 3 / Fig. 2; MAE's protocol).

One pass of the frozen encoder turns every image into a pooled feature -- MAR: the mean over the image tokens with the
buffer slots excluded; SigLIP: the mean over its patch tokens; VAE / VQGAN: the mean over the latent grid -- and the
features are cached on disk, so every head (each base LR x epochs x seed) trains on the same cache. The head is MAE's
``BatchNorm1d(affine=False) + Linear``, trained with LARS (MAE) or SGD, ``lr = base_lr * batch / 256``, a linear
warm-up and a half-cosine decay; the last epoch's head is evaluated (top-1 / top-5).

    # the MAR encoder of a converted Harmon (a HarmonPipeline folder), on an ImageFolder split, on a GPU
    python -m experiments.linear_probe --encoder mar-h --weights harmon-1.5b \\
        --train-dir imagenet/train --val-dir imagenet/val --device cuda --dtype bf16 --batch-size 256 --workers 16 \\
        --optimizer lars --base-lr 0.1 --epochs 90 --warmup-epochs 10 --probe-batch-size 16384
    # a bundled set (scikit-learn digits upsampled to the encoder's input size), random-init encoder
    python -m experiments.linear_probe --encoder mar-b --dataset digits
    python -m experiments.linear_probe --smoke            # tiny, CPU, seconds

Outputs under ``--output-dir`` (default ``results/linear_probe``): ``runs/<run>.csv`` (one row per head),
``results.csv`` + ``results.md`` (every run in the folder), ``probes/<run>__*.pt`` (trained heads, for
``experiments.gradcam --probe``) and ``cache/`` (pooled features).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from experiments.common import (
    BUNDLED_DATASETS,
    Timer,
    bundled_dataset,
    cache_key,
    cached,
    extract_pooled_features,
    image_folder_dataset,
    load_encoder,
    probe_checkpoint,
    read_csv,
    resolve_device,
    resolve_dtype,
    torch_threads,
    slug,
    train_linear_probe,
    write_csv,
    write_markdown_table,
)

COLUMNS = [
    "encoder", "weights", "dataset", "pool", "feature_dim", "n_train", "n_val", "num_classes", "optimizer",
    "base_lr", "lr", "batch_size", "epochs", "warmup_epochs", "weight_decay", "seed", "top1", "top5", "train_top1",
    "feature_seconds", "probe_seconds", "features_cached", "probe_path",
]
TABLE_COLUMNS = ["encoder", "weights", "dataset", "feature_dim", "optimizer", "base_lr", "epochs", "seed", "top1",
                 "top5"]
SMOKE = dict(encoder="mar-tiny", dataset="digits", limit=240, epochs=[8], base_lr=[0.5], optimizer="sgd",
             warmup_epochs=1.0, probe_batch_size=32, batch_size=60, threads=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.linear_probe", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--encoder", help="registered encoder name (harmon.ENCODERS.list()); default mar-tiny "
                                          "with --smoke")
    parser.add_argument("--weights", default=None,
                        help="a HarmonPipeline / HarmonModel folder (its MAR encoder), the encoder's own weights "
                             "(file or folder), or 'random' (default)")
    parser.add_argument("--encoder-config", default=None,
                        help="JSON overrides for ENCODERS.create(name, **overrides), e.g. '{\"depth\": 2}'")
    parser.add_argument("--harmon-encoder", choices=("understanding", "generation"), default="understanding",
                        help="with a Harmon folder: the encoder it understands with (the shared MAR, or a decoupled "
                             "understanding encoder) or its generation MAR")
    parser.add_argument("--vae", default=None, help="KL tokenizer for a MAR encoder given by its own weights: an "
                                                    "AutoencoderKL folder or kl16.ckpt")
    parser.add_argument("--vae-scale", type=float, default=0.2325)
    parser.add_argument("--image-size", type=int, default=None, help="override the encoder's input size")
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", default=None, help="ImageFolder of the training split")
    data.add_argument("--val-dir", default=None, help="ImageFolder of the validation split")
    data.add_argument("--dataset", default=None, choices=BUNDLED_DATASETS,
                      help="a bundled set instead of folders: digits (scikit-learn), shapes / quadrants (generated)")
    data.add_argument("--limit", type=int, default=None, help="bundled sets: use this many images in total")
    data.add_argument("--data-seed", type=int, default=0, help="bundled sets: split / generation seed")
    probe = parser.add_argument_group("probe (MAE protocol)")
    probe.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    probe.add_argument("--base-lr", type=float, nargs="+", default=[0.1],
                       help="one head per value (lr = base_lr * probe_batch_size / 256)")
    probe.add_argument("--epochs", type=int, nargs="+", default=[90], help="one head per value")
    probe.add_argument("--warmup-epochs", type=float, default=10)
    probe.add_argument("--weight-decay", type=float, default=0.0)
    probe.add_argument("--momentum", type=float, default=0.9)
    probe.add_argument("--probe-batch-size", type=int, default=16384)
    probe.add_argument("--seeds", type=int, nargs="+", default=[0], help="one head per seed")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="results/linear_probe")
    run.add_argument("--cache-dir", default=None, help="default: OUTPUT_DIR/cache")
    run.add_argument("--no-cache", action="store_true", help="recompute the features, write no cache")
    run.add_argument("--run-name", default=None, help="default: <encoder>__<weights>__<dataset>")
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                     help="encoder precision (the probe always trains in fp32)")
    run.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size")
    run.add_argument("--workers", type=int, default=0, help="data-loader workers")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's; 1 with --smoke: tiny models gain little from a second "
                          "thread and lose a lot on a busy machine)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument("--save-probes", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--smoke", action="store_true",
                     help="tiny random Harmon (mar-tiny), 240 digits, 8 epochs: an end-to-end check in seconds")
    return parser


def apply_smoke(args: argparse.Namespace, argv: list[str]) -> None:
    """--smoke fills every option the command line did not set with the tiny settings."""
    given = {token.split("=")[0].lstrip("-").replace("-", "_") for token in argv if token.startswith("--")}
    for key, value in SMOKE.items():
        if key not in given:
            setattr(args, key, value)
    if "train_dir" in given or "val_dir" in given:
        args.dataset = None


def load_splits(args: argparse.Namespace, image_size: int):
    if args.dataset:
        return bundled_dataset(args.dataset, seed=args.data_seed, limit=args.limit)
    if not (args.train_dir and args.val_dir):
        raise SystemExit("give --train-dir and --val-dir (ImageFolder layout), or --dataset")
    return image_folder_dataset(args.train_dir, image_size), image_folder_dataset(args.val_dir, image_size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args, argv)
    if not args.encoder:
        raise SystemExit("--encoder is required (see harmon.ENCODERS.list())")
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    progress = not args.no_progress
    output = Path(args.output_dir)
    overrides = json.loads(args.encoder_config) if args.encoder_config else {}

    features = load_encoder(
        args.encoder, args.weights, vae=args.vae, vae_scale=args.vae_scale, overrides=overrides, smoke=args.smoke,
        image_size=args.image_size, dtype=dtype, harmon_role=args.harmon_encoder,
    ).to(device)
    train_split, val_split = load_splits(args, features.image_size)
    dataset_name = args.dataset or f"{Path(args.train_dir).name}+{Path(args.val_dir).name}"
    weights_label = features.info["weights"]
    encoder_name = features.info["encoder"]  # a Harmon folder's own encoder (mar-b, mar-h, ...), not the flag
    if encoder_name != args.encoder:
        print(f"--encoder {args.encoder}: {args.weights} holds a {encoder_name} encoder; results name {encoder_name}",
              file=sys.stderr)
    run_name = args.run_name or slug(f"{encoder_name}__{Path(str(weights_label)).name}__{dataset_name}")

    spec = dict(encoder=encoder_name, weights=args.weights, harmon_encoder=args.harmon_encoder, vae=args.vae,
                vae_scale=args.vae_scale,
                overrides=overrides, smoke=args.smoke, image_size=features.image_size, pool=features.pool_mode,
                dtype=args.dtype, dataset=args.dataset, train_dir=args.train_dir, val_dir=args.val_dir,
                limit=args.limit, data_seed=args.data_seed)
    cache_dir = None if args.no_cache else Path(args.cache_dir or output / "cache")
    cache_path = cache_dir / f"{run_name}-{cache_key(spec)}.pt" if cache_dir else None

    def compute() -> dict[str, Any]:
        timer = Timer()
        kwargs = dict(batch_size=args.batch_size, workers=args.workers, progress=progress)
        train_x, train_y = extract_pooled_features(features, train_split, desc=f"{encoder_name} train", **kwargs)
        val_x, val_y = extract_pooled_features(features, val_split, desc=f"{encoder_name} val", **kwargs)
        return {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y,
                "seconds": timer.seconds, "spec": json.dumps(spec, default=str)}

    store, was_cached = cached(cache_path, compute)
    features.cpu()
    del features  # the frozen encoder is no longer needed: every head reads the cached features
    num_classes = len(train_split.classes)

    rows = []
    configs = list(itertools.product(args.base_lr, args.epochs, args.seeds))
    for base_lr, epochs, seed in configs:
        timer = Timer()
        result = train_linear_probe(
            store["train_x"], store["train_y"], store["val_x"], store["val_y"], num_classes=num_classes,
            epochs=epochs, base_lr=base_lr, batch_size=min(args.probe_batch_size, len(store["train_x"])),
            optimizer=args.optimizer, weight_decay=args.weight_decay, momentum=args.momentum,
            warmup_epochs=min(args.warmup_epochs, epochs), seed=seed, device=device, progress=progress,
        )
        probe_path = ""
        if args.save_probes:
            path = output / "probes" / f"{run_name}__lr{base_lr:g}_ep{epochs}_seed{seed}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(probe_checkpoint(result, encoder=encoder_name, weights=str(args.weights or "random"),
                                        classes=list(train_split.classes), pool="mean", dataset=dataset_name),
                       path)
            probe_path = str(path)
        rows.append(dict(
            encoder=encoder_name, weights=weights_label, dataset=dataset_name, pool="mean",
            feature_dim=store["train_x"].shape[1], n_train=len(store["train_x"]), n_val=len(store["val_x"]),
            num_classes=num_classes, optimizer=args.optimizer, base_lr=base_lr, lr=result.lr,
            batch_size=min(args.probe_batch_size, len(store["train_x"])), epochs=epochs,
            warmup_epochs=min(args.warmup_epochs, epochs), weight_decay=args.weight_decay, seed=seed,
            top1=result.top1, top5=result.top5, train_top1=result.train_top1,
            feature_seconds=float(store["seconds"]), probe_seconds=timer.seconds, features_cached=was_cached,
            probe_path=probe_path,
        ))
        if progress:
            print(f"{encoder_name} base_lr={base_lr:g} epochs={epochs} seed={seed}: "
                  f"top1={result.top1:.4f} top5={result.top5:.4f}", file=sys.stderr)

    run_csv = write_csv(rows, output / "runs" / f"{run_name}.csv", COLUMNS)
    all_rows = [row for path in sorted((output / "runs").glob("*.csv")) for row in read_csv(path)]
    results_csv = write_csv(all_rows, output / "results.csv", COLUMNS)
    results_md = write_markdown_table(
        all_rows, output / "results.md", TABLE_COLUMNS, title="Linear probe",
        notes="Frozen encoder, pooled features (MAR: mean over image tokens, buffer excluded; SigLIP: mean; "
              "VAE / VQGAN: mean over the latent grid), BatchNorm1d(affine=False) + Linear, last-epoch head. "
              "Top-5 is capped at the number of classes. Generated by experiments/linear_probe.py.",
    )
    return {"rows": rows, "run_csv": run_csv, "results_csv": results_csv, "results_md": results_md,
            "cache": cache_path, "features_cached": was_cached}


if __name__ == "__main__":
    main()

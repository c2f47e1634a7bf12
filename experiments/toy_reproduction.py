"""A toy reproduction of Harmon's preliminary study (arXiv 2503.21979, Sec. 3, Fig. 2), offline, on CPU, in minutes.

The question the paper asks: which generation-oriented visual encoder yields features that understand images? It
compares VQGAN, the KL VAE and MAR (masked autoregression over the VAE's latents) by linear probing and Grad-CAM++.
Here everything is tiny and trained from scratch on real images shipped with scikit-learn (``load_digits``: 1797
handwritten 8x8 digits, upsampled to ``--image-size``; nothing is downloaded). For every seed:

1. a **KL-VAE** (diffusers ``AutoencoderKL`` through harmon's ``build_kl_autoencoder``, a 2-level 32-channel config,
   stride 2, ``--latent-channels`` latent channels) is trained by reconstruction (MSE + a small KL term);
2. a **VQ model** (diffusers ``VQModel``, same widths, a ``--codebook-size`` codebook) is trained by reconstruction
   (MSE + codebook / commitment loss, straight-through estimator);
3. a **MAR** (harmon's ``mar-tiny`` encoder and decoder from the registries, overridden to the 8x8 latent grid, with
   harmon's ``mlp-adaln-tiny`` diffusion head) is trained by masked modelling on the frozen VAE's latents (MAR's
   masking: ratio ~ truncated normal on [0.7, 1], diffusion loss on the masked tokens);
4. each encoder -- VAE latents, VQ quantized latents, MAR encoder (over the VAE tokens, buffer excluded), the same MAR
   **untrained** (the floor: what the architecture gives without masked modelling) -- is probed with the linear-probe
   protocol of ``experiments.linear_probe`` on mean-pooled features, together with a probe on the raw pixels for
   reference; the first seed's encoders also get Grad-CAM++ maps of their probe's class.

    python -m experiments.toy_reproduction                  # 3 seeds, a few minutes on 2 CPU cores
    python -m experiments.toy_reproduction --smoke          # 2 seeds, a few steps: an end-to-end check

Outputs under ``--output-dir`` (default ``results/toy_reproduction``): ``runs.csv`` (seed x encoder), ``summary.csv``
+ ``summary.md`` (mean +- std over seeds), ``training.csv`` (final losses, reconstruction error, codebook use per
seed), ``probe_accuracy.png``, ``gradcam.png`` and ``config.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from harmon import DECODERS, ENCODERS, HEADS
from harmon.encoders.vae import KLAutoencoderConfig, build_kl_autoencoder
from experiments.common import (
    KLLatentEncoder,
    LabeledImages,
    LatentMAREncoder,
    ProbeClassifier,
    Timer,
    TokenFeatures,
    VQLatentEncoder,
    bundled_dataset,
    extract_pooled_features,
    markdown_table,
    mean_std,
    resolve_device,
    save_json,
    seed_everything,
    torch_threads,
    train_linear_probe,
    write_csv,
)
from experiments.gradcam import class_targets, compose_grid, gradcam_plusplus, to_display

ENCODER_ORDER = ("vae", "vq", "mar", "mar-random", "pixels")
DESCRIPTIONS = {
    "vae": "KL-VAE posterior mode, mean over the latent grid",
    "vq": "VQ quantized latents, mean over the latent grid",
    "mar": "MAR encoder (masked modelling on VAE tokens), mean over image tokens, buffer excluded",
    "mar-random": "the same MAR, untrained (random init), over the trained VAE's tokens",
    "pixels": "raw pixels (one channel, flattened) - reference, no encoder",
}
SMOKE = dict(seeds=[0, 1], limit=300, vae_steps=3, vq_steps=3, mar_steps=3, probe_epochs=3, gradcam_images=4,
             batch_size=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.toy_reproduction", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0, help="the train/val split (fixed across seeds)")
    parser.add_argument("--limit", type=int, default=None, help="use this many digits in total (default all 1797)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=80)
    parser.add_argument("--vq-steps", type=int, default=80)
    parser.add_argument("--mar-steps", type=int, default=150)
    parser.add_argument("--diffusion-batch-mul", type=int, default=1,
                        help="MAR: repeats of each token row for the diffusion loss (MAR / Harmon use 4; 1 here to fit "
                             "a CPU budget)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the VAE / VQ / MAR training")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="VAE: weight of the KL term (per latent element)")
    parser.add_argument("--mar-width", type=int, default=64)
    parser.add_argument("--mar-depth", type=int, default=2)
    parser.add_argument("--probe-epochs", type=int, default=50)
    parser.add_argument("--probe-base-lr", type=float, default=1.0)
    parser.add_argument("--probe-batch-size", type=int, default=128)
    parser.add_argument("--probe-optimizer", choices=("sgd", "lars"), default="sgd")
    parser.add_argument("--gradcam-images", type=int, default=8, help="0 disables the Grad-CAM++ figure")
    parser.add_argument("--output-dir", default="results/toy_reproduction")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default). Models this small are bound by per-operation "
                             "overhead: a second thread gains little and, on a busy machine, costs several-fold")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 300 digits, 3 steps per model")
    return parser


# ------------------------------------------------------------------------------------------------------- training
def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` random mini-batch index tensors (reshuffled every epoch)."""
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > count:
            order, position = torch.randperm(count, generator=generator), 0
        yield order[position:position + batch_size]
        position += batch_size


def _optimizer(module: nn.Module | list, lr: float, steps: int):
    params = module.parameters() if isinstance(module, nn.Module) else module
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up over 5% of the steps, then half-cosine
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(pixels: torch.Tensor, args, generator: torch.Generator, progress: bool):
    """Reconstruction training of a tiny KL autoencoder; returns it in eval mode and the last losses."""
    config = KLAutoencoderConfig(embed_dim=args.latent_channels, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                 attn_resolutions=(), resolution=args.image_size)
    vae = build_kl_autoencoder(config).to(pixels.device).train()
    opt, schedule = _optimizer(vae, args.lr, args.vae_steps)
    mse = kl = torch.tensor(float("nan"))
    for index in tqdm(list(_batches(len(pixels), args.batch_size, args.vae_steps, generator)), desc="vae",
                      disable=not progress, leave=False):
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return vae.eval(), {"vae_train_mse": mse.item(), "vae_kl_per_dim": kl.item()}


def train_vq(pixels: torch.Tensor, args, generator: torch.Generator, progress: bool):
    """Reconstruction training of a tiny diffusers ``VQModel`` (its quantizer adds the codebook + commitment loss)."""
    from diffusers import VQModel

    vq = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=args.latent_channels, num_vq_embeddings=args.codebook_size,
        vq_embed_dim=args.latent_channels, norm_num_groups=32, sample_size=args.image_size,
    ).to(pixels.device).train()
    opt, schedule = _optimizer(vq, args.lr, args.vq_steps)
    mse = commit = torch.tensor(float("nan"))
    for index in tqdm(list(_batches(len(pixels), args.batch_size, args.vq_steps, generator)), desc="vq",
                      disable=not progress, leave=False):
        x = pixels[index]
        out = vq.decode(vq.encode(x).latents)
        mse = F.mse_loss(out.sample, x)
        commit = out.commit_loss.mean()
        loss = mse + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return vq.eval(), {"vq_train_mse": mse.item(), "vq_commit_loss": commit.item()}


def build_mar(args, grid: tuple[int, int]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Harmon's MAR encoder + decoder (``mar-tiny`` overridden to this grid) and ``mlp-adaln-tiny`` head."""
    width, heads = args.mar_width, max(1, args.mar_width // 16)
    common = dict(depth=args.mar_depth, num_heads=heads, buffer_size=4, base_grid=grid)
    encoder = ENCODERS.create("mar-tiny", token_dim=args.latent_channels, embed_dim=width, **common)
    decoder = DECODERS.create("mar-tiny", encoder_dim=width, embed_dim=width, **common)
    head = HEADS.create("mlp-adaln-tiny", token_dim=args.latent_channels, cond_dim=width, width=width,
                        diffusion_batch_mul=args.diffusion_batch_mul)
    return encoder, decoder, head


def mar_training_mask(batch: int, seq_len: int, generator: torch.Generator, ratio_min: float = 0.7) -> torch.Tensor:
    """MAR's training mask (as ``HarmonModel.random_training_mask``, which needs a whole Harmon model): a ratio drawn
    from N(1, 0.25) truncated to [ratio_min, 1], then the first ceil(L * ratio) positions of a random order per row."""
    ratio = torch.empty(1)
    nn.init.trunc_normal_(ratio, mean=1.0, std=0.25, a=ratio_min, b=1.0, generator=generator)
    count = int(math.ceil(seq_len * float(ratio)))
    orders = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(batch)])
    return torch.zeros(batch, seq_len).scatter_(1, orders[:, :count], 1.0)


def train_mar(tokens: torch.Tensor, args, generator: torch.Generator, progress: bool):
    """Masked modelling on ``tokens (N, m, n, C)``: encoder (seen tokens + buffer) -> decoder -> diffusion loss on the
    masked tokens, each row repeated ``diffusion_batch_mul`` times (as ``HarmonModel.text_to_image_loss``, here
    class-free: no LLM)."""
    count, m, n, channels = tokens.shape
    encoder, decoder, head = build_mar(args, (m, n))
    modules = nn.ModuleList([encoder, decoder, head]).to(tokens.device).train()
    opt, schedule = _optimizer(modules, args.lr, args.mar_steps)
    repeats = head.config.diffusion_batch_mul
    loss = torch.tensor(float("nan"))
    for index in tqdm(list(_batches(count, args.batch_size, args.mar_steps, generator)), desc="mar",
                      disable=not progress, leave=False):
        batch = tokens[index].reshape(len(index), m * n, channels)
        mask = mar_training_mask(len(index), m * n, generator).to(tokens.device)
        z = decoder(encoder(batch, mask, (m, n)), mask, (m, n))
        loss = head.loss(batch.reshape(-1, channels).repeat(repeats, 1), z.reshape(-1, z.shape[-1]).repeat(repeats, 1),
                         mask.reshape(-1).repeat(repeats), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 3.0)
        opt.step()
        schedule.step()
    return encoder.eval(), {"mar_train_loss": loss.item()}


# --------------------------------------------------------------------------------------------------------- study
@torch.no_grad()
def reconstruction_mse(decode, pixels: torch.Tensor) -> float:
    return float(F.mse_loss(decode(pixels), pixels))


def run_seed(seed: int, train: LabeledImages, val: LabeledImages, args, device: torch.device, progress: bool):
    """Train the three encoders for ``seed``, probe all of them; (probe rows, training row, extractors+probes)."""
    timer = Timer()
    generator = seed_everything(seed)
    train_pixels = train.dataset.tensors[0].to(device) * 2 - 1
    val_pixels = val.dataset.tensors[0].to(device) * 2 - 1
    vae, vae_stats = train_vae(train_pixels, args, generator, progress)
    vae_stats["vae_seconds"] = timer.seconds
    vq, vq_stats = train_vq(train_pixels, args, generator, progress)
    vq_stats["vq_seconds"] = timer.seconds - vae_stats["vae_seconds"]
    with torch.no_grad():
        latents = vae.encode(train_pixels).latent_dist.mode()
        scale = float(1.0 / latents.std())  # as Harmon's vae_scale: latents to about unit variance
        tokens = (latents * scale).permute(0, 2, 3, 1).contiguous()
        vq_val = VQLatentEncoder(vq).quantize(val_pixels)[1]
    mar_timer = Timer()
    mar, mar_stats = train_mar(tokens, args, generator, progress)
    mar_stats["mar_seconds"] = mar_timer.seconds
    torch.manual_seed(seed + 10_000)
    mar_random = build_mar(args, tuple(tokens.shape[1:3]))[0].to(device).eval()

    size = args.image_size
    extractors: dict[str, TokenFeatures] = {}
    kl = KLLatentEncoder(vae, scale)
    extractors["vae"] = TokenFeatures(kl.encode, kl, hidden_size=kl.hidden_size, image_size=size, name="vae")
    vqe = VQLatentEncoder(vq)
    extractors["vq"] = TokenFeatures(vqe.encode, vqe, hidden_size=vqe.hidden_size, image_size=size, name="vq")
    for name, encoder in (("mar", mar), ("mar-random", mar_random)):
        wrapped = LatentMAREncoder(vae, encoder, scale)
        extractors[name] = TokenFeatures(wrapped.encode, wrapped, hidden_size=wrapped.hidden_size,
                                         buffer_size=wrapped.buffer_size, image_size=size, name=name)
    for extractor in extractors.values():
        extractor.eval().requires_grad_(False)

    training = {
        "seed": seed, "scale": scale, **vae_stats, **vq_stats, **mar_stats,
        "vae_val_mse": reconstruction_mse(lambda x: vae.decode(vae.encode(x).latent_dist.mode()).sample, val_pixels),
        "vq_val_mse": reconstruction_mse(lambda x: vq.decode(vq.encode(x).latents).sample, val_pixels),
        "vq_codes_used_val": int(vq_val.unique().numel()), "codebook_size": args.codebook_size,
        "train_seconds": timer.seconds,
    }

    probe_timer = Timer()
    rows, probes = [], {}
    probe_kwargs = dict(num_classes=len(train.classes), epochs=args.probe_epochs, base_lr=args.probe_base_lr,
                        batch_size=min(args.probe_batch_size, len(train)), optimizer=args.probe_optimizer,
                        warmup_epochs=min(5, args.probe_epochs), seed=seed, device=device)
    feature_sets = {}
    for name, extractor in extractors.items():
        feature_sets[name] = (*extract_pooled_features(extractor, train, batch_size=256, progress=False),
                              *extract_pooled_features(extractor, val, batch_size=256, progress=False))
    # reference: a linear probe on the raw pixels (one channel of the [0, 1] images, flattened)
    feature_sets["pixels"] = (train.dataset.tensors[0][:, 0].flatten(1), train.dataset.tensors[1],
                              val.dataset.tensors[0][:, 0].flatten(1), val.dataset.tensors[1])
    for name in ENCODER_ORDER:
        train_x, train_y, val_x, val_y = feature_sets[name]
        result = train_linear_probe(train_x, train_y, val_x, val_y, **probe_kwargs)
        probes[name] = result.probe
        rows.append({"seed": seed, "encoder": name, "feature_dim": train_x.shape[1], "top1": result.top1,
                     "top5": result.top5, "train_top1": result.train_top1})
    training["probe_seconds"] = probe_timer.seconds
    training["seconds"] = timer.seconds
    return rows, training, extractors, probes


def draw_gradcam(extractors: dict[str, TokenFeatures], probes: dict[str, nn.Module], val: LabeledImages, count: int,
                 path: Path, device: torch.device) -> Path:
    """Grad-CAM++ of each encoder's probe class (the true label) on ``count`` validation digits, one per class."""
    labels = val.dataset.tensors[1]
    picks = [int((labels == c).nonzero()[0]) for c in range(len(val.classes)) if (labels == c).any()][:count]
    images = val.dataset.tensors[0][picks]
    chosen = [int(labels[i]) for i in picks]
    columns = {}
    for name, extractor in extractors.items():
        scorer = ProbeClassifier(extractor, probes[name].to(device)).eval()
        pixels = extractor.prepare(images.to(device))
        columns[name] = gradcam_plusplus(scorer, extractor.tap, extractor.reshape_transform, pixels,
                                         class_targets(chosen))
    display = to_display(images, next(iter(columns.values())).shape[-1])
    compose_grid(display, columns, cell=64, captions=[val.classes[c] for c in chosen]).save(path)
    return path


def plot_summary(summary: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["encoder"] for row in summary]
    means = [row["top1_mean"] for row in summary]
    stds = [row["top1_std"] for row in summary]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.bar(names, means, yerr=stds, capsize=4, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#999999"])
    ax.axhline(0.1, color="k", linestyle=":", linewidth=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("linear-probe top-1 (val)")
    ax.set_title(f"toy study on digits, mean ± std over {summary[0]['seeds']} seeds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        given = {token.split("=")[0].lstrip("-").replace("-", "_") for token in argv if token.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    device = resolve_device(args.device)
    progress = not args.no_progress
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    timer = Timer()

    train, val = bundled_dataset("digits", seed=args.data_seed, limit=args.limit)
    size = args.image_size
    for split in (train, val):  # upsample once: every model here reads image_size x image_size pixels
        images, labels = split.dataset.tensors
        split.dataset = TensorDataset(
            F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1), labels)

    rows, training = [], []
    for i, seed in enumerate(args.seeds):
        seed_rows, seed_training, extractors, probes = run_seed(seed, train, val, args, device, progress)
        rows += seed_rows
        training.append(seed_training)
        if progress:
            line = ", ".join(f"{r['encoder']} {r['top1']:.3f}" for r in seed_rows)
            print(f"seed {seed} ({seed_training['seconds']:.0f} s): {line}", file=sys.stderr)
        if i == 0 and args.gradcam_images > 0:
            draw_gradcam(extractors, probes, val, args.gradcam_images, output / "gradcam.png", device)

    summary = []
    for name in ENCODER_ORDER:
        picked = [r for r in rows if r["encoder"] == name]
        top1, top1_std = mean_std([r["top1"] for r in picked])
        top5, top5_std = mean_std([r["top5"] for r in picked])
        summary.append({"encoder": name, "feature_dim": picked[0]["feature_dim"], "seeds": len(picked),
                        "top1_mean": top1, "top1_std": top1_std, "top5_mean": top5, "top5_std": top5_std,
                        "top1": f"{top1:.3f} ± {top1_std:.3f}", "top5": f"{top5:.3f} ± {top5_std:.3f}",
                        "features": DESCRIPTIONS[name]})
    write_csv(rows, output / "runs.csv", ["seed", "encoder", "feature_dim", "top1", "top5", "train_top1"])
    write_csv(summary, output / "summary.csv",
              ["encoder", "feature_dim", "seeds", "top1_mean", "top1_std", "top5_mean", "top5_std", "features"])
    write_csv(training, output / "training.csv")
    ranking = " > ".join(r["encoder"] for r in sorted(summary, key=lambda r: -r["top1_mean"]))
    text = (
        f"# Toy reproduction: linear probe on digits ({len(train)} train / {len(val)} val, {size}x{size})\n\n"
        f"Seeds {args.seeds}; mean ± std (ddof=1) over seeds; chance = 0.100. Ranking by top-1: {ranking}.\n\n"
        + markdown_table(summary, ["encoder", "feature_dim", "top1", "top5", "features"])
        + "\nTraining (per seed):\n\n"
        + markdown_table(training, ["seed", "vae_val_mse", "vq_val_mse", "vq_codes_used_val", "mar_train_loss",
                                    "seconds"])
        + f"\nTotal {timer.seconds:.0f} s. Generated by `python -m experiments.toy_reproduction "
          f"{' '.join(argv)}`.\n"
    )
    (output / "summary.md").write_text(text)
    plot_summary(summary, output / "probe_accuracy.png")
    save_json({**vars(args), "seconds": timer.seconds}, output / "config.json")
    return {"rows": rows, "summary": summary, "training": training, "output": output, "seconds": timer.seconds}


if __name__ == "__main__":
    main()

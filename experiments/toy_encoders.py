"""Encoder choice for understanding on harmon-toy (paper Table 6 in miniature), over several seeds, on a CPU.

    python -m experiments.toy_encoders --out runs/toy_encoders --seeds 0 1 2 --steps 1500 --one-vae

Harmon's Table 6 feeds the LLM the features of different visual encoders and compares understanding. Here every
variant learns the one skill the toy finds hard, reading which digit a canvas shows: the toy's reading warm-up
recipe (``harmon/toy/recipes/reading.yaml``: the digit questions only, everything but the VAE trains) for
``--steps`` steps from a random init seeded by the seed, the toy VAE frozen; only the understanding encoder
changes:

* ``mar`` — the shared MAR encoder over the VAE tokens (Harmon's design; trained by understanding alone here);
* ``vae`` — the toy VAE's latent tokens themselves, no encoder in between (``toy-latents``: a decoupled token
  encoder that returns the tokens, so the LLM reads them through ``understanding_proj_in``);
* ``vq`` — the same latents snapped to the nearest of ``--codebook`` k-means codes fitted on the training
  canvases' latents (``toy-latents`` with a codebook). No VQ tokenizer is trained for the toy: this is a
  stand-in for a VQGAN's discrete bottleneck on the same features, not a VQGAN.

For each: the toy understanding benchmark (:func:`harmon.toy.eval.understanding`, ``--canvases`` held-out
canvases, exact match, per question kind) and a linear probe of the LLM-side embeddings (mean-pooled, one-digit
canvases, :func:`experiments.toy_studies.linear_probe`). ``OUT/results.json`` (every run) and ``OUT/table.md``
(mean ± std over the seeds). Public API only: the two encoders are registered as plugins
(:func:`register_encoders`), as a third party registers its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt
from torch import nn

VARIANTS = ("mar", "vae", "vq")
LATENTS = "toy-latents"


class LatentTokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    token_dim: PositiveInt = 16
    codebook_size: NonNegativeInt = 0  # 0: the latents as they are; K: each snapped to the nearest of K codes


class LatentTokens(nn.Module):
    """A token understanding encoder that returns the VAE tokens (optionally vector-quantized by a fixed
    codebook): ``(B, m, n, C)`` → ``(B, m·n, C)``, no buffer. The codebook is a buffer (saved with the model,
    never trained); :func:`fit_codebook` fills it."""

    config_class = LatentTokensConfig
    buffer_size = 0

    def __init__(self, config: LatentTokensConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = config or LatentTokensConfig(**kwargs)
        self.token_dim = self.hidden_size = self.config.token_dim
        self.register_buffer("codebook", torch.zeros(self.config.codebook_size, self.config.token_dim))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1, 2)
        if not self.config.codebook_size:
            return flat
        nearest = torch.cdist(flat.float(), self.codebook.float()[None].expand(flat.shape[0], -1, -1)).argmin(-1)
        return self.codebook[nearest].to(flat.dtype)


def register_encoders() -> None:
    """Register ``toy-latents`` in the encoder registry (idempotent; called by the runs, not at import, so that
    importing this module leaves the registry as it was)."""
    from harmon.registry import ENCODERS

    ENCODERS.register(LATENTS, override=True)(LatentTokens)


def fit_codebook(model, size: int, seed: int, canvases: int = 2000) -> torch.Tensor:
    """``size`` k-means centres (scikit-learn) of the VAE tokens of ``canvases`` training canvases."""
    from sklearn.cluster import MiniBatchKMeans

    from harmon.toy.data import pixels, render, scenes

    images = torch.from_numpy(pixels([render(s) for s in scenes(canvases, "train", seed)]))
    with torch.no_grad():
        tokens = torch.cat([model.encode_image(images[i:i + 200]) for i in range(0, len(images), 200)])
    flat = tokens.reshape(-1, tokens.shape[-1]).numpy()
    kmeans = MiniBatchKMeans(n_clusters=size, random_state=seed, n_init=3, batch_size=4096).fit(flat)
    return torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))


def initial_model(prepared: dict, seed: int, variant: str, codebook: int, folder: Path) -> Path:
    """The toy preset (random init seeded by ``seed``) with the prepared VAE and, for ``vae`` / ``vq``, the
    ``toy-latents`` understanding encoder; saved with the toy tokenizer."""
    from harmon.configs import ComponentSpec, HarmonConfig
    from harmon.model import HarmonModel
    from harmon.toy.tokenizer import toy_tokenizer

    overrides: dict = {"vae_scale": prepared["vae_scale"]}
    if variant != "mar":
        size = codebook if variant == "vq" else 0
        overrides["understanding_encoder"] = ComponentSpec(name=LATENTS, config={"codebook_size": size})
    torch.manual_seed(seed)
    model = HarmonModel.from_config(HarmonConfig.from_preset("harmon-toy", **overrides))
    model.vae.load_state_dict(prepared["vae_state"])
    if variant == "vq":
        model.core.understanding_encoder.codebook.copy_(fit_codebook(model, codebook, seed))
    model.save_pretrained(folder)
    toy_tokenizer().save_pretrained(str(folder))
    return folder


def run_variant(variant: str, prepared: dict, seed: int, args, out: Path) -> dict:
    from experiments.toy_studies import linear_probe
    from harmon.pipelines import HarmonPipeline
    from harmon.toy.eval import understanding
    from harmon.toy.train import RECIPES
    from harmon.training.config import load_config
    from harmon.training.trainer import train

    run = out / f"{variant}-seed{seed}"
    init = initial_model(prepared, seed, variant, args.codebook, run / "init")
    overrides = [f"output_dir={run / 'train'}", f"data.root={prepared['data']}", f"model.pretrained={init}",
                 f"seed={seed}", f"training.max_steps={args.steps}", "training.log_every=100"]
    started = time.perf_counter()
    result = train(load_config(RECIPES / "reading.yaml", overrides=overrides))
    row: dict = {"variant": variant, "seed": seed, "train_seconds": time.perf_counter() - started}
    pipe = HarmonPipeline.from_pretrained(result.export_dir)
    pipe.set_progress_bar_config(disable=True)
    row.update({f"understanding/{k}": v for k, v in understanding(pipe, args.canvases, seed=seed).scores.items()})
    row["probe/understanding_path"] = linear_probe(pipe.model.eval(), seed, "understanding")
    return row


def main(argv: list[str] | None = None) -> int:
    from experiments.toy_studies import grid_parser, run_grid, table

    parser = grid_parser(__doc__.splitlines()[0], "runs/toy_encoders", VARIANTS)
    parser.add_argument("--one-vae", action="store_true",
                        help="one data set and toy VAE (the first seed's) for every seed: the spread is then over "
                        "model inits and data order only")
    parser.add_argument("--codebook", type=int, default=512, help="k-means codes of the vq variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    register_encoders()
    rows = run_grid(args, run_variant, one_vae=args.one_vae)
    keys = ["understanding/overall", "understanding/digit", "understanding/colour", "understanding/count",
            "probe/understanding_path"]
    text = table(rows, keys, VARIANTS, label="encoder")
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

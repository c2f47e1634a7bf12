"""Condition probes: an auxiliary, training-only loss that asks the MAR decoder's conditions to carry what the caption
says about each image region.

For a text→image micro-batch, the decoder's per-token conditions ``(B, m·n, D)`` (what the diffusion head is
conditioned on) are averaged over each named region of the token grid, and one linear classifier per target reads
each region's average: cross-entropy against the region's labels (``region_labels`` of the caption's annotation,
e.g. ``{"left": {"digit": 3, "colour": 0}}``). Rows whose caption was dropped for classifier-free guidance and
labels that are absent count for nothing (ignored), so the probes only reward conditions that carry the *caption*.
The probes live in the training module, not in the model: they are trained with it, checkpointed with it and never
exported. :meth:`ConditionProbes.mask_regions` also uses their regions to change the training mask (a share of the
rows with one region masked whole: ``region_masking`` in the recipe), so that the conditions are trained in the
state MAR's sampling is in when it draws a region's first token.

Why: the diffusion loss gives a word that only changes fine shape (the toy's digit value, beside its colour and
side) so weak a gradient that a small model from scratch never routes it to the conditions (measured on harmon-toy:
after 2700 text→image steps, replacing the digit word changes the diffusion loss by < 1e-4); a classifier on the
conditions makes that routing a direct target. Written by hand: it is a few lines over ``nn.Linear`` and
``F.cross_entropy``; no library has Harmon's condition layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harmon.training.collator import IGNORE_INDEX


def region_weights(
    regions: dict[str, tuple[float, float, float, float]], grid: tuple[int, int]
) -> torch.Tensor:
    """``(R, m·n)`` averaging weights: row ``r`` is uniform over the tokens whose centres lie in region ``r``'s box
    ``(x0, y0, x1, y1)`` (fractions of the image width and height, half-open)."""
    m, n = grid
    ys = (torch.arange(m, dtype=torch.float32) + 0.5) / m
    xs = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    rows = []
    for name, (x0, y0, x1, y1) in regions.items():
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        if not bool(inside.any()):
            raise ValueError(
                f"condition_probes.regions.{name}: the box {(x0, y0, x1, y1)} holds no token centre of the "
                f"{m}×{n} token grid"
            )
        weights = inside.reshape(-1).float()
        rows.append(weights / weights.sum())
    return torch.stack(rows)


class ConditionProbes(nn.Module):
    """Linear classifiers over region averages of the decoder's conditions (see the module docstring).

    ``regions``: name → box ``(x0, y0, x1, y1)`` in image fractions; ``targets``: name → number of classes;
    ``sources``: target → which conditions its probe reads (a key of the mapping :meth:`forward` is given; targets
    not named read ``"training"``). :meth:`forward` takes conditions ``(B, m·n, D)`` — one tensor for every target,
    or source → tensor —, the grid ``(m, n)`` and labels ``(B, R, T)`` (regions and targets in the order given;
    :data:`~harmon.training.collator.IGNORE_INDEX` where absent) and returns the mean cross-entropy over targets
    (0 when every label is ignored) and the probes' accuracy on the labelled entries; :attr:`last_accuracy` holds
    each target's (detached, NaN when none of its labels was given)."""

    def __init__(
        self,
        width: int,
        regions: dict[str, tuple[float, float, float, float]],
        targets: dict[str, int],
        sources: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not regions or not targets:
            raise ValueError("condition_probes needs at least one region and one target")
        self.regions = {name: tuple(float(v) for v in box) for name, box in regions.items()}
        self.targets = dict(targets)
        unknown = sorted(set(sources or {}) - set(self.targets))
        if unknown:
            raise ValueError(f"condition_probes: sources name no target: {unknown} (the targets: {sorted(self.targets)})")
        self.sources = {name: (sources or {}).get(name, "training") for name in self.targets}
        self.last_accuracy: dict[str, torch.Tensor] = {}
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, int(k)) for name, k in self.targets.items()})
        self._weights: dict[tuple, torch.Tensor] = {}  # per grid, device and dtype: built once, not every step

    def weights(self, grid: tuple[int, int], device, dtype) -> torch.Tensor:
        key = (int(grid[0]), int(grid[1]), torch.device(device), dtype)
        if key not in self._weights:
            self._weights[key] = region_weights(self.regions, key[:2]).to(device=device, dtype=dtype)
        return self._weights[key]

    def mask_regions(
        self, mask: torch.Tensor, grid: tuple[int, int], probability: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``mask (B, m·n)`` (1 = masked) with, for each row with probability ``probability``, one region (chosen
        uniformly) masked whole, as far as the row's count of masked tokens allows; a new tensor. Each row keeps its
        count (the MAR encoder needs the same number of visible tokens in every row): the region's visible tokens
        trade places with masked tokens outside it, chosen at random. Draws from ``generator`` (CPU) the same numbers
        whatever ``probability`` is."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"region masking: the probability must be in [0, 1], got {probability}")
        if mask.dim() != 2 or mask.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"region masking: the mask has shape {tuple(mask.shape)}, expected (batch, "
                             f"{grid[0] * grid[1]}) for the {grid[0]}×{grid[1]} grid")
        batch, length = mask.shape
        chosen = torch.rand(batch, generator=generator) < probability
        region = torch.randint(len(self.regions), (batch,), generator=generator)
        jitter = torch.rand(batch, length, generator=generator)
        members = (self.weights(grid, torch.device("cpu"), torch.float32) > 0)[region].float()  # (B, m·n)
        masked = mask.detach().to("cpu", torch.float32)
        # masked first: the region's tokens, then the tokens masked already, then the rest; random within each
        priority = 2.0 * members + masked + jitter
        order = priority.argsort(dim=1, descending=True)
        counts = masked.sum(dim=1, keepdim=True)
        ranked = (torch.arange(length)[None, :] < counts).float()
        moved = torch.zeros_like(masked).scatter_(1, order, ranked)
        out = torch.where(chosen[:, None], moved, masked)
        return out.to(device=mask.device, dtype=mask.dtype)

    def forward(
        self, conditions: torch.Tensor | dict[str, torch.Tensor], grid: tuple[int, int], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        by_source = conditions if isinstance(conditions, dict) else {s: conditions for s in set(self.sources.values())}
        missing = sorted(set(self.sources.values()) - set(by_source))
        if missing:
            raise ValueError(f"condition probes: no {missing} conditions given (given: {sorted(by_source)})")
        first = next(iter(by_source.values()))
        batch = first.shape[0]
        for tensor in by_source.values():
            if tensor.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"conditions hold {tensor.shape[1]} tokens, the grid {grid[0]}×{grid[1]} has "
                                 f"{grid[0] * grid[1]}")
        expected = (batch, len(self.regions), len(self.targets))
        if tuple(labels.shape) != expected:
            raise ValueError(f"region labels have shape {tuple(labels.shape)}, expected {expected} (batch, regions, targets)")
        weights = self.weights(grid, first.device, first.dtype)
        pooled = {source: torch.einsum("rl,bld->brd", weights, by_source[source])
                  for source in set(self.sources.values())}
        losses, hits, count = [], first.new_zeros(()), 0
        self.last_accuracy = {}
        for t, (name, classifier) in enumerate(self.classifiers.items()):
            target = labels[:, :, t].reshape(-1).to(first.device)
            logits = classifier(pooled[self.sources[name]]).reshape(-1, classifier.out_features).float()
            keep = target != IGNORE_INDEX
            if bool(keep.any()):
                losses.append(F.cross_entropy(logits[keep], target[keep]))
                correct = (logits[keep].argmax(-1) == target[keep]).sum()
                hits = hits + correct
                count += int(keep.sum())
                self.last_accuracy[name] = (correct / keep.sum()).detach()
            else:
                self.last_accuracy[name] = first.new_full((), float("nan"))
        if not losses:  # every caption dropped: no gradient, but keep the probes in the graph (DDP)
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, first.new_zeros(())
        return torch.stack(losses).mean(), (hits / count).detach()

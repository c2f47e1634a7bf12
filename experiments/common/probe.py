"""The MAE linear-probe protocol on cached features: :class:`LinearProbe` (``BatchNorm1d(affine=False)`` +
``Linear``), :func:`train_linear_probe` (SGD or timm's LARS, ``lr = base_lr * batch / 256``, linear warm-up then
half-cosine), :func:`topk_accuracy`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.common.features import TokenFeatures



class LinearProbe(nn.Module):
    """MAE's linear probe: ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weights trunc-normal std 0.01,
    bias 0). The BatchNorm is a parameter-free feature standardization, so the classifier stays linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.float()))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then half-cosine to 0 (MAE's per-iteration schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(probe: LinearProbe, name: str, lr: float, weight_decay: float, momentum: float):
    """``sgd``: torch SGD with momentum. ``lars``: timm's LARS as MAE uses it -- layer-wise trust ratio on the
    weight matrix only (``always_adapt``, so it applies even at weight decay 0), plain momentum SGD for the bias."""
    if name == "sgd":
        return torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        from timm.optim import Lars

        return Lars(
            [
                {"params": [probe.linear.weight], "weight_decay": weight_decay, "always_adapt": True},
                {"params": [probe.linear.bias], "weight_decay": 0.0, "always_adapt": False},
            ],
            lr=lr, momentum=momentum,
        )
    raise SystemExit(f"--optimizer must be sgd or lars, got {name!r}")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k (k is capped at the number of classes, so top-5 of a 4-class task is 1.0)."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hits = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[k] = hits.float().mean().item() if len(labels) else float("nan")
    return out


@dataclass
class ProbeResult:
    probe: LinearProbe
    top1: float
    top5: float
    train_top1: float
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 90,
    base_lr: float = 0.1,
    batch_size: int = 256,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ProbeResult:
    """Train a :class:`LinearProbe` on cached features with MAE's protocol; evaluate top-1 / top-5 on ``val``.

    The absolute learning rate is ``base_lr * batch_size / 256``; the schedule runs per iteration (warm-up over
    ``warmup_epochs`` epochs, then half-cosine). The last epoch's head is evaluated (no selection on ``val``).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], num_classes).to(device)
    lr = base_lr * batch_size / 256
    opt = make_optimizer(probe, optimizer, lr, weight_decay, momentum)
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
    train_x, train_y = train_x.to(device), train_y.to(device)
    history = []
    for epoch in tqdm(range(epochs), desc="probe", disable=not progress, leave=False):
        probe.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        total_loss = 0.0
        for i in range(steps_per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            if len(index) < 2:  # BatchNorm needs two rows in training mode
                continue
            loss = F.cross_entropy(probe(train_x[index]), train_y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item() * len(index)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(train_x)})
    probe.eval()
    with torch.no_grad():
        val_acc = topk_accuracy(probe(val_x.to(device)), val_y.to(device))
        train_acc = topk_accuracy(probe(train_x), train_y, ks=(1,))
    return ProbeResult(probe.cpu(), val_acc[1], val_acc[5], train_acc[1], lr, history)


def probe_checkpoint(result: ProbeResult, **meta: Any) -> dict[str, Any]:
    """A ``torch.load(weights_only=True)``-readable record of a trained probe and what it was trained on."""
    return {"state_dict": result.probe.state_dict(), "feature_dim": result.probe.linear.in_features,
            "num_classes": result.probe.linear.out_features, **meta}


def load_probe(path: str | os.PathLike) -> tuple[LinearProbe, dict[str, Any]]:
    record = torch.load(path, map_location="cpu", weights_only=True)
    probe = LinearProbe(record["feature_dim"], record["num_classes"])
    probe.load_state_dict(record["state_dict"])
    return probe.eval(), record


class ProbeClassifier(nn.Module):
    """pixels -> encoder tokens -> pooled feature -> linear probe logits (the Grad-CAM model of a probe class)."""

    def __init__(self, features: TokenFeatures, probe: LinearProbe) -> None:
        super().__init__()
        self.features = features
        self.probe = probe

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.features.pool(self.features(pixels)))



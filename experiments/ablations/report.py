"""What a study writes: a CSV per variant over steps, a markdown table in the paper's layout, PNG curves.

Written by hand rather than with pandas (not a dependency of the project): the CSV is ``csv.DictWriter`` over the
evaluation rows, the table a few lines of markdown; the plots are matplotlib (Agg backend).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from experiments.ablations.config import Study, VariantPlan
from experiments.ablations.metrics import metric_better, metric_title

LEAD_COLUMNS = ["variant", "stage", "stage_step", "step", "image_size"]


def column_order(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    rest = [k for k in keys if k not in LEAD_COLUMNS]
    evaluated = sorted(k for k in rest if not k.startswith("train/") and k != "eval_seconds")
    train = sorted(k for k in rest if k.startswith("train/"))
    return LEAD_COLUMNS + evaluated + train + [k for k in rest if k == "eval_seconds"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = column_order(rows) if rows else LEAD_COLUMNS
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a variant CSV with numbers as floats (empty cells dropped)."""
    out = []
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if value == "":
                    continue
                try:
                    parsed[key] = float(value) if key not in ("variant", "stage") else value
                except ValueError:
                    parsed[key] = value
            out.append(parsed)
    return out


def final_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last evaluated value of every metric (rows in step order)."""
    values: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key not in LEAD_COLUMNS and key != "eval_seconds" and isinstance(value, (int, float)):
                values[key] = float(value)
    return values


def _format(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return format(value, spec)


def markdown_table(study: Study, plans: list[VariantPlan], finals: dict[str, dict[str, float]], *,
                   smoke: bool, stage_titles: dict[str, str]) -> str:
    """The study's table: one row per variant, the paper's columns, the best value per column in bold."""
    spec = study.table
    headers = [spec.row_header, *spec.cell_columns]
    if spec.stage_marks:
        headers += list(stage_titles.values())
    headers += [c.header for c in spec.columns]
    best: dict[str, float] = {}
    for column in spec.columns:
        values = [finals[p.name].get(column.metric) for p in plans]
        values = [v for v in values if v is not None and math.isfinite(v)]
        better = column.better or metric_better(column.metric)
        if better and len(set(values)) > 1:  # nothing in bold when every variant has the same value
            best[column.metric] = min(values) if better == "lower" else max(values)
    lines = [
        f"**{study.title}** — {spec.caption}" + (" *(smoke run: tiny model, synthetic shapes; not the paper's "
                                                  "numbers)*" if smoke else ""),
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for plan in plans:
        cells = [plan.variant.title(smoke), *(plan.variant.cells.get(h, "") for h in spec.cell_columns)]
        if spec.stage_marks:
            ran = {run.stage for run in plan.runs}
            cells += ["✓" if name in ran else "–" for name in stage_titles]
        for column in spec.columns:
            value = finals[plan.name].get(column.metric)
            text = _format(value, column.format)
            if value is not None and best.get(column.metric) == value:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    arrows = [f"{c.header}: {metric_title(c.metric)} (`{c.metric}`, "
              f"{(c.better or metric_better(c.metric) or 'n/a')} is better)" for c in spec.columns]
    lines += ["", "Columns — " + "; ".join(arrows) + ". Values at each variant's last evaluation; "
              "best in bold; — not measured in this run."]
    return "\n".join(lines) + "\n"


def plot_curves(study: Study, curves: dict[str, list[dict[str, Any]]], metrics: list[str], folder: Path, *,
                titles: dict[str, str], smoke: bool) -> list[Path]:
    """One PNG per metric (a curve per variant over the chain's optimizer steps) and ``curves.png`` with all."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    present = [m for m in metrics if any(m in row for rows in curves.values() for row in rows)]
    written = []

    def draw(ax, metric: str) -> None:
        for name, rows in curves.items():
            points = [(row["step"], row[metric]) for row in rows if metric in row and math.isfinite(row[metric])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=titles.get(name, name))
        better = metric_better(metric)
        ax.set_title(metric_title(metric) + (f" ({better} is better)" if better else ""), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    suffix = " (smoke)" if smoke else ""
    for metric in present:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax, metric)
        fig.suptitle(study.title + suffix, fontsize=9)
        fig.tight_layout()
        path = folder / f"{metric.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if present:
        cols = min(3, len(present))
        rows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, present):
            draw(ax, metric)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        fig.suptitle(study.title + suffix, fontsize=10)
        fig.tight_layout()
        path = folder / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["column_order", "final_values", "markdown_table", "plot_curves", "read_csv", "write_csv"]

"""Harmon's training ablations (arXiv 2503.21979, Tables 6-8 and Figure 6) as configurations of one training
engine: ``python -m experiments.ablations.run --study <name> [--smoke]``. See ``README.md`` in this folder."""

from __future__ import annotations

__all__ = ["config", "evaluation", "metrics", "report", "run"]

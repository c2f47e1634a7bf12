"""Moved: :class:`harmon.core.HarmonCore` (kept importable here for folders saved before the move, whose
``model_index.json`` names ``harmon.pipelines.core``)."""

from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (diffusers' loader looks its base classes up here)

from harmon.core import HarmonCore

__all__ = ["HarmonCore"]

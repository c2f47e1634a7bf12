"""Pipelines: :class:`HarmonPipeline` (diffusers) and its :class:`HarmonCore` component."""

from harmon.pipelines.core import HarmonCore
from harmon.pipelines.pipeline_harmon import HarmonPipeline

__all__ = ["HarmonCore", "HarmonPipeline"]

"""Pipelines: :class:`HarmonPipeline` (diffusers) and its :class:`HarmonProcessor`; the core is
:class:`harmon.core.HarmonCore` (re-exported here)."""

from harmon.core import HarmonCore
from harmon.pipelines.pipeline_harmon import HarmonPipeline
from harmon.pipelines.processing_harmon import HarmonProcessor

__all__ = ["HarmonCore", "HarmonPipeline", "HarmonProcessor"]

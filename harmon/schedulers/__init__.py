"""Noise schedulers (diffusers ``SchedulerMixin``): :class:`ADMScheduler`, the diffusion head's ADM Gaussian
diffusion."""

from harmon.schedulers.scheduling_adm import ADMScheduler, ADMSchedulerOutput

__all__ = ["ADMScheduler", "ADMSchedulerOutput"]

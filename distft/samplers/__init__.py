"""Samplers: which examples make each optimizer step's micro-batches, one file each.

A task names the sampler it needs (`Task.sampler`: `epoch` for one dataset, `mixture` for
several); a privacy component may replace it (DP-SGD samples by Poisson sampling).
"""
from distft.registry import Registry
from distft.samplers.base import Sampler

SAMPLERS: Registry[Sampler] = Registry("sampler")

from distft.samplers import epoch, mixture, poisson  # noqa: E402,F401  (registers them)
from distft.samplers.epoch import EpochBatches  # noqa: E402

__all__ = ["EpochBatches", "SAMPLERS", "Sampler"]

from __future__ import annotations

from typing import Callable, Dict

import torch

from distft.registry import Component


class Privacy(Component):
    """Where privacy plugs in, in the order DESIGN.md gives (privacy before the backend):

    - `sampler(default)`: the sampler's name for this run (DP-SGD needs Poisson sampling);
    - `wrap_model(model)`: before the backend wraps it (per-sample gradients);
    - `optimizer_factory(make)`: decorates the factory the backend calls to build the
      optimizer (noise and per-sample clipping);
    - `metrics()`: numbers to log beside the eval metrics and in the summary (epsilon).
    The backend's capabilities (`Backend.supports`) decide, at config time, which backends
    a privacy choice can run on."""

    def sampler(self, default: str) -> str:
        return default

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def optimizer_factory(self, make: Callable) -> Callable:
        return make

    def metrics(self) -> Dict[str, float]:
        return {}

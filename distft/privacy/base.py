from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from distft.registry import Component


class Privacy(Component):
    """Where privacy plugs in, in the order DESIGN.md gives (privacy before the backend):

    - `sampler(default)`: the sampler's name for this run (DP-SGD needs Poisson sampling);
    - `wrap_model(model)`: before the backend wraps it (per-sample gradients);
    - `optimizer_factory(make)`: decorates the factory the backend calls to build the
      optimizer (noise and per-sample clipping);
    - `backward(losses, optimizer, last)`: with `per_example`, the backward of each
      micro-batch's per-example losses (DP-SGD clips and sums the micro-batch's
      per-example gradients there, so memory holds one micro-batch's at a time);
    - `stop_reason()`: asked before each step; a reason ends the run there (a spent budget);
    - `metrics()`: numbers to log beside the eval metrics and in the summary (epsilon);
    - `card()`: a section for the exported model's README.
    `per_example = True` makes the loop's objective the sum of per-example losses (each
    example's mean over its own targets), the unit DP-SGD clips, and turns off what would
    see more than one example's gradient (the global clip and its logged norm).
    The backend's capabilities (`Backend.supports`) decide, at config time, which backends
    a privacy choice can run on."""

    per_example = False

    def sampler(self, default: str) -> str:
        return default

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def optimizer_factory(self, make: Callable) -> Callable:
        return make

    def backward(self, losses: torch.Tensor, optimizer, last: bool) -> None:
        """With `per_example`: the backward of one micro-batch's per-example losses (and
        whatever clipping it needs), instead of the backend's."""
        raise NotImplementedError(f"privacy={self.name} declares per_example but has no backward")

    def stop_reason(self) -> Optional[str]:
        return None

    def metrics(self) -> Dict[str, float]:
        return {}

    def card(self) -> Optional[str]:
        return None

"""The quadratic pull toward anchor weights that L2-SP and EWC share:

    R(theta) = strength / 2 * sum_i w_i * (theta_i - anchor_i)^2

over the trainable tensors the anchors name (never the task heads: a head is the new
task's own, with nothing earlier to keep). L2-SP weighs every coordinate 1 and anchors at
the stage's starting weights; EWC weighs each by its Fisher information.

Written here rather than taken from a library: Avalanche's and torchtune's versions are
bound to their own loops, and the penalty is a few tensor operations; what matters is
where it enters the loss (distft/regularizers/base.py) and that sharded parameters get
anchors sharded the same way.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from distft.errors import ConfigError
from distft.regularizers.base import Regularizer

def penalized_names(model) -> list:
    """The trainable tensors a penalty covers: every trainable one but the task heads the
    strategies know (distft.strategies.base.head_parameter_names)."""
    from distft.strategies.base import head_parameter_names

    heads = set(head_parameter_names(model))
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in heads]


class AnchoredPenalty(Regularizer):
    """strength/2 * sum w (theta - anchor)^2; subclasses fill `anchors` (and `weights`,
    None for 1) in setup, keyed by parameter name."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.anchors: Dict[str, torch.Tensor] = {}
        self.weights: Optional[Dict[str, torch.Tensor]] = None
        self._placed = False

    def check(self, cfg) -> None:
        if self.cfg.strength < 0:
            raise ConfigError(f"regularizer.strength={self.cfg.strength}: must be >= 0")
        if cfg.backend.name in ("zero1", "zero2", "zero3"):
            raise ConfigError(f"regularizer={self.name} with backend={cfg.backend.name}: DeepSpeed owns the "
                              "parameters and their gradients inside its engine, so a penalty on them is not "
                              "counted once per step there; use backend=ddp, fsdp or single")

    def _place(self, module) -> None:
        """Move anchors (and weights) next to the parameters: on their device, and, for a
        sharded (FSDP2 DTensor) parameter, sharded the same way (collective: every rank
        calls penalty at the same step)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(module.named_parameters())
        for table in (self.anchors, self.weights or {}):
            for name, t in table.items():
                p = params[name]
                if isinstance(p, DTensor):
                    table[name] = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)
                else:
                    table[name] = t.to(p.device, p.dtype)
        self._placed = True

    def penalty(self, model, module):
        if not self.anchors:
            return None
        if not self._placed:
            self._place(module)
        from torch.distributed.tensor import DTensor

        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        total = None
        for name, p in module.named_parameters():
            anchor = self.anchors.get(name)
            if anchor is None:
                continue
            # A sharded parameter: this rank's shard only. Its gradient is the penalty's
            # on that shard, which is all the rank's optimizer needs; the ranks' parts sum
            # to R (the logged loss never includes the penalty).
            d = (local(p) - local(anchor)).float() ** 2
            if self.weights is not None:
                d = d * local(self.weights[name])
            term = d.sum()
            total = term if total is None else total + term
        if total is None:
            return None
        return 0.5 * self.cfg.strength * total


__all__ = ["AnchoredPenalty", "penalized_names"]

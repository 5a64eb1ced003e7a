"""Learning-rate schedules, built from the `scheduler` config node.

The trainer builds `hydra.utils.instantiate(cfg.scheduler, optimizer, total_steps=N)`
where N is the run's number of optimizer steps; a `_target_` whose signature has no
`total_steps` is built without it, so any torch scheduler that takes the optimizer fits
(`scheduler._target_=torch.optim.lr_scheduler.StepLR +scheduler.step_size=100 ...`).
The scheduler is stepped once per optimizer step and its state is checkpointed.
"""
from __future__ import annotations

import inspect
import math

import torch
from hydra.utils import get_method, instantiate

from distft.errors import ConfigError

SHAPES = ("cosine", "linear", "constant")


def warmup_decay(optimizer, total_steps: int, shape: str = "cosine", warmup_steps: int = 0,
                 warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's lr, then `shape` down to `min_lr_ratio` of it at
    `total_steps`. `warmup_steps` wins when > 0, else `warmup_ratio * total_steps`."""
    if shape not in SHAPES:
        raise ConfigError(f"scheduler.shape={shape!r}: choose one of {list(SHAPES)}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"scheduler.min_lr_ratio={min_lr_ratio}: must be within [0, 1]")
    warmup = warmup_steps if warmup_steps > 0 else int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if shape == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif shape == "linear":
            decay = 1.0 - progress
        else:
            return 1.0
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check(node) -> None:
    """Config time: the node names an importable callable."""
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ConfigError("scheduler: the node needs _target_ (e.g. distft.schedules.warmup_decay)")
    try:
        get_method(target)
    except Exception as e:
        raise ConfigError(f"scheduler._target_={target}: {str(e).splitlines()[0]}") from None


def build_scheduler(node, optimizer, total_steps: int):
    """The config's scheduler over `optimizer`, told the run's length when it takes it."""
    target = get_method(node["_target_"])
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {"total_steps": total_steps} if "total_steps" in params else {}
    try:
        return instantiate(node, optimizer, **extra, _convert_="all")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"scheduler: cannot build {node.get('_target_')}: {str(e).splitlines()[0]}") from None


__all__ = ["SHAPES", "build_scheduler", "check", "warmup_decay"]

"""The strategy interface and registry: which parameters train, and what is added."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Type

from torch import nn

from distft.errors import ConfigError

log = logging.getLogger(__name__)

_REGISTRY: Dict[str, Type["Strategy"]] = {}


@dataclass
class TaskInfo:
    name: str  # causal_lm | instruction | classification
    num_labels: Optional[int] = None


def register_strategy(name: str) -> Callable[[Type["Strategy"]], Type["Strategy"]]:
    def wrap(cls: Type["Strategy"]) -> Type["Strategy"]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def build_strategy(cfg) -> "Strategy":
    cls = _REGISTRY.get(cfg.name)
    if cls is None:
        raise ConfigError(f"strategy={cfg.name!r} is unknown; registered: {sorted(_REGISTRY)}")
    return cls(cfg)


def registered_strategies() -> list[str]:
    return sorted(_REGISTRY)


class Strategy:
    """Turn a loaded model into the thing that trains.

    `apply` freezes/unfreezes parameters and may add modules; `export` writes a result
    that loads without distft; `check` refuses an impossible combination at config time.
    """

    name = "base"
    # True when `export` writes only an adapter, which needs its base weights on disk.
    exports_adapter = False

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self, task: TaskInfo) -> None:
        """Raise ConfigError when this strategy cannot serve `task`."""

    def apply(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir: str, base_dir: Optional[str]) -> list[str]:
        """Write the trained result to `out_dir` in a format plain transformers/peft loads;
        return every folder written (each gets the tokenizer)."""
        model.save_pretrained(out_dir, safe_serialization=True)
        return [out_dir]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of a task head that a sequence-classification model adds (score/classifier)."""
    names = []
    for name, _ in model.named_parameters():
        top = name.split(".")[0]
        if top in ("classifier", "score"):
            names.append(name)
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (model.layers, encoder.layer, h, ...): the
    longest ModuleList whose length is the config's num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            if best is None:
                best = module
    if best is None:
        raise ConfigError(f"cannot find the transformer block list of {type(model).__name__}")
    return best

"""The strategy interface and registry: which parameters train, and what is added."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Type

from torch import nn

from distft.errors import ConfigError
from distft.registry import Registry

log = logging.getLogger(__name__)

STRATEGIES: Registry["Strategy"] = Registry("strategy")


@dataclass
class TaskInfo:
    name: str  # the task's name, for messages only
    num_labels: Optional[int] = None
    predicts: str = "next_tokens"  # distft.tasks.base.PREDICTS: next_tokens | label | token_labels
    # The task's model brings its own heads (a classification mixture: one per task), which
    # a strategy trains as they are instead of adding one.
    own_heads: bool = False
    # False: the declared heads stay frozen as the task built them (task.train_head=false).
    train_heads: bool = True


def register_strategy(name: str) -> Callable[[Type["Strategy"]], Type["Strategy"]]:
    return STRATEGIES.register(name)


def build_strategy(cfg) -> "Strategy":
    return STRATEGIES.build(cfg)


def registered_strategies() -> list[str]:
    return STRATEGIES.names()


class Strategy:
    """Turn a loaded model into the thing that trains.

    `transform` freezes/unfreezes parameters of the backbone and may add modules; `apply`
    runs it and then trains the heads the model declares (`declared_heads`), so one
    strategy serves a single task and a mixture alike; `export` writes a result that
    loads without distft; `check` refuses an impossible combination at config time.
    A strategy knows nothing of backends, and recognises tasks by what they predict.
    """

    name = "base"
    # True when `export` writes only an adapter, which needs its base weights on disk.
    exports_adapter = False

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self, task: TaskInfo) -> None:
        """Raise ConfigError when this strategy cannot serve `task`."""

    def apply(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        model = self.transform(model, task)
        if not _is_peft(model):  # peft trains a head through its own modules_to_save copy
            for p in declared_heads(model):
                p.requires_grad_(task.train_heads)
        return model

    def transform(self, model: nn.Module, task: TaskInfo) -> nn.Module:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir: str, base_dir: Optional[str]) -> list[str]:
        """Write the trained result to `out_dir` in a format plain transformers/peft loads;
        return every folder written (each gets the tokenizer)."""
        model.save_pretrained(out_dir, safe_serialization=True)
        return [out_dir]


# The heads a transformers task model adds on top of its base model.
_HF_HEADS = ("classifier", "score")


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the task heads the model declares: distft's own models name them in
    `distft_heads` (MlpHead's `head`, a mixture's `heads`); a transformers
    sequence-classification model has `score` or `classifier`."""
    tops = tuple(getattr(model, "distft_heads", ())) + _HF_HEADS
    names = [name for name, _ in model.named_parameters() if name.split(".")[0] in tops]
    if hasattr(model, "get_base_model"):  # a peft-wrapped task model: its heads (and their trained copies) inside
        names += [f"base_model.model.{name}" for name in head_parameter_names(model.get_base_model())]
    return names


def declared_heads(model: nn.Module) -> list:
    names = set(head_parameter_names(model))
    return [p for n, p in model.named_parameters() if n in names]


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


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

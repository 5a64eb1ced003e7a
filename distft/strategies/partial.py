import copy

import torch

from distft.errors import ConfigError
from distft.models.head_model import MlpHeadConfig, MlpHeadForSequenceClassification
from distft.strategies.base import Strategy, find_layer_stack, freeze_all, register_strategy

# Output projections of a pre-norm block: zeroed in a new block so it starts as identity.
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "c_proj", "out_proj")


@register_strategy("partial")
class PartialStrategy(Strategy):
    """The pretrained network frozen (or all but its top N blocks), new layers on top:
    `head=mlp` pools the backbone's features into a new MLP classifier; `head=block` adds
    one new transformer block above the last one (the task's own head trains with it).
    A model with heads of its own (a classification mixture) keeps them: `head=auto`
    trains those."""

    def head_kind(self, task):
        if self.cfg.head == "auto":
            if task.own_heads:
                return "own"
            return "mlp" if task.predicts == "label" else "block"
        return self.cfg.head

    def check(self, task):
        if self.cfg.head not in ("auto", "mlp", "block"):
            raise ConfigError(f"strategy.head={self.cfg.head!r}: choose auto, mlp or block")
        kind = self.head_kind(task)
        if kind == "mlp" and task.own_heads:
            raise ConfigError(f"strategy.head=mlp: task={task.name} brings its own heads already; "
                              "use strategy.head=auto (train them) or block")
        if kind == "mlp" and task.predicts != "label":
            raise ConfigError(
                f"strategy.head=mlp needs task=classification, a task that predicts one label per example "
                f"(task={task.name} predicts {task.predicts}); "
                "use strategy.head=block for language-model tasks"
            )
        if self.cfg.pooling not in ("mean", "first", "last"):
            raise ConfigError(f"strategy.pooling={self.cfg.pooling!r}: choose mean, first or last")

    def transform(self, model, task):
        self.check(task)
        kind = self.head_kind(task)
        if kind == "mlp":
            backbone = model.base_model
            config = MlpHeadConfig(
                backbone=backbone.config,
                head_hidden=list(self.cfg.head_hidden),
                head_dropout=self.cfg.head_dropout,
                pooling=self.cfg.pooling,
                num_labels=task.num_labels,
                pad_token_id=model.config.pad_token_id,
            )
            model = MlpHeadForSequenceClassification(config, backbone=backbone)
            freeze_all(model)
            trainable = [model.head]
        elif kind == "block":
            new_block = self._add_block(model.backbone if getattr(model, "distft_heads", None) else model)
            freeze_all(model)
            trainable = [new_block]  # and the model's heads (Strategy.apply)
        else:
            freeze_all(model)
            trainable = []  # the model's own heads (Strategy.apply)
        stack = find_layer_stack(model.backbone if hasattr(model, "backbone") else model)
        n_top = self.cfg.unfreeze_top_layers
        if n_top < 0 or n_top > len(stack):
            raise ConfigError(f"strategy.unfreeze_top_layers={n_top}: the model has {len(stack)} blocks")
        if n_top:
            trainable += list(stack[len(stack) - n_top :])
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        return model

    def _add_block(self, model):
        stack = find_layer_stack(model)
        block = copy.deepcopy(stack[-1])
        index = len(stack)
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
        for name, module in block.named_modules():
            if name.split(".")[-1] in _RESIDUAL_OUTPUTS and hasattr(module, "weight"):
                with torch.no_grad():
                    module.weight.zero_()
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        stack.append(block)
        model.config.num_hidden_layers = index + 1
        layer_types = getattr(model.config, "layer_types", None)
        if isinstance(layer_types, list) and layer_types:
            model.config.layer_types = layer_types + [layer_types[-1]]
        return block

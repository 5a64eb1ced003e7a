"""A pretrained backbone with a new MLP classification head on pooled features.

This file imports only torch and transformers: `save_pretrained` copies it beside the
weights (register_for_auto_class), so an exported model loads with plain
`AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


# The activations a head may use between its layers (scikit-learn's MLP names among them,
# so a fitted MLPClassifier can become a head).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid, "identity": nn.Identity}


class MlpHeadConfig(PretrainedConfig):
    model_type = "distft_mlp_head"

    def __init__(self, backbone=None, head_hidden=(256,), head_dropout=0.1, pooling="mean", num_labels=None,
                 activation="gelu", feature_layers=None, normalize=False, **kwargs):
        # A saved config carries id2label, not num_labels: passing a default here would
        # override the label count read back from disk.
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)
        if isinstance(backbone, PretrainedConfig):
            backbone = backbone.to_dict()
        self.backbone = backbone or {}
        self.head_hidden = list(head_hidden)
        self.head_dropout = head_dropout
        self.pooling = pooling
        self.activation = activation  # between hidden layers: gelu | relu | tanh | logistic | identity
        # Hidden states read: None = the last layer's output; else indices into the model's
        # hidden_states (0 = embeddings, -1 = last), averaged.
        self.feature_layers = list(feature_layers) if feature_layers is not None else None
        # Scale each pooled vector to unit length before the head, as sentence-transformers'
        # Normalize module does for encoders trained on cosine similarity (all-MiniLM).
        self.normalize = bool(normalize)

    def backbone_config(self) -> PretrainedConfig:
        cfg = dict(self.backbone)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class MlpHeadForSequenceClassification(PreTrainedModel):
    config_class = MlpHeadConfig
    base_model_prefix = "backbone"
    distft_heads = ("head",)  # the trainable head every distft strategy keeps training

    def __init__(self, config: MlpHeadConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config())
        width = config.backbone.get("hidden_size") or self.backbone.config.hidden_size
        layers: list[nn.Module] = []
        for hidden in config.head_hidden:
            layers += [nn.Dropout(config.head_dropout), nn.Linear(width, hidden), ACTIVATIONS[config.activation]()]
            width = hidden
        layers += [nn.Dropout(config.head_dropout), nn.Linear(width, config.num_labels)]
        self.head = nn.Sequential(*layers)
        self.post_init()

    def _init_weights(self, module):
        # Only the new head is initialised here; the backbone keeps its pretrained weights.
        if any(module is m for m in self.head) and isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def unused_parameters(self) -> list:
        """(name, tensor) of backbone weights the head never reads: a BERT-like backbone's
        pooler, which the backbone runs on every forward while the head pools the hidden
        states itself."""
        pooler = getattr(self.backbone, "pooler", None)
        return list(pooler.named_parameters(prefix="backbone.pooler")) if isinstance(pooler, nn.Module) else []

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.config.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.config.pooling == "first":
            return hidden[:, 0]
        last = attention_mask.sum(1).long() - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def features(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        """What the head reads: the pooled hidden states (of config.feature_layers, averaged,
        if set), scaled to unit length with config.normalize."""
        layers = self.config.feature_layers
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers),
                            **kwargs)
        hidden = out.last_hidden_state if not layers else \
            torch.stack([out.hidden_states[i] for i in layers]).mean(0)
        pooled = self.pool(hidden, attention_mask)
        if getattr(self.config, "normalize", False):
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.head(self.features(input_ids, attention_mask, **kwargs))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


MlpHeadConfig.register_for_auto_class()
MlpHeadForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

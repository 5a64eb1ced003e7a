from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from distft.data.sources import require_label, require_text, where
from distft.errors import ConfigError, DataError
from distft.tasks.base import LABEL, Task, pad


class ClassificationTask(Task):
    """Sequence classification: text -> one of num_labels classes, through a new head."""

    name = "classification"
    predicts = LABEL
    metrics = ("loss", "accuracy")

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.task.head not in ("model", "pooled"):
            raise ConfigError(f"task.head={cfg.task.head!r}: choose model (the model's own classification head) "
                              "or pooled (a new head on pooled hidden states)")
        if cfg.task.pooling not in ("mean", "first", "last"):
            raise ConfigError(f"task.pooling={cfg.task.pooling!r}: choose mean, first or last")
        if cfg.task.head == "model" and list(cfg.task.head_hidden):
            raise ConfigError("task.head_hidden is the pooled head's hidden widths: set task.head=pooled with it")
        if cfg.task.head == "model" and cfg.task.get("normalize", False):
            raise ConfigError("task.normalize scales the pooled features of task.head=pooled: set task.head=pooled with it")
        texts = cfg.task.get("label_texts")
        if texts is not None:
            if cfg.task.head != "pooled" or list(cfg.task.head_hidden):
                raise ConfigError("task.label_texts starts a linear pooled head from the texts' embeddings: set "
                                  "task.head=pooled and task.head_hidden=[] with it")
            if len(texts) < 2 or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise ConfigError(f"task.label_texts={list(texts)}: one non-empty text per class, in label order")
            if cfg.task.num_labels is not None and len(texts) != cfg.task.num_labels:
                raise ConfigError(f"task.label_texts has {len(texts)} texts for task.num_labels={cfg.task.num_labels}")
        if not cfg.task.get("train_head", True) and cfg.task.head != "pooled":
            raise ConfigError("task.train_head=false freezes the pooled head: set task.head=pooled with it "
                              "(the model's own head trains with the strategy)")

    @classmethod
    def info_for(cls, cfg):
        from distft.strategies.base import TaskInfo

        return TaskInfo(cfg.task.name, cfg.task.num_labels, cls.predicts, own_heads=cfg.task.head == "pooled",
                        train_heads=cfg.task.get("train_head", True))

    def info(self, num_labels: Optional[int] = None):
        from distft.strategies.base import TaskInfo

        return TaskInfo(self.name, num_labels, self.predicts, own_heads=self.cfg.head == "pooled",
                        train_heads=self.cfg.get("train_head", True))

    def build_model(self, model_cfg, tokenizer, num_labels, seed, source=None):
        if self.cfg.head == "model":
            return super().build_model(model_cfg, tokenizer, num_labels, seed, source)
        from distft.models.head_model import MlpHeadConfig, MlpHeadForSequenceClassification

        base = super().build_model(model_cfg, tokenizer, num_labels, seed, source).base_model
        config = MlpHeadConfig(backbone=base.config, head_hidden=list(self.cfg.head_hidden),
                               head_dropout=self.cfg.head_dropout, pooling=self.cfg.pooling,
                               normalize=self.cfg.get("normalize", False),
                               num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed + 1)  # the head's draw, apart from whatever the loading drew
        model = MlpHeadForSequenceClassification(config, backbone=base)
        if self.cfg.get("label_texts") is not None:
            self._head_from_label_texts(model, tokenizer, num_labels)
        return model

    @torch.no_grad()
    def _head_from_label_texts(self, model, tokenizer, num_labels) -> None:
        """The linear head as a zero-shot classifier: row c is the pooled (and, with
        task.normalize, unit-length) embedding of task.label_texts[c], less the rows' mean
        (only the differences between logits matter), times task.label_text_scale."""
        texts = list(self.cfg.label_texts)
        if len(texts) != num_labels:
            raise ConfigError(f"task.label_texts has {len(texts)} texts for {num_labels} labels")
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        training = model.training
        model.eval()
        pooled = model.features(batch["input_ids"], batch["attention_mask"]).float()
        model.train(training)
        linear = model.head[-1]
        linear.weight.copy_(self.cfg.label_text_scale * (pooled - pooled.mean(0, keepdim=True)))
        linear.bias.zero_()

    @property
    def exported_by_strategy(self) -> bool:
        return self.cfg.head == "model"

    def export(self, model, strategy, out_dir: str, base_dir: Optional[str]) -> List[str]:
        """A pooled head is distft's MlpHead model: written whole (LoRA adapters folded into
        a copy of the backbone), it loads with AutoModelForSequenceClassification
        (trust_remote_code=True), adapters or not."""
        if self.cfg.head == "model":
            return super().export(model, strategy, out_dir, base_dir)
        import copy

        from distft.models.head_model import MlpHeadForSequenceClassification

        if hasattr(model.backbone, "merge_and_unload"):
            merged = MlpHeadForSequenceClassification(model.config, backbone=copy.deepcopy(model.backbone).merge_and_unload())
            merged.head.load_state_dict(model.head.state_dict())
            model = merged
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        return [out_dir]

    def fit_labels(self, train_records, val_records):
        labels = self.labels_of(train_records)
        num_labels = self.cfg.num_labels or 1 + max(labels)
        if num_labels < 2:
            raise ConfigError(f"{self.data_cfg.train}: classification needs at least two labels")
        self.check_labels(train_records, num_labels)
        self.check_labels(val_records, num_labels)
        return num_labels, None

    def labels_of(self, records):
        return [require_label(r, self.data_cfg.label_field) for r in records]

    def check_labels(self, records, num_labels: int) -> None:
        for r in records:
            y = require_label(r, self.data_cfg.label_field)
            if y >= num_labels:
                raise DataError(
                    f"{where(r)}: label {y} is outside the head's range 0..{num_labels - 1} "
                    f"(task.num_labels={num_labels})"
                )

    def text_fields(self):
        return [self.data_cfg.text_field]

    def key_fields(self):
        return [self.data_cfg.text_field, self.data_cfg.label_field]

    def encode(self, records):
        texts = [require_text(r, self.data_cfg.text_field) for r in records]
        labels = self.labels_of(records)
        max_length = self.data_cfg.max_length
        ids = self.tokenizer(texts)["input_ids"]
        full = [len(x) for x in ids]
        long = [i for i, n in enumerate(full) if n > max_length]
        if long:  # re-tokenise those with truncation, which keeps the closing special tokens
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
            for i, x in zip(long, cut):
                ids[i] = x
        return [{"input_ids": x, "label": y, "_full_length": n} for x, y, n in zip(ids, labels, full)]

    def collate(self, examples):
        input_ids = pad([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            mask[i, : len(e["input_ids"])] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def count_targets(self, batch):
        return int(batch["labels"].numel())

    def loss_sum(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def example_losses(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def eval_stats(self, logits, batch) -> Dict[str, float]:
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return {"loss_sum": float(loss), "correct": float(correct), "count": float(batch["labels"].numel())}

    def finish_eval(self, sums):
        n = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

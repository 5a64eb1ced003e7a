"""A task turns records into tensors and model outputs into a loss and metrics."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

IGNORE = -100

# What a task predicts; strategies, data preparation and models ask this, never a task's name.
NEXT_TOKENS = "next_tokens"  # causal language modelling (every target token)
LABEL = "label"  # one label per example (sequence classification)
TOKEN_LABELS = "token_labels"  # one label per token (token classification)
PREDICTS = (NEXT_TOKENS, LABEL, TOKEN_LABELS)


def pad(seqs: List[List[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Task:
    name = "base"
    predicts = NEXT_TOKENS
    # The sampler (distft/samplers/) that orders this task's training examples.
    sampler = "epoch"
    # Inputs the model's forward takes from a collated batch.
    model_inputs = ("input_ids", "attention_mask")
    # What `finish_eval` reports; task.metric must be one of them.
    metrics: tuple = ()
    # The additive statistics `eval_stats` returns (summed over batches and processes).
    eval_stats_keys: tuple = ("loss_sum", "correct", "count")

    def __init__(self, cfg, data_cfg, tokenizer):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer

    @classmethod
    def check(cls, cfg) -> None:
        """Config time: refuse settings this task cannot serve (the whole config)."""
        from distft.errors import ConfigError

        if cfg.data.packing and cls.predicts != NEXT_TOKENS:
            per = "label per token" if cls.predicts == TOKEN_LABELS else "label per example"
            raise ConfigError(f"data.packing=true needs task=causal_lm or task=instruction, a next-token task "
                              f"(task={cfg.task.name} predicts one {per})")

    @classmethod
    def metric_names(cls, cfg) -> tuple:
        """The eval metrics a run of this task reports (task.metric must be one)."""
        return tuple(cls.metrics)

    @classmethod
    def info_for(cls, cfg):
        """What a strategy needs to know of the task, at config time."""
        from distft.strategies.base import TaskInfo

        return TaskInfo(cfg.task.name, cfg.task.num_labels, cls.predicts)

    def info(self, num_labels: Optional[int] = None):
        """What a strategy needs to know of the task, once the data gave num_labels."""
        from distft.strategies.base import TaskInfo

        return TaskInfo(self.name, num_labels, self.predicts)

    # The run's life with the task, in the loop's order.
    def prepare(self, seed: int):
        """(train examples, validation examples, num_labels, report)."""
        from distft.data.prepare import prepare

        return prepare(self.data_cfg, self, seed)

    def fit_labels(self, train_records, val_records):
        """(num_labels, what to add to the data report) from the cleaned records, after
        checking each record's labels; None for a task without labels."""
        return None, None

    def prepared(self, num_labels: Optional[int], report: Dict) -> List[str]:
        """Called with what `prepare` gave (also when it came from the cache); returns the
        lines to log about the data."""
        from distft.data.prepare import summary_line

        return [f"data: {summary_line(report)}"]

    def build_model(self, model_cfg, tokenizer, num_labels: Optional[int], seed: int, source=None):
        """The pretrained (or config-built) model with this task's head; `source`: its weights
        mapped from disk (distft.models.lazy, sharded loading)."""
        from distft.models import load_model

        return load_model(model_cfg, self.predicts, tokenizer, num_labels, seed=seed, source=source)

    # True when the final model is written by the strategy (a model or an adapter that
    # loads without distft from one folder), as `export` below does.
    exported_by_strategy = True

    def export(self, model, strategy, out_dir: str, base_dir: Optional[str]) -> List[str]:
        """Write the trained model; returns the folders written (each gets the tokenizer)."""
        written = strategy.export(model, out_dir, base_dir)
        for folder in written:
            self.tokenizer.save_pretrained(folder)
        return written

    def order(self, seed: int) -> Optional[Callable[[int], List[int]]]:
        """The example order of each epoch for the `epoch` sampler: None for a seeded permutation."""
        return None

    def text_fields(self) -> List[str]:
        """Fields that must hold non-empty text (data.drop_empty drops examples where one is empty)."""
        raise NotImplementedError

    def key_fields(self) -> List[str]:
        """Fields that identify an example, for exact de-duplication."""
        return self.text_fields()

    def encode(self, records) -> List[Dict]:
        """Token ids etc., one example per record, truncated to data.max_length. Each example
        also carries `_full_length` (its length before truncation) and, when the task found
        it unusable, `_drop` (the reason); data cleaning pops both."""
        raise NotImplementedError

    def collate(self, examples: List[Dict]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_kwargs(self, batch) -> Dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for a collated batch."""
        return {k: batch[k] for k in self.model_inputs}

    def count_targets(self, batch) -> int:
        """How many loss terms a batch contributes (tokens or examples), so accumulated
        micro-batches are normalised by the total over the whole optimizer step."""
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """Summed (not averaged) loss of the batch."""
        raise NotImplementedError

    def example_losses(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """One loss per example (shape [batch]), each the mean over that example's own
        targets. Differentially private training clips each example's gradient, so its
        objective is the sum of these rather than a mean over the step's targets."""
        raise NotImplementedError(f"task {self.name} has no per-example loss")

    def eval_stats(self, logits: torch.Tensor, batch) -> Dict[str, float]:
        """Additive statistics of one eval batch; `finish_eval` turns their sums into metrics."""
        raise NotImplementedError

    def finish_eval(self, sums: Dict[str, float]) -> Dict[str, float]:
        raise NotImplementedError

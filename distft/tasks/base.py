"""A task turns records into tensors and model outputs into a loss and metrics."""
from __future__ import annotations

from typing import Dict, List

import torch

IGNORE = -100


def pad(seqs: List[List[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Task:
    name = "base"
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

    def eval_stats(self, logits: torch.Tensor, batch) -> Dict[str, float]:
        """Additive statistics of one eval batch; `finish_eval` turns their sums into metrics."""
        raise NotImplementedError

    def finish_eval(self, sums: Dict[str, float]) -> Dict[str, float]:
        raise NotImplementedError

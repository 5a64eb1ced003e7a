import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from distft.data.sources import require_text
from distft.errors import DataError
from distft.tasks.base import IGNORE, Task, pad


class CausalLMTask(Task):
    """Next-token prediction on raw text (continued pre-training). Each example is the
    text followed by EOS, truncated to data.max_length."""

    name = "causal_lm"
    metrics = ("loss", "perplexity", "token_accuracy")

    def encode(self, records):
        field = self.data_cfg.text_field
        texts = [require_text(r, field) for r in records]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        out = []
        for seq in ids:
            seq = (seq + [eos])[: self.data_cfg.max_length]
            out.append({"input_ids": seq, "labels": list(seq)})
        return out

    def collate(self, examples):
        # Padding positions are masked by position (the example's length), never by token
        # id: a tokenizer whose pad token is its EOS would otherwise lose every EOS label.
        lengths = [len(e["input_ids"]) for e in examples]
        input_ids = pad([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        labels = pad([e["labels"] for e in examples], IGNORE)
        mask = torch.zeros_like(input_ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def count_targets(self, batch):
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def _shifted(self, logits, batch):
        logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        targets = batch["labels"][:, 1:].reshape(-1)
        return logits, targets

    def loss_sum(self, logits, batch):
        logits, targets = self._shifted(logits, batch)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def eval_stats(self, logits, batch) -> Dict[str, float]:
        logits, targets = self._shifted(logits, batch)
        keep = targets != IGNORE
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        correct = (logits.argmax(-1)[keep] == targets[keep]).sum()
        return {"loss_sum": float(loss), "correct": float(correct), "count": float(keep.sum())}

    def finish_eval(self, sums):
        n = max(sums["count"], 1.0)
        loss = sums["loss_sum"] / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": sums["correct"] / n}


ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class InstructionTask(CausalLMTask):
    """Supervised fine-tuning on instruction/input/output records with the Alpaca
    template. With task.mask_prompt (default) the loss covers only the response and its
    EOS token; the EOS is always a target so the model learns to stop."""

    name = "instruction"

    def prompt(self, instruction: str, inp: str) -> str:
        if inp.strip():
            return ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context",
                instruction=instruction,
                input_block=f"### Input:\n{inp}\n\n",
            )
        return ALPACA_PROMPT.format(ctx="", instruction=instruction, input_block="")

    def encode(self, records):
        d = self.data_cfg
        prompts, responses = [], []
        for r in records:
            instruction = require_text(r, d.instruction_field)
            inp = require_text(r, d.input_field, allow_empty=True) if d.input_field in r else ""
            prompts.append(self.prompt(instruction, inp))
            responses.append(require_text(r, d.output_field))
        p_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        out: List[Dict] = []
        for record, p, r in zip(records, p_ids, r_ids):
            seq = (p + r + [eos])[: d.max_length]
            n_prompt = min(len(p), len(seq))
            labels = list(seq)
            if self.cfg.mask_prompt:
                labels[:n_prompt] = [IGNORE] * n_prompt
            if all(x == IGNORE for x in labels[1:]):
                raise DataError(
                    f"{record.get('_file', '<generated>')}:{record.get('_line', '?')}: the prompt fills "
                    f"data.max_length={d.max_length} tokens, leaving no response to train on"
                )
            out.append({"input_ids": seq, "labels": labels})
        return out

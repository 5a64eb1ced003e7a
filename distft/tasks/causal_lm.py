import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from distft import chunked_loss
from distft.data.sources import require_messages, require_text, where
from distft.errors import ConfigError, DataError
from distft.tasks.base import IGNORE, Task, pad


class CausalLMTask(Task):
    """Next-token prediction on raw text (continued pre-training). Each example is the
    text followed by EOS, truncated to data.max_length."""

    name = "causal_lm"
    metrics = ("loss", "perplexity", "token_accuracy")

    def text_fields(self):
        return [self.data_cfg.text_field]

    def encode(self, records):
        field = self.data_cfg.text_field
        texts = [require_text(r, field) for r in records]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        out = []
        for seq in ids:
            full = seq + [eos]
            seq = full[: self.data_cfg.max_length]
            out.append({"input_ids": seq, "labels": list(seq), "_full_length": len(full)})
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
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if "position_ids" in examples[0]:
            # Packed rows: the padding after a row's last example gets positions from 0, so
            # it is a sequence of its own that no real token attends to.
            width = input_ids.shape[1]
            batch["position_ids"] = torch.tensor(
                [e["position_ids"] + list(range(width - len(e["position_ids"]))) for e in examples], dtype=torch.long)
        return batch

    def model_kwargs(self, batch):
        # Training and evaluation never decode, so no KV cache is built (it would also hide
        # the sequence restarts of packed rows, and make compiled blocks recompile).
        if "position_ids" in batch:
            # No attention_mask: transformers then reads the restarts in position_ids as
            # separate sequences.
            return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        return {**super().model_kwargs(batch), "use_cache": False}

    def count_targets(self, batch):
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def _shifted(self, logits, batch):
        logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        targets = batch["labels"][:, 1:].reshape(-1)
        return logits, targets

    def loss_sum(self, logits, batch):
        logits, targets = self._shifted(logits, batch)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def example_losses(self, logits, batch):
        rows = logits.size(0)
        flat, targets = self._shifted(logits, batch)
        token = F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="none").view(rows, -1)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1)
        return token.sum(1) / counts.clamp(min=1)

    # From the decoder's hidden states and the output layer, a chunk of target rows at a
    # time (distft/chunked_loss.py): the same sums without the full logits tensor.
    def loss_sum_hidden(self, hidden, head, batch, chunk: int, agree=None):
        return chunked_loss.loss_sum(hidden, head, batch["labels"], chunk, agree)

    def eval_stats_hidden(self, hidden, head, batch, chunk: int, agree=None) -> Dict[str, float]:
        return chunked_loss.eval_sums(hidden, head, batch["labels"], chunk, agree)

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


# The chat template for tokenizers that bring none: role headers, and each assistant turn
# closed by the EOS token (trained, so the model learns to stop). It is stored with the
# exported tokenizer, so `apply_chat_template` at inference formats prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATES = ("alpaca", "chat")


class InstructionTask(CausalLMTask):
    """Supervised fine-tuning on prompt/response pairs.

    task.template=alpaca: instruction/input/output records in the Alpaca template.
    task.template=chat: `messages` records ({role, content}) in the tokenizer's chat
    template (DEFAULT_CHAT_TEMPLATE when it has none); every assistant turn is a target.
    With task.mask_prompt (default) the loss covers only the responses; the EOS (or the
    template's end-of-turn token) that closes a response is always a target."""

    name = "instruction"

    def __init__(self, cfg, data_cfg, tokenizer):
        super().__init__(cfg, data_cfg, tokenizer)
        if cfg.template not in TEMPLATES:
            raise ConfigError(f"task.template={cfg.template!r}: choose one of {list(TEMPLATES)}")
        if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    def text_fields(self):
        d = self.data_cfg
        return [d.messages_field] if self.cfg.template == "chat" else [d.instruction_field, d.output_field]

    def key_fields(self):
        d = self.data_cfg
        return [d.messages_field] if self.cfg.template == "chat" else [d.instruction_field, d.input_field,
                                                                       d.output_field]

    def prompt(self, instruction: str, inp: str) -> str:
        if inp.strip():
            return ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context",
                instruction=instruction,
                input_block=f"### Input:\n{inp}\n\n",
            )
        return ALPACA_PROMPT.format(ctx="", instruction=instruction, input_block="")

    def encode(self, records):
        pairs = self._encode_chat(records) if self.cfg.template == "chat" else self._encode_alpaca(records)
        out: List[Dict] = []
        max_length = self.data_cfg.max_length
        for seq, labels in pairs:
            ex = {"input_ids": seq[:max_length], "labels": labels[:max_length], "_full_length": len(seq)}
            if all(x == IGNORE for x in ex["labels"][1:]):
                ex["_drop"] = "prompt_too_long"  # nothing of the response fits in max_length
            out.append(ex)
        return out

    def _encode_alpaca(self, records):
        d = self.data_cfg
        prompts, responses = [], []
        for r in records:
            instruction = require_text(r, d.instruction_field)
            inp = require_text(r, d.input_field, allow_empty=True) if r.get(d.input_field) is not None else ""
            prompts.append(self.prompt(instruction, inp))
            responses.append(require_text(r, d.output_field))
        p_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        for p, r in zip(p_ids, r_ids):
            seq = p + r + [eos]
            labels = [IGNORE] * len(p) + r + [eos] if self.cfg.mask_prompt else list(seq)
            yield seq, labels

    def _encode_chat(self, records):
        """Render each conversation with the chat template and find the characters of each
        assistant turn: they run from the end of the conversation-so-far rendered with a
        generation prompt to the end of the conversation rendered through that turn. Tokens
        starting inside those spans are targets (found through the tokenizer's offsets,
        so no token boundary is guessed)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        for r in records:
            msgs = require_messages(r, self.data_cfg.messages_field)
            text = tok.apply_chat_template(msgs, tokenize=False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
                through = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                if not (text.startswith(through) and through.startswith(before)):
                    raise DataError(f"{where(r)}: the chat template does not render a conversation as the "
                                    "concatenation of its turns, so the response tokens cannot be located")
                spans.append((len(before), len(through)))
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            seq = list(enc["input_ids"])
            labels = [IGNORE] * len(seq)
            for j, (start, _end) in enumerate(enc["offset_mapping"]):
                if not self.cfg.mask_prompt or any(a <= start < b for a, b in spans):
                    labels[j] = seq[j]
            if eos not in [x for x in labels if x != IGNORE]:
                # A template that closes turns without the EOS: add one, trained, so
                # generation stops.
                seq.append(eos)
                labels.append(eos)
            yield seq, labels

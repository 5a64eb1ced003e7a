"""Token classification (named-entity recognition and other BIO tagging).

Records hold words and one BIO tag per word: {"tokens": [...], "tags": ["B-person", "O", ...]}
(the field names are data.tokens_field / data.tags_field). Words are split into the
model's sub-tokens: the first sub-token of a word carries the word's tag; the others are
left out of the loss (task.subtoken_labels=first, the default) or carry the word's tag
with B- turned into I- (task.subtoken_labels=all). Predictions are read back at each word's
first sub-token, so metrics are always over words: entity precision, recall and F1 from
seqeval's entity extraction (its default, conlleval-style reading, and strict IOB2 beside
it), overall and per entity type, and word-level tag accuracy. A word cut off by
data.max_length counts as predicted `O`, so truncation cannot flatter the metrics.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from distft.data.sources import where
from distft.errors import ConfigError, DataError
from distft.tasks.base import IGNORE, TOKEN_LABELS, Task, pad

OUTSIDE = "O"
SUBTOKEN_LABELS = ("first", "all")


def _entity_counts(gold: List[List[str]], pred: List[List[str]]) -> Dict[str, float]:
    """Additive counts of entities (true, predicted, correct) per type, in seqeval's default
    reading and in strict IOB2 mode. Extraction is seqeval's own; counting is summed here
    so that batches and processes can add their counts before P/R/F1 are taken."""
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2, Entities

    out: Counter = Counter()
    for mode, extract in (("", lambda seqs: [set(get_entities(s)) for s in seqs]),
                          ("strict_", lambda seqs: [{e.to_tuple()[1:] for e in sent}
                                                     for sent in Entities(seqs, IOB2).entities])):
        for g, p in zip(extract(gold), extract(pred)):
            for kind, items in (("true", g), ("pred", p), ("correct", g & p)):
                for entity in items:
                    out[f"{mode}{kind}/{entity[0]}"] += 1
    return dict(out)


def _prf(correct: float, pred: float, true: float) -> Tuple[float, float, float]:
    p = correct / pred if pred else 0.0
    r = correct / true if true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def read_label_file(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task.labels={path}: no such file (one tag per line, or give the list)")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise ConfigError(f"task.labels={path}: {dup!r} is listed twice")
    return names


def entity_types(labels: List[str]) -> List[str]:
    return sorted({name[2:] for name in labels if name[:2] in ("B-", "I-")})


class TokenClassificationTask(Task):
    """One BIO tag per word, through the model's token-classification head."""

    name = "token_classification"
    predicts = TOKEN_LABELS
    metrics = ("loss", "f1", "precision", "recall", "f1_strict", "precision_strict", "recall_strict",
               "token_accuracy")

    def __init__(self, cfg, data_cfg, tokenizer):
        super().__init__(cfg, data_cfg, tokenizer)
        self.label_names: Optional[List[str]] = None

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        task = cfg.task
        if task.subtoken_labels not in SUBTOKEN_LABELS:
            raise ConfigError(f"task.subtoken_labels={task.subtoken_labels!r}: choose first (only a word's first "
                              "sub-token is labelled) or all (every sub-token, B- continued as I-)")
        if task.head != "model":
            raise ConfigError("task.head=pooled pools a whole example into one label; token_classification "
                              "labels every word through the model's token head (task.head=model)")

    # ------------------------------------------------------------ labels
    def fit_labels(self, train_records, val_records):
        """Check every record's words and tags (file:line on the first bad one), fix the
        label set (task.labels, else O then the training tags sorted) and, with
        task.repair_iob, turn an I-X that follows neither B-X nor I-X into B-X."""
        given = self._given_labels()
        repaired = 0
        for records in (train_records, val_records):
            for r in records:
                repaired += self._check_record(r, given)
        if given is None:
            seen = {t for r in train_records for t in r[self.data_cfg.tags_field]}
            names = [OUTSIDE] + sorted(seen - {OUTSIDE})
            unseen = sorted({t for r in val_records for t in r[self.data_cfg.tags_field]} - set(names))
            if unseen:
                r = next(r for r in val_records if set(r[self.data_cfg.tags_field]) & set(unseen))
                raise DataError(f"{where(r)}: tag {unseen[0]!r} never occurs in the training data "
                                f"({self.data_cfg.train}); give the full tag set as task.labels")
        else:
            names = given
        if OUTSIDE not in names:
            raise ConfigError(f"task.labels: the tag set needs {OUTSIDE!r} (outside any entity)")
        if len(names) < 2:
            raise DataError(f"{self.data_cfg.train}: every tag is {OUTSIDE!r}; nothing to learn")
        self.label_names = names
        return len(names), {"labels": names, "repaired_tags": repaired}

    def _given_labels(self) -> Optional[List[str]]:
        labels = self.cfg.labels
        if labels is None:
            return None
        if isinstance(labels, str):
            return read_label_file(labels)
        names = [str(x) for x in labels]
        if len(set(names)) != len(names):
            raise ConfigError("task.labels: a tag is listed twice")
        return names

    def _check_record(self, r, given) -> int:
        tokens_field, tags_field = self.data_cfg.tokens_field, self.data_cfg.tags_field
        for field in (tokens_field, tags_field):
            value = r.get(field)
            if value is None:
                raise DataError(f"{where(r)}: missing field {field!r} (set data.tokens_field / data.tags_field "
                                "to map another name)")
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise DataError(f"{where(r)}: field {field!r} must be a list of strings")
        tokens, tags = r[tokens_field], r[tags_field]
        if len(tokens) != len(tags):
            raise DataError(f"{where(r)}: {len(tokens)} {tokens_field} but {len(tags)} {tags_field}; "
                            "each word needs exactly one tag")
        if not tokens:
            raise DataError(f"{where(r)}: no words in {tokens_field!r} (data.drop_empty=true drops such examples)")
        repaired = 0
        previous = OUTSIDE
        for i, tag in enumerate(tags):
            if given is not None and tag not in given:
                raise DataError(f"{where(r)}: tag {tag!r} (word {i + 1}, {tokens[i]!r}) is not in task.labels")
            if tag != OUTSIDE and tag[:2] not in ("B-", "I-"):
                raise DataError(f"{where(r)}: tag {tag!r} (word {i + 1}) is not BIO: expected O, B-TYPE or I-TYPE")
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                if not self.cfg.repair_iob:
                    raise DataError(f"{where(r)}: tag {tag!r} at word {i + 1} ({tokens[i]!r}) follows {previous!r}; "
                                    f"an I- tag must continue B-{tag[2:]} or I-{tag[2:]} (IOB2). Fix the data, "
                                    f"or set task.repair_iob=true to read it as B-{tag[2:]}")
                tags[i] = tag = "B-" + tag[2:]
                repaired += 1
            previous = tag
        return repaired

    def prepared(self, num_labels, report):
        lines = super().prepared(num_labels, report)
        self.label_names = list(report["labels"])
        types = entity_types(self.label_names)
        self.eval_stats_keys = ("loss_sum", "count", "words", "words_correct") + tuple(
            f"{mode}{kind}/{t}" for mode in ("", "strict_") for kind in ("true", "pred", "correct") for t in types)
        if report.get("repaired_tags"):
            lines.append(f"data: {report['repaired_tags']} I- tag(s) without a preceding B-/I- of their type "
                         "read as B- (task.repair_iob=true)")
        return lines

    # ------------------------------------------------------------ model
    def build_model(self, model_cfg, tokenizer, num_labels, seed, source=None):
        from distft.models import load_model

        return load_model(model_cfg, self.predicts, tokenizer, num_labels, seed=seed, label_names=self.label_names,
                          source=source)

    # ------------------------------------------------------------ examples
    def text_fields(self):
        return [self.data_cfg.tokens_field]

    def key_fields(self):
        return [self.data_cfg.tokens_field, self.data_cfg.tags_field]

    def encode(self, records):
        index = {name: i for i, name in enumerate(self.label_names)}
        words = [r[self.data_cfg.tokens_field] for r in records]
        max_length = self.data_cfg.max_length
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("task=token_classification needs a fast tokenizer (word_ids maps sub-tokens to words)")
        full = self.tokenizer(words, is_split_into_words=True)
        long = {i: k for k, i in enumerate(i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length)}
        # Those re-tokenised with truncation, which keeps the closing special tokens.
        cut = self.tokenizer([words[i] for i in long], is_split_into_words=True, truncation=True,
                             max_length=max_length) if long else None
        examples = []
        for i, r in enumerate(records):
            if i in long:
                k = long[i]
                ids, word_ids = cut["input_ids"][k], cut.word_ids(k)
            else:
                ids, word_ids = full["input_ids"][i], full.word_ids(i)
            tags = [index[t] for t in r[self.data_cfg.tags_field]]
            labels, first_pos = self.align(word_ids, tags, len(words[i]))
            examples.append({"input_ids": ids, "labels": labels, "word_pos": first_pos, "word_tags": tags,
                             "_full_length": len(full["input_ids"][i])})
        return examples

    def align(self, word_ids: List[Optional[int]], tags: List[int], n_words: int) -> Tuple[List[int], List[int]]:
        """Sub-token labels and each word's first sub-token position (-1 for a word that
        truncation cut off, or that the tokenizer turned into no sub-token at all)."""
        labels, first_pos = [], [-1] * n_words
        previous = None
        for pos, w in enumerate(word_ids):
            if w is None:
                labels.append(IGNORE)
            elif w != previous:
                labels.append(tags[w])
                first_pos[w] = pos
            elif self.cfg.subtoken_labels == "all":
                labels.append(self._inside(tags[w]))
            else:
                labels.append(IGNORE)
            previous = w
        return labels, first_pos

    def _inside(self, tag: int) -> int:
        name = self.label_names[tag]
        if name.startswith("B-"):
            inside = "I-" + name[2:]
            if inside in self.label_names:
                return self.label_names.index(inside)
        return tag

    def collate(self, examples):
        input_ids = pad([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": pad([e["labels"] for e in examples], IGNORE),
                "word_pos": pad([e["word_pos"] for e in examples], -1),
                "word_tags": pad([e["word_tags"] for e in examples], IGNORE)}

    # ------------------------------------------------------------ loss and metrics
    def count_targets(self, batch):
        return int((batch["labels"] != IGNORE).sum())

    def loss_sum(self, logits, batch):
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                               reduction="sum")

    def example_losses(self, logits, batch):
        labels = batch["labels"]
        per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        n = (labels != IGNORE).sum(1).clamp(min=1)
        return per_token.sum(1) / n

    def word_predictions(self, logits, batch) -> torch.Tensor:
        """The predicted tag of every word (its first sub-token's); `O` where a word has no
        sub-token in the input; padding words keep IGNORE."""
        pos = batch["word_pos"]
        pred = logits.argmax(-1).gather(1, pos.clamp(min=0))
        pred = torch.where(pos >= 0, pred, torch.full_like(pred, self.label_names.index(OUTSIDE)))
        return torch.where(batch["word_tags"] != IGNORE, pred, torch.full_like(pred, IGNORE))

    def eval_stats(self, logits, batch) -> Dict[str, float]:
        loss = self.loss_sum(logits, batch)
        pred = self.word_predictions(logits, batch).tolist()
        gold = batch["word_tags"].tolist()
        names = self.label_names
        gold_tags = [[names[t] for t in row if t != IGNORE] for row in gold]
        pred_tags = [[names[t] for t in row if t != IGNORE] for row in pred]
        stats = {k: 0.0 for k in self.eval_stats_keys}
        stats.update(_entity_counts(gold_tags, pred_tags))
        stats["loss_sum"] = float(loss)
        stats["count"] = float(self.count_targets(batch))
        stats["words"] = float(sum(len(g) for g in gold_tags))
        stats["words_correct"] = float(sum(a == b for g, p in zip(gold_tags, pred_tags) for a, b in zip(g, p)))
        return stats

    def finish_eval(self, sums):
        out = {"loss": sums["loss_sum"] / max(sums["count"], 1.0),
               "token_accuracy": sums["words_correct"] / max(sums["words"], 1.0)}
        types = entity_types(self.label_names)
        for mode, suffix in (("", ""), ("strict_", "_strict")):
            totals = [sum(sums.get(f"{mode}{kind}/{t}", 0.0) for t in types) for kind in ("correct", "pred", "true")]
            out[f"precision{suffix}"], out[f"recall{suffix}"], out[f"f1{suffix}"] = _prf(*totals)
        for t in types:
            p, r, f = _prf(*(sums.get(f"{kind}/{t}", 0.0) for kind in ("correct", "pred", "true")))
            out[f"f1/{t}"], out[f"precision/{t}"], out[f"recall/{t}"] = f, p, r
        return out

"""Cleaning before training, and the report of what it dropped and why.

Records are checked in order: examples whose text is empty (with data.drop_empty),
exact duplicates (with data.dedup), then, once tokenised, examples longer than
data.max_length (with data.too_long=drop; else truncated and counted) or shorter than
data.min_tokens. Whatever is dropped is counted per reason, with the first few places,
in `data_report.json` of the run dir. A split left with no example is an error.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Dict, Iterable, List, Sequence

from distft.data.sources import Record, where
from distft.errors import ConfigError, DataError

TOO_LONG = ("truncate", "drop")
_SHOWN = 5  # places listed per reason in the report


class SplitReport:
    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.read = 0
        self.dropped: Counter = Counter()
        self.places: Dict[str, List[str]] = {}
        self.truncated = 0
        self.kept = 0

    def drop(self, reason: str, record: Record) -> None:
        self.dropped[reason] += 1
        shown = self.places.setdefault(reason, [])
        if len(shown) < _SHOWN:
            shown.append(where(record))

    def to_dict(self) -> Dict:
        return {"source": self.source, "read": self.read, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "first_dropped": self.places}

    def check_not_empty(self) -> None:
        if self.kept == 0:
            why = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none read"
            raise DataError(f"{self.source}: all {self.read} {self.name} examples were filtered out ({why}); "
                            "see data.dedup, data.drop_empty, data.too_long, data.max_length and data.min_tokens")


def check_clean_config(cfg) -> None:
    if cfg.too_long not in TOO_LONG:
        raise ConfigError(f"data.too_long={cfg.too_long!r}: choose one of {list(TOO_LONG)}")
    if cfg.max_length < 2:
        raise ConfigError("data.max_length must be at least 2")
    if cfg.min_tokens < 0 or cfg.min_tokens > cfg.max_length:
        raise ConfigError(f"data.min_tokens={cfg.min_tokens} must be within 0..data.max_length={cfg.max_length}")


def _key(record: Record, fields: Sequence[str]) -> str:
    values = [record.get(f) for f in fields]
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _is_empty(record: Record, fields: Sequence[str]) -> bool:
    for f in fields:
        v = record.get(f)
        if isinstance(v, str) and not v.strip():
            return True
        if isinstance(v, list) and not v:
            return True
    return False


def clean_records(records: List[Record], cfg, text_fields: Sequence[str], key_fields: Sequence[str],
                  report: SplitReport) -> List[Record]:
    """Drop empty examples and exact duplicates (per the config), counting each in `report`."""
    report.read = len(records)
    seen = set()
    out = []
    for r in records:
        if cfg.drop_empty and _is_empty(r, text_fields):
            report.drop("empty", r)
            continue
        if cfg.dedup:
            k = _key(r, key_fields)
            if k in seen:
                report.drop("duplicate", r)
                continue
            seen.add(k)
        out.append(r)
    return out


def overlap(train: Iterable[Record], val: Iterable[Record], key_fields: Sequence[str]) -> int:
    """How many validation examples also appear, exactly, in the training data (a leak)."""
    keys = {_key(r, key_fields) for r in train}
    return sum(1 for r in val if _key(r, key_fields) in keys)


def fit_lengths(examples: List[Dict], records: List[Record], cfg, report: SplitReport) -> List[Dict]:
    """Apply the length policy to encoded examples. An example carries `_full_length` (its
    token count before truncation) and may carry `_drop` (a reason its task found)."""
    out = []
    for ex, r in zip(examples, records):
        reason = ex.pop("_drop", None)
        full = ex.pop("_full_length", None)
        if reason is None and full is not None and full > cfg.max_length:
            if cfg.too_long == "drop":
                reason = "too_long"
            else:
                report.truncated += 1
        if reason is None and len(ex["input_ids"]) < max(cfg.min_tokens, 1):
            reason = "too_short"
        if reason is not None:
            report.drop(reason, r)
            continue
        out.append(ex)
    report.kept = len(out)
    report.check_not_empty()
    return out

"""Loading, validating and splitting the records of a run."""
from __future__ import annotations

import random
from typing import List, Tuple

from distft.data.sources import Record, read_jsonl
from distft.data.synthetic import generate
from distft.errors import ConfigError

DATA_KINDS = ("synthetic", "jsonl")


def load_records(cfg, task: str, seed: int) -> Tuple[List[Record], List[Record]]:
    """Train and validation records for data config `cfg`."""
    if cfg.name == "synthetic":
        train = generate(task, cfg.num_train, seed)
        val = generate(task, cfg.num_validation, seed + 1_000_003)
    elif cfg.name == "jsonl":
        if not cfg.train:
            raise ConfigError("data.train: give the path of a JSONL training file")
        train = read_jsonl(cfg.train)
        if cfg.validation:
            val = read_jsonl(cfg.validation)
        else:
            if not 0.0 < cfg.validation_split < 1.0:
                raise ConfigError("data.validation_split must be in (0, 1) when data.validation is not given")
            order = list(range(len(train)))
            random.Random(seed).shuffle(order)
            n_val = max(1, int(round(len(train) * cfg.validation_split)))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
    else:
        raise ConfigError(f"data={cfg.name!r} is unknown; choose one of {list(DATA_KINDS)}")
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_validation_examples:
        val = val[: cfg.max_validation_examples]
    return train, val


__all__ = ["DATA_KINDS", "Record", "load_records", "read_jsonl", "generate"]

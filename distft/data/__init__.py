"""Loading, validating, cleaning and splitting the records of a run."""
from __future__ import annotations

import math
import random
from typing import Dict, List, Tuple

from distft.data.sources import FORMATS, Record, read_hub, read_jsonl, read_records
from distft.data.synthetic import generate
from distft.errors import ConfigError

DATA_KINDS = ("synthetic", "files", "hub")


def check_data_config(cfg) -> None:
    if cfg.name not in DATA_KINDS:
        raise ConfigError(f"data={cfg.name!r} is unknown; choose one of {list(DATA_KINDS)}")
    if cfg.name in ("files", "hub") and not cfg.train:
        raise ConfigError(f"data.train: give the {'path of a training file' if cfg.name == 'files' else 'hub id'}")
    if cfg.format not in FORMATS:
        raise ConfigError(f"data.format={cfg.format!r}: choose one of {list(FORMATS)}")
    if not cfg.validation and cfg.name != "synthetic" and not 0.0 < cfg.validation_split < 1.0:
        raise ConfigError("data.validation_split must be in (0, 1) when no validation data is given")


def load_records(cfg, task: str, seed: int, template: str = "alpaca") -> Tuple[List[Record], List[Record], Dict]:
    """Train and validation records for data config `cfg`, and how validation was made."""
    check_data_config(cfg)
    split_info: Dict = {}
    if cfg.name == "synthetic":
        train = generate(task, cfg.num_train, seed, template)
        val = generate(task, cfg.num_validation, seed + 1_000_003, template)
        split_info = {"validation": "generated"}
    else:
        if cfg.name == "files":
            train = read_records(cfg.train, cfg.format, cfg.train_split)
            val = read_records(cfg.validation, cfg.format, cfg.validation_split_name) if cfg.validation else None
        else:
            train = read_hub(cfg.train, cfg.hub_config, cfg.train_split)
            val = read_hub(cfg.validation or cfg.train, cfg.hub_config, cfg.validation_split_name) \
                if cfg.validation_split_name else None
        if val is None:
            # A seeded random share of train, so the split is the same on every run and rank.
            order = list(range(len(train)))
            random.Random(seed).shuffle(order)
            n_val = max(1, int(round(len(train) * cfg.validation_split)))
            if n_val >= len(train):
                raise ConfigError(f"{cfg.train}: {len(train)} example(s) cannot be split into train and "
                                  f"validation (data.validation_split={cfg.validation_split})")
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
            split_info = {"validation": f"{n_val} held out of {cfg.train} "
                                        f"(data.validation_split={cfg.validation_split}, seed {seed})"}
        else:
            split_info = {"validation": str(cfg.validation or cfg.train)}
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.sample_train_examples is not None or cfg.sample_train_fraction is not None:
        train = _sample(cfg, train, seed)
    if cfg.max_validation_examples:
        val = val[: cfg.max_validation_examples]
    return train, val, split_info


def _sample(cfg, train: List[Record], seed: int) -> List[Record]:
    """A seeded random share of `train`, in file order (the same on every run and rank)."""
    if cfg.sample_train_examples is not None and cfg.sample_train_fraction is not None:
        raise ConfigError("data.sample_train_examples and data.sample_train_fraction: give one of them")
    if cfg.sample_train_fraction is not None:
        if not 0 < cfg.sample_train_fraction <= 1:
            raise ConfigError(f"data.sample_train_fraction={cfg.sample_train_fraction}: must be in (0, 1]")
        n = max(1, math.ceil(len(train) * cfg.sample_train_fraction))
    else:
        if cfg.sample_train_examples < 1:
            raise ConfigError(f"data.sample_train_examples={cfg.sample_train_examples}: must be >= 1")
        n = min(cfg.sample_train_examples, len(train))
    keep = sorted(random.Random(seed + 15485863).sample(range(len(train)), n))
    return [train[i] for i in keep]


__all__ = ["DATA_KINDS", "Record", "check_data_config", "load_records", "read_jsonl", "read_records", "generate"]

"""From a data config to tokenised train/validation examples and a report of the cleaning."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from distft.data import load_records
from distft.data.packing import pack, packing_stats
from distft.data.clean import SplitReport, check_clean_config, clean_records, fit_lengths, overlap


def prepare(data_cfg, task, seed: int) -> Tuple[List[Dict], List[Dict], Optional[int], Dict]:
    """(train examples, validation examples, num_labels, report). Errors name the file and
    line of the first bad record; what cleaning dropped is counted in the report."""
    check_clean_config(data_cfg)
    task_cfg = task.cfg
    train_records, val_records, split_info = load_records(data_cfg, task_cfg.name, seed, task_cfg.template)
    source = str(data_cfg.train) if data_cfg.name != "synthetic" else "synthetic"
    reports = {"train": SplitReport("train", source),
               "validation": SplitReport("validation", split_info.get("validation", source))}
    train_records = clean_records(train_records, data_cfg, task.text_fields(), task.key_fields(), reports["train"])
    val_records = clean_records(val_records, data_cfg, task.text_fields(), task.key_fields(), reports["validation"])

    # The task fixes its label set from the training records and checks every record
    # against it (naming the file and line of the first bad one).
    num_labels, label_report = task.fit_labels(train_records, val_records)

    train = fit_lengths(task.encode(train_records), train_records, data_cfg, reports["train"])
    val = fit_lengths(task.encode(val_records), val_records, data_cfg, reports["validation"])
    packed = None
    if data_cfg.packing:
        # Training rows only; validation stays one example per row, so its metrics are
        # those of an unpacked run.
        rows = pack(train, data_cfg.max_length, seed)
        packed = packing_stats(train, rows, data_cfg.max_length)
        train = rows
    report = {
        **{k: r.to_dict() for k, r in reports.items()},
        "validation_also_in_train": overlap(train_records, val_records, task.key_fields()),
        "packing": packed,
        **(label_report or {}),
        "settings": {"max_length": data_cfg.max_length, "too_long": data_cfg.too_long,
                     "min_tokens": data_cfg.min_tokens, "dedup": data_cfg.dedup, "drop_empty": data_cfg.drop_empty},
    }
    return train, val, num_labels, report


def summary_line(report: Dict) -> str:
    parts = []
    for split in ("train", "validation"):
        r = report[split]
        dropped = ", ".join(f"{v} {k}" for k, v in r["dropped"].items())
        parts.append(f"{split} {r['kept']}/{r['read']} kept" + (f" (dropped {dropped})" if dropped else "")
                     + (f", {r['truncated']} truncated" if r["truncated"] else ""))
    leak = report.get("validation_also_in_train")
    packed = report.get("packing")
    return ("; ".join(parts) + (f"; {leak} validation example(s) also in train" if leak else "")
            + (f"; packed into {packed['rows']} rows ({packed['fill']:.0%} full)" if packed else ""))

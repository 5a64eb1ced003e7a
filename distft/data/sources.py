"""Reading records from files or the hub, with errors that name the file and line (or row).

Every record is a dict of the source's columns plus `_file` and `_line` (a 1-based line
number for JSONL, `row N` for tables), so later checks can point at the exact example.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from distft.errors import ConfigError, DataError

Record = Dict[str, Any]

FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "disk")
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: choose one of {list(FORMATS)}")
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "disk"
    found = _BY_SUFFIX.get(p.suffix.lower())
    if found is None:
        raise ConfigError(f"{path}: cannot tell the format from the name; set data.format to one of "
                          f"{[f for f in FORMATS if f != 'auto']}")
    return found


def read_records(path: str, fmt: str = "auto", split: str = "train") -> List[Record]:
    """Records of a local file or saved dataset directory."""
    if not Path(path).exists():
        raise DataError(f"{path}: data file not found")
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        records = read_jsonl(path)
    elif fmt == "disk":
        records = _read_saved(path, split)
    else:
        records = _read_table(path, fmt)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return records


def read_jsonl(path: str) -> List[Record]:
    """Read a JSONL file. Parsed by hand (not datasets' json loader) because that loader
    reports neither the line of a malformed row nor which row lacks a field."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    records: List[Record] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["_line"] = lineno
            obj["_file"] = str(path)
            records.append(obj)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return records


def _with_rows(rows: List[Record], path: str) -> List[Record]:
    for i, row in enumerate(rows, start=1):
        for k, v in row.items():
            if isinstance(v, float) and math.isnan(v):
                row[k] = None  # an empty table cell: reported as a missing field
        row["_line"] = f"row {i}"
        row["_file"] = str(path)
    return rows


def _dataset_rows(ds) -> List[Record]:
    """A datasets.Dataset as records. A column of lists of class labels (a NER dataset's
    `ner_tags`: Sequence(ClassLabel)) becomes its label names, the BIO strings that
    task=token_classification reads; a single ClassLabel column (a sentence's label) stays
    an integer, as task=classification reads it."""
    from datasets import ClassLabel, features

    # Sequence (datasets 3) and List / LargeList (datasets 4 and later) are the list features
    list_types = tuple(t for t in (getattr(features, n, None) for n in ("Sequence", "List", "LargeList"))
                       if isinstance(t, type))
    names = {}
    for column, feature in ds.features.items():
        inner = getattr(feature, "feature", None) if isinstance(feature, list_types) else None
        if isinstance(inner, ClassLabel):
            names[column] = inner.names
    rows = ds.to_list()
    for row in rows:
        for column, labels in names.items():
            if isinstance(row.get(column), list):
                row[column] = [labels[i] if isinstance(i, int) and 0 <= i < len(labels) else i for i in row[column]]
    return rows


def _read_table(path: str, fmt: str) -> List[Record]:
    from datasets import load_dataset

    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    builder = "csv" if fmt in ("csv", "tsv") else fmt
    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pandas/arrow parse errors: keep their message, name the file
        raise DataError(f"{path}: cannot be read as {fmt} ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return _with_rows(ds.to_list(), path)


def _read_saved(path: str, split: str) -> List[Record]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a dataset saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    return _with_rows(_dataset_rows(ds), f"{path}[{split}]")


def read_hub(name: str, config: Optional[str], split: str) -> List[Record]:
    """A dataset from the Hugging Face hub (or its local cache), by id, config and split."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"data.train={name} (split {split!r}): could not load it from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return _with_rows(_dataset_rows(ds), f"{name}[{split}]")


def where(record: Record) -> str:
    return f"{record.get('_file', '<generated>')}:{record.get('_line', '?')}"


def require_text(record: Record, field: str, allow_empty: bool = False) -> str:
    if field not in record or record[field] is None:
        raise DataError(f"{where(record)}: missing field {field!r} (set data.*_field to map another name)")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where(record)}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where(record)}: field {field!r} is empty (data.drop_empty=true drops such examples)")
    return value


def require_label(record: Record, field: str) -> int:
    if field not in record or record[field] is None:
        raise DataError(f"{where(record)}: missing field {field!r} (set data.label_field to map another name)")
    value = record[field]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a table column with a gap is read as floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where(record)}: label {field!r} must be an integer, got {value!r}")
    if value < 0:
        raise DataError(f"{where(record)}: label {value} is negative")
    return value


def require_messages(record: Record, field: str) -> List[Dict[str, str]]:
    """A chat: a list of {role, content} with at least one assistant turn to train on."""
    if field not in record or record[field] is None:
        raise DataError(f"{where(record)}: missing field {field!r} (set data.messages_field to map another name)")
    msgs = record[field]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where(record)}: field {field!r} must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where(record)}: {field}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where(record)}: {field}[{i}] has role {m['role']!r}; expected system, user or assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where(record)}: {field!r} has no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]

"""Reading records from files, with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from distft.errors import DataError

Record = Dict[str, Any]


def read_jsonl(path: str) -> List[Record]:
    """Read a JSONL file. Each record keeps its 1-based line number in `_line` so later
    checks can point at it. Parsed by hand (not datasets' json loader) because that
    loader reports neither the line of a malformed row nor which row lacks a field."""
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


def where(record: Record) -> str:
    return f"{record.get('_file', '<generated>')}:{record.get('_line', '?')}"


def require_text(record: Record, field: str, allow_empty: bool = False) -> str:
    if field not in record:
        raise DataError(f"{where(record)}: missing field {field!r} (set data.*_field to map another name)")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where(record)}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where(record)}: field {field!r} is empty")
    return value


def require_label(record: Record, field: str) -> int:
    if field not in record:
        raise DataError(f"{where(record)}: missing field {field!r} (set data.label_field to map another name)")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where(record)}: label {field!r} must be an integer, got {value!r}")
    if value < 0:
        raise DataError(f"{where(record)}: label {value} is negative")
    return value

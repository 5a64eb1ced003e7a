"""Tokenised examples cached on disk, keyed by what they depend on.

Rank 0 prepares the data once and saves it with the `datasets` library (Arrow); the other
ranks wait and load the result, so no rank spends minutes tokenising inside a collective
(a common cause of NCCL timeouts). The key hashes the data (file contents, or the
generator's settings), the tokenizer (its full serialisation) and every setting that
changes the examples, so a changed file or setting never reads a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from datasets import Dataset, load_from_disk
from omegaconf import OmegaConf

CACHE_VERSION = 2


def _file_digest(path: Optional[str]) -> Optional[str]:
    """Hash of a data file's bytes, or of every file in a saved-dataset folder."""
    if not path:
        return None
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return None  # a hub id: keyed by its name and split only
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    chat = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256((text + special + str(chat)).encode()).hexdigest()


def cache_key(data_cfg, task_cfg, tokenizer, seed: int) -> str:
    parts: Dict = {
        "version": CACHE_VERSION,
        "data": OmegaConf.to_container(data_cfg, resolve=True),
        "task": OmegaConf.to_container(task_cfg, resolve=True),
        "seed": seed,
        "train_file": _file_digest(data_cfg.train),
        "validation_file": _file_digest(data_cfg.validation),
        "member_files": {name: [_file_digest((spec.get("data") or {}).get(k)) for k in ("train", "validation")]
                         for name, spec in OmegaConf.to_container(data_cfg.tasks, resolve=True).items()},
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    labels = OmegaConf.select(task_cfg, "labels")
    if isinstance(labels, str):  # token_classification's tag set as a file: its contents count
        parts["labels_file"] = _file_digest(labels)
    parts["data"].pop("cache_dir", None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


Prepared = Tuple[List[Dict], List[Dict], Optional[int], Dict]  # train, validation, num_labels, report


def save_prepared(folder: Path, prepared: Prepared) -> None:
    train, val, num_labels, report = prepared
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(train).save_to_disk(str(tmp / "train"))
    Dataset.from_list(val).save_to_disk(str(tmp / "validation"))
    (tmp / "meta.json").write_text(json.dumps({"num_labels": num_labels, "report": report}))
    # Runs side by side (a sweep's workers, a test session's) may prepare the same data at
    # once. The first complete folder stays: replacing it would pull it from under a run
    # that found it and is reading it. A folder without meta.json is a leftover (complete
    # folders only ever appear by this rename), replaced.
    try:
        tmp.rename(folder)
    except OSError:
        if (folder / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)


def load_prepared(folder: Path) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text())
    train = load_from_disk(str(folder / "train")).to_list()
    val = load_from_disk(str(folder / "validation")).to_list()
    return train, val, meta["num_labels"], meta["report"]


def prepared_once(folder: Optional[Path], prepare: Callable[[], Prepared], backend) -> Tuple[Prepared, bool]:
    """Data prepared by rank 0 (or read from the cache) and shared with every rank.
    Returns (prepared, cache_hit). An error on rank 0 is raised on every rank."""
    from distft.errors import DataError, DistftError

    error, hit, prepared, failure = None, False, None, None
    if backend.is_main:
        try:
            if folder is not None and (folder / "meta.json").is_file():
                hit = True
            else:
                prepared = prepare()
                if folder is not None:
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    save_prepared(folder, prepared)
        except Exception as e:  # every failure is shared, or the other ranks would wait
            failure = e
            error = (type(e).__name__ if isinstance(e, DistftError) else "DataError",
                     str(e) if isinstance(e, DistftError) else f"data preparation failed on rank 0: {e!r}")
    error, hit = backend.broadcast_object((error, hit))
    if failure is not None:
        raise failure
    if error is not None:
        from distft import errors

        raise getattr(errors, error[0], DataError)(error[1])
    if folder is None:
        # No cache: every rank prepares for itself (rank 0 already has).
        return (prepared if prepared is not None else prepare()), False
    return (prepared if prepared is not None else load_prepared(folder)), hit

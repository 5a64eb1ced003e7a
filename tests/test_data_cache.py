"""Tokenised data is prepared once and cached, keyed by data + tokenizer + settings."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from distft.trainer import Trainer


def write_sst_like(path, n, flip=False):
    path.write_text("".join(json.dumps({"text": f"sentence number {i}", "label": (i + flip) % 2}) + "\n"
                            for i in range(n)))
    return path


def setup(cfg_for, tmp_path, name, *overrides):
    cfg = cfg_for("task=classification", "data=files", f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    cfg.run_dir = str(tmp_path / name)
    return Trainer(cfg).setup()


def test_second_run_reads_the_cache_and_a_changed_file_does_not(cfg_for, tmp_path, caplog):
    train = write_sst_like(tmp_path / "train.jsonl", 40)
    val = write_sst_like(tmp_path / "val.jsonl", 10)
    files = [f"data.train={train}", f"data.validation={val}"]
    first = setup(cfg_for, tmp_path, "a", *files)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with caplog.at_level("INFO", logger="distft"):
        second = setup(cfg_for, tmp_path, "b", *files)
    assert "cached in" in caplog.text
    assert second.train_examples == first.train_examples and second.num_labels == first.num_labels == 2

    write_sst_like(train, 40, flip=True)  # same size and names, other labels
    third = setup(cfg_for, tmp_path, "c", *files)
    assert [e["label"] for e in third.train_examples] != [e["label"] for e in first.train_examples]
    assert len(list((tmp_path / "cache").iterdir())) == 2

    setup(cfg_for, tmp_path, "d", *files, "data.max_length=8")  # a setting that changes the examples
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_cache_can_be_turned_off(cfg_for, tmp_path):
    cfg = cfg_for("data.cache_dir=null")
    t = Trainer(cfg).setup()
    assert t.train_examples


@pytest.mark.slow
def test_bad_data_stops_every_rank_without_a_hang(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distft.train",
           "backend=ddp", "data=files", f"data.train={bad}", f"run_dir={tmp_path / 'run'}", "backend.timeout_minutes=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"distft: error: {bad}:2: not valid JSON") == 2, proc.stderr[-2000:]


def test_a_second_writer_keeps_the_first_complete_folder(tmp_path):
    """Two runs preparing the same data at once: the one that finishes second leaves the
    first one's folder in place (a run may be reading it), and replaces only a leftover."""
    from distft.data.cache import load_prepared, save_prepared

    folder = tmp_path / "key"
    first = ([{"input_ids": [1, 2]}], [{"input_ids": [3]}], 2, {"rows": 1})
    save_prepared(folder, first)
    inode = (folder / "meta.json").stat().st_ino
    save_prepared(folder, ([{"input_ids": [9]}], [{"input_ids": [9]}], 2, {"rows": 1}))
    assert (folder / "meta.json").stat().st_ino == inode and load_prepared(folder) == first
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary folder left behind
    # a folder without meta.json (a leftover, never one this code completes) is replaced
    (folder / "meta.json").unlink()
    save_prepared(folder, first)
    assert load_prepared(folder) == first and (folder / "meta.json").stat().st_ino != inode

"""Data sources (JSONL, CSV, TSV, Parquet, a saved dataset), cleaning and its report."""
import json

import pytest
from datasets import Dataset, DatasetDict

from distft.errors import ConfigError, DataError
from distft.trainer import Trainer

ROWS = [{"text": f"the film was {w} number {i}", "label": i % 2}
        for i, w in enumerate(["good", "bad", "fine", "dull", "great", "awful", "nice", "poor"])]


def setup(cfg_for, *overrides):
    return Trainer(cfg_for("task=classification", "data=files", "data.cache_dir=null", *overrides)).setup()


def write_all(tmp_path, rows):
    """The same rows in every supported format."""
    paths = {}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["jsonl"] = jsonl
    ds = Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    paths["csv"] = tmp_path / "d.csv"
    ds.to_csv(str(tmp_path / "d.tsv"), index=False, sep="\t")
    paths["tsv"] = tmp_path / "d.tsv"
    ds.to_parquet(str(tmp_path / "d.parquet"))
    paths["parquet"] = tmp_path / "d.parquet"
    DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(str(tmp_path / "saved"))
    paths["disk"] = tmp_path / "saved"
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "disk"])
def test_every_format_gives_the_same_examples(cfg_for, tmp_path, fmt):
    paths = write_all(tmp_path, ROWS)
    ref = setup(cfg_for, f"data.train={paths['jsonl']}", f"data.validation={paths['jsonl']}",
                f"run_dir={tmp_path / 'ref'}")
    got = setup(cfg_for, f"data.train={paths[fmt]}", f"data.validation={paths[fmt]}", f"run_dir={tmp_path / fmt}")
    assert got.train_examples == ref.train_examples
    expected_val = ref.val_examples[:4] if fmt == "disk" else ref.val_examples  # its validation split
    assert got.val_examples == expected_val


def test_csv_errors_name_the_file_and_row(cfg_for, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,0\nno label here,\nalso fine,1\n")
    with pytest.raises(DataError, match=r"bad\.csv:row 2: missing field 'label'"):
        setup(cfg_for, f"data.train={bad}", f"data.validation={bad}")
    with pytest.raises(ConfigError, match=r"cannot tell the format.*data\.format"):
        other = tmp_path / "data.txt"
        other.write_text("x")
        setup(cfg_for, f"data.train={other}")


def test_cleaning_drops_and_reports_with_reasons(cfg_for, tmp_path):
    rows = ROWS + [ROWS[0], ROWS[1], {"text": "  ", "label": 0}, {"text": "x" * 300, "label": 1},
                   {"text": "a", "label": 0}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3] + [{"text": "unseen text", "label": 1}]))
    t = setup(cfg_for, f"data.train={train}", f"data.validation={val}", "data.dedup=true", "data.drop_empty=true",
              "data.too_long=drop", "data.max_length=64", "data.min_tokens=4", f"run_dir={tmp_path / 'run'}")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    tr = report["train"]
    assert tr["read"] == 13 and tr["kept"] == 8 == len(t.train_examples)
    assert tr["dropped"] == {"duplicate": 2, "empty": 1, "too_long": 1, "too_short": 1}
    assert tr["first_dropped"]["duplicate"] == [f"{train}:9", f"{train}:10"]
    assert tr["first_dropped"]["too_long"] == [f"{train}:12"]
    assert report["validation"]["kept"] == 4
    assert report["validation_also_in_train"] == 3

    # Without dropping, long examples are truncated and counted; empty text is an error.
    with pytest.raises(DataError, match=rf"{train}:11: field 'text' is empty \(data.drop_empty=true"):
        setup(cfg_for, f"data.train={train}", f"data.validation={val}", f"run_dir={tmp_path / 'r2'}")
    setup(cfg_for, f"data.train={train}", f"data.validation={val}", "data.drop_empty=true", "data.max_length=64",
          f"run_dir={tmp_path / 'r3'}")
    report = json.loads((tmp_path / "r3" / "data_report.json").read_text())
    assert report["train"]["truncated"] == 1 and report["train"]["kept"] == 12


def test_everything_filtered_out_is_an_error(cfg_for, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataError, match=r"all 8 train examples were filtered out \(too_long: 8\)"):
        setup(cfg_for, f"data.train={train}", f"data.validation={train}", "data.too_long=drop", "data.max_length=4")


def test_validation_is_held_out_with_the_seed(cfg_for, tmp_path):
    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(40)]
    train = tmp_path / "train.csv"
    Dataset.from_list(rows).to_csv(str(train), index=False)
    a = setup(cfg_for, f"data.train={train}", "data.validation_split=0.25", f"run_dir={tmp_path / 'a'}")
    b = setup(cfg_for, f"data.train={train}", "data.validation_split=0.25", f"run_dir={tmp_path / 'b'}")
    c = setup(cfg_for, f"data.train={train}", "data.validation_split=0.25", "seed=7", f"run_dir={tmp_path / 'c'}")
    assert len(a.val_examples) == 10 and len(a.train_examples) == 30
    assert a.val_examples == b.val_examples and a.val_examples != c.val_examples
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert "10 held out" in report["validation"]["source"]


def test_hub_without_network_names_the_dataset(cfg_for, tmp_path, monkeypatch):
    # No network, as the hub libraries see it. datasets and huggingface_hub read the
    # variables when imported (already done in this process), so set what they read;
    # otherwise each request waits for its connection timeout and retries.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data.train=no-such-user/no-such-dataset \(split 'train'\): could not load"):
        Trainer(cfg_for("data=hub", "data.train=no-such-user/no-such-dataset", "data.cache_dir=null")).setup()


def test_class_label_lists_become_tag_names_and_single_labels_stay_integers(tmp_path):
    """A hub NER dataset stores its tags as Sequence(ClassLabel) ids (WNUT-17's ner_tags):
    token_classification reads BIO strings, so lists of class labels are read as their names;
    a sentence label (one ClassLabel) stays the integer classification reads."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    from distft.data.sources import read_records

    features = Features({"tokens": Sequence(Value("string")),
                         "ner_tags": Sequence(ClassLabel(names=["O", "B-location", "I-location"])),
                         "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"tokens": [["New", "York", "is", "big"]], "ner_tags": [[1, 2, 0, 0]], "label": [1]},
                      features=features).save_to_disk(str(tmp_path / "saved"))
    (row,) = read_records(str(tmp_path / "saved"), "disk", "train")
    assert row["ner_tags"] == ["B-location", "I-location", "O", "O"] and row["label"] == 1

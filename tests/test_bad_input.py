"""Bad input stops before training with one message naming the file and line, or the key."""
import json
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import ROOT, run_cli
from distft.errors import ConfigError, DataError
from distft.trainer import Trainer


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def setup_with(cfg_for, *overrides):
    return Trainer(cfg_for(*overrides)).setup()


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "good.jsonl", [json.dumps({"text": f"example {i}", "label": i % 2}) for i in range(8)])


def test_missing_file(cfg_for, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        setup_with(cfg_for, "data=files", f"data.train={tmp_path / 'nope.jsonl'}")


def test_line_that_is_not_json(cfg_for, tmp_path, good):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine", "label": 0}', '{"text": "broken", "label": 1'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        setup_with(cfg_for, "data=files", "task=classification", f"data.train={bad}", f"data.validation={good}")


def test_missing_text_field(cfg_for, tmp_path, good):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine", "label": 0}', '{"sentence": "x", "label": 1}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        setup_with(cfg_for, "data=files", "task=classification", f"data.train={bad}", f"data.validation={good}")


def test_missing_label_field(cfg_for, tmp_path, good):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine", "label": 0}', '{"text": "no label"}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'label'"):
        setup_with(cfg_for, "data=files", "task=classification", f"data.train={bad}", f"data.validation={good}")


def test_empty_dataset(cfg_for, tmp_path):
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        setup_with(cfg_for, "data=files", f"data.train={empty}")


def test_label_outside_head_range(cfg_for, tmp_path, good):
    val = write(tmp_path / "val.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": 0}',
                                         '{"text": "c", "label": 2}'])
    with pytest.raises(DataError, match=r"val\.jsonl:3: label 2 is outside the head's range 0\.\.1"):
        setup_with(cfg_for, "data=files", "task=classification", "task.num_labels=2",
                   f"data.train={good}", f"data.validation={val}")


def test_non_integer_label(cfg_for, tmp_path, good):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "a", "label": "pos"}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: label 'label' must be an integer"):
        setup_with(cfg_for, "data=files", "task=classification", f"data.train={bad}", f"data.validation={good}")


def test_unknown_strategy_is_refused_at_compose(cfg_for):
    with pytest.raises(ConfigCompositionException, match="strategy"):
        cfg_for("strategy=ia3")


def test_typo_in_key_is_refused_at_compose(cfg_for):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_for("trainer.lrr=1e-3")
    assert "Key 'lrr' not in 'TrainerConfig'" in str(err.value.__cause__)
    # Forcing a new key with + passes Hydra, but not distft's own schema check.
    with pytest.raises(ConfigError, match="lrr"):
        Trainer(cfg_for("+trainer.lrr=1e-3")).setup()
    with pytest.raises(ConfigError, match="rank"):
        Trainer(cfg_for("strategy=lora", "+strategy.rank=4")).setup()
    with pytest.raises(ConfigCompositionException):
        cfg_for("strategy=lora", "strategy.rank=4")


def test_wrong_type_is_refused_at_compose(cfg_for):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_for("trainer.batch_size=many")
    assert isinstance(err.value.__cause__, ValidationError)


def test_impossible_combination_is_refused_before_any_work(cfg_for, tmp_path):
    with pytest.raises(ConfigError, match="strategy.head=mlp needs task=classification"):
        setup_with(cfg_for, "strategy=partial", "strategy.head=mlp", "task=causal_lm")
    assert not (tmp_path / "run").exists(), "a refused run must not create its run_dir"


def test_compile_on_zero3_is_refused_with_the_reason(cfg_for, tmp_path):
    with pytest.raises(ConfigError, match="trainer.compile=true with backend=zero3: ZeRO-3 gathers"):
        setup_with(cfg_for, "backend=zero3", "trainer.compile=true")
    assert not (tmp_path / "run").exists()


def test_unknown_eval_metric_is_refused_before_any_work(cfg_for):
    with pytest.raises(ConfigError, match="task.metric='f1' is not computed by task=classification"):
        setup_with(cfg_for, "task=classification", "task.metric=f1")


def test_bitfit_on_a_model_without_biases(cfg_for):
    with pytest.raises(ConfigError, match="no bias parameters"):
        setup_with(cfg_for, "strategy=bitfit", "model.from_config.attention_bias=false",
                   "model.from_config.mlp_bias=false")


def test_finished_run_dir_is_not_overwritten(cfg_for):
    cfg = cfg_for("trainer.max_steps=2", "resume=never")
    Trainer(cfg).setup().train()
    summary = (cfg.run_dir + "/summary.json")
    before = open(summary).read()
    for resume in ("never", "auto"):
        cfg.resume = resume
        with pytest.raises(ConfigError, match="already holds a finished run"):
            Trainer(cfg).setup()
    assert open(summary).read() == before


def test_resume_never_refuses_a_used_run_dir(cfg_for):
    cfg = cfg_for("trainer.max_steps=4", "trainer.save_every=2")
    t = Trainer(cfg).setup()
    t.save_checkpoint()  # an interrupted run: a checkpoint, no summary
    cfg.resume = "never"
    with pytest.raises(ConfigError, match="holds an earlier run"):
        Trainer(cfg).setup()


@pytest.mark.slow
def test_cli_reports_one_clear_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", ['{"text": "fine"}', "not json at all"])
    proc = run_cli(f"run_dir={tmp_path / 'run'}", "data=files", f"data.train={bad}", check=False)
    assert proc.returncode == 2
    assert f"distft: error: {bad}:2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(f"run_dir={tmp_path / 'run'}", "strategy=nonsense", check=False)
    assert proc.returncode != 0 and "strategy" in proc.stderr and "nonsense" in proc.stderr


def test_token_file_with_a_bad_line_stops_the_cli_with_one_line(tmp_path):
    """Through the real CLI: a tags list shorter than its words, on line 2 of the file."""
    good_rows = [json.dumps({"tokens": ["Ada", "codes"], "tags": ["B-person", "O"]})] * 3
    bad = write(tmp_path / "ner.jsonl", [good_rows[0], json.dumps({"tokens": ["a", "b", "c"], "tags": ["O", "O"]})])
    val = write(tmp_path / "val.jsonl", good_rows)
    proc = run_cli("task=token_classification", "data=files", f"data.train={bad}", f"data.validation={val}",
                   f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distft: error:")]
    assert errors == [f"distft: error: {bad}:2: 3 tokens but 2 tags; each word needs exactly one tag"]
    assert not (tmp_path / "run" / "final").exists()


def test_model_that_cannot_be_had_is_one_line(tmp_path):
    """A missing folder, a folder without a model, a file, and a hub id offline: each one
    line naming model.path, no traceback."""
    from distft.errors import ConfigError
    from distft.models.loading import check_model_source

    with pytest.raises(ConfigError, match="model.path=/nonexistent/model: no such folder"):
        check_model_source("/nonexistent/model")
    with pytest.raises(ConfigError, match=r"the folder holds no model \(no config.json\)"):
        check_model_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="a file, not a model folder"):
        check_model_source(str(tmp_path / "weights.bin"))
    assert check_model_source("org/name") is False  # a hub id: left to the hub
    proc = run_cli("model=hf", "model.path=gpt2", "task=classification", f"run_dir={tmp_path / 'run'}", check=False,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distft: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "model.path=gpt2: not a local folder, and the hub id could not be fetched" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0] and "set model.path=DIR" in errors[0]


def test_generate_and_predict_refuse_a_model_of_another_task(tmp_path):
    """Read from the folder's config before anything loads."""
    from distft.generate import not_a_causal_lm
    from distft.predict import not_a_classifier

    clf, lm, adapter = tmp_path / "clf", tmp_path / "lm", tmp_path / "adapter"
    for folder, body in ((clf, {"architectures": ["BertForSequenceClassification"]}),
                         (lm, {"architectures": ["LlamaForCausalLM"]})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(body))
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    assert "a BertForSequenceClassification model, not a causal language model" in not_a_causal_lm(clf)
    assert "an adapter for SEQ_CLS, not a causal language model" in not_a_causal_lm(adapter)
    assert not_a_causal_lm(lm) is None
    assert "a LlamaForCausalLM model, not a classifier" in not_a_classifier(lm)
    assert not_a_classifier(clf) is None and not_a_classifier(adapter) is None
    proc = subprocess.run([sys.executable, "-m", "distft.predict", str(lm), str(tmp_path / "in.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a classifier" in proc.stderr and "Traceback" not in proc.stderr

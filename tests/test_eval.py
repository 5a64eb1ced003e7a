"""distft-eval: an export's metrics on a dataset equal what its run reported; the same on 2
processes; lm-evaluation-harness on a local JSONL task; refusals in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, compose_cfg

pytestmark = pytest.mark.slow


def eval_cli(*args, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "distft.eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "distft.eval", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"distft-eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full fine-tune of a classifier and a LoRA causal LM (an adapter), each trained once."""
    from distft.train import run as train

    root = tmp_path_factory.mktemp("eval-runs")
    out = {}
    for name, overrides in {
        "classifier": ["task=classification", "strategy=full", "trainer.max_steps=12", "trainer.lr=3e-3"],
        "adapter": ["strategy=lora", "trainer.max_steps=12"],
    }.items():
        run_dir = root / name
        summary = train(compose_cfg(run_dir, [*TINY, *overrides, "trainer.eval_every=0", "trainer.save_every=0"]))
        out[name] = (run_dir, summary)
    return out


def test_classifier_export_gives_the_accuracy_its_run_reported(runs):
    run_dir, summary = runs["classifier"]
    proc = eval_cli(str(run_dir / "final"))
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["examples"] == 32 and result["task"] == "classification"
    assert result["metrics"]["accuracy"] == summary["eval/accuracy"]
    assert result["metrics"]["loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)
    assert f"accuracy  {summary['eval/accuracy']:.4f}" in proc.stdout


def test_adapter_gives_the_held_out_loss_its_run_reported_on_one_and_two_processes(runs, tmp_path):
    run_dir, summary = runs["adapter"]
    assert (run_dir / "final" / "adapter_config.json").is_file()
    eval_cli(str(run_dir / "final"), "--output", str(tmp_path / "one.json"))
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    assert one["loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)
    assert one["token_accuracy"] == pytest.approx(summary["eval/token_accuracy"], rel=1e-6)
    eval_cli(str(run_dir / "final"), "--output", str(tmp_path / "two.json"), nproc=2)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and two["metrics"]["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_another_dataset_by_override(runs, tmp_path):
    run_dir, _ = runs["classifier"]
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                            [("1 + 1 = 2", 1), ("2 + 2 = 5", 0), ("3 + 4 = 7", 1)]))
    eval_cli(str(run_dir / "final"), f"data.validation={data}", "--output", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["examples"] == 3 and result["data"] == str(data)
    assert result["metrics"]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_lm_eval_runs_a_local_jsonl_task(runs, tmp_path):
    pytest.importorskip("lm_eval")
    run_dir, _ = runs["adapter"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": f"{a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}"],
                                        "answer": 0}) + "\n" for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sums.yaml").write_text(
        "task: distft_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    proc = eval_cli(str(run_dir / "final"), "--lm-eval-tasks", "distft_sums", "--lm-eval-include", str(tasks),
                    "--output", str(tmp_path / "eval.json"))
    result = json.loads((tmp_path / "eval.json").read_text())
    acc = result["lm_eval"]["distft_sums"]["acc,none"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert "distft_sums/acc,none" in proc.stdout and "loss" in result["metrics"]


def test_refusals_are_one_line(runs, tmp_path):
    run_dir, _ = runs["classifier"]
    proc = eval_cli(str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "no such model folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = eval_cli(str(run_dir / "final"), "task=causal_lm", check=False)
    assert proc.returncode == 2 and "override dotted keys" in proc.stderr
    proc = eval_cli(str(run_dir / "final"), "--lm-eval-tasks", "x", check=False)
    assert proc.returncode == 2 and "evaluates causal language models" in proc.stderr
    # Outside its run folder the config is composed from the overrides: a classifier asked
    # to be a causal LM is refused from its config.json, before loading.
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(run_dir / "final", copy)
    proc = eval_cli(str(copy), "task=causal_lm", check=False)
    assert proc.returncode == 2 and "not a causal language model" in proc.stderr and "Traceback" not in proc.stderr

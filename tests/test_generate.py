"""distft-generate: prompts formatted as in training, answers that stop at the EOS, and the
base model's answers beside an adapter's."""
import json
import subprocess
import sys

from conftest import ROOT, TINY, run_cli


def generate(*args):
    proc = subprocess.run([sys.executable, "-m", "distft.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return proc


def test_trained_chat_model_answers_in_the_trained_format(tmp_path):
    run = tmp_path / "run"
    # The default tiny model on generated chat arithmetic: answers are digits, then EOS.
    run_cli("task=instruction", "task.template=chat", "logger=csv", "logger.progress_bar=false",
            "trainer.max_steps=120", "trainer.precision=fp32", f"run_dir={run}")
    proc = generate(str(run / "final"), "--prompt", "Add 12 plus 30.", "--prompt", "Add 3 plus 4.", "--json",
                    "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [a["prompt"] for a in answers] == ["Add 12 plus 30.", "Add 3 plus 4."]
    for a in answers:
        assert a["after"].isdigit(), f"the tuned model answers with a number and stops: {a['after']!r}"


def test_adapter_before_and_after(tmp_path):
    run = tmp_path / "run"
    run_cli(*TINY, "task=instruction", "strategy=lora", "trainer.max_steps=3", f"run_dir={run}")
    proc = generate(str(run / "final"), "--prompt", "Add the two numbers.", "--before", "--json",
                    "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [a] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert set(a) == {"prompt", "before", "after"}


def test_bad_folder_is_named(tmp_path):
    proc = generate(str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2 and f"{tmp_path}: not an exported model or adapter folder" in proc.stderr

"""A run killed with SIGKILL and resumed with resume=auto gives the same per-step losses
as an uninterrupted run (the torchtune recipe-test shape, through the real CLI)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, losses, read_metrics, run_cli

pytestmark = pytest.mark.slow

STEPS = 30
COMMON = [*TINY, f"trainer.max_steps={STEPS}", "trainer.save_every=3", "trainer.eval_every=10",
          "trainer.keep_checkpoints=2", "model.dropout=0.1", "trainer.grad_accum=2"]


def _kill_when_past(run_dir: Path, overrides, step: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "distft.train", *overrides, f"run_dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if metrics.exists() and any(e.get("step", 0) >= step for e in read_metrics(run_dir)):
                    break
            except json.JSONDecodeError:
                pass  # read while the trainer was appending a line: look again
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"


@pytest.mark.parametrize("strategy,kill_at", [("full", 7), ("lora", 17)])
def test_sigkill_then_resume_gives_the_same_losses(tmp_path, reference, strategy, kill_at):
    overrides = [*COMMON, f"strategy={strategy}", "trainer.lr=3e-3"]
    cut_dir = tmp_path / "killed"
    ref_dir = reference(*overrides)
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    _kill_when_past(cut_dir, overrides, kill_at)
    before = losses(cut_dir)
    assert max(before) >= kill_at
    run_cli(*overrides, f"run_dir={cut_dir}", "resume=auto")
    resumed = losses(cut_dir)

    assert sorted(resumed) == list(range(1, STEPS + 1)), "every step appears exactly once after resume"
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), f"step {step}"
    evals = [e for e in read_metrics(cut_dir) if "eval/loss" in e]
    assert [e["step"] for e in evals] == [10, 20, 30]


def test_incomplete_checkpoint_is_ignored(tmp_path, cfg_for):
    """A folder left by a kill mid-write (temporary name) is never taken for a checkpoint."""
    from distft.checkpoint import find_resume_checkpoint, list_checkpoints

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-9-123").mkdir(parents=True)
    (root / "step-6").mkdir()  # no state.json: incomplete
    (root / "step-3").mkdir()
    (root / "step-3" / "state.json").write_text("{}")
    assert list(list_checkpoints(root)) == [3]
    assert find_resume_checkpoint("auto", root).name == "step-3"
    assert find_resume_checkpoint("never", root) is None

"""SIGUSR1/SIGTERM stop a run after the current step with a checkpoint; the same command
resumes it and ends with the losses of an uninterrupted run (real processes, real
signals; the SLURM side is in test_slurm.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, losses, read_metrics, run_cli, torchrun_cmd

pytestmark = pytest.mark.slow

STEPS = 40
COMMON = [*TINY, f"trainer.max_steps={STEPS}", "trainer.lr=3e-3", "model.dropout=0.1", "trainer.eval_every=10",
          "logger.log_every=1"]


def _signal_when(proc, run_dir, sig, at_step=3, pid=None):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(e.get("step", 0) >= at_step for e in read_metrics(run_dir)):
            os.kill(pid or proc.pid, sig)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {at_step}: {proc.poll()}")


def _same_as_reference(ref_dir, run_dir):
    reference, resumed = losses(ref_dir), losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    ref = json.loads((ref_dir / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["eval/loss"] == pytest.approx(ref["eval/loss"], rel=1e-5)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_stops_with_a_checkpoint_and_the_same_command_resumes(tmp_path, reference, sig):
    cut = tmp_path / "cut"
    ref = reference(*COMMON)
    proc = subprocess.Popen([sys.executable, "-m", "distft.train", *COMMON, f"run_dir={cut}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_when(proc, cut, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    marker = json.loads((cut / "preempted.json").read_text())
    assert marker["signal"] == sig.name and 3 <= marker["step"] < STEPS
    assert f"stopped by {sig.name} after step {marker['step']} of {STEPS}" in out
    assert (cut / "checkpoints" / f"step-{marker['step']}" / "state.json").is_file()
    assert not (cut / "summary.json").exists() and not (cut / "final").exists()

    proc = run_cli(*COMMON, f"run_dir={cut}")
    at = marker["step"]
    assert f"resumed from {cut / 'checkpoints' / f'step-{at}'}" in proc.stdout + proc.stderr
    assert not (cut / "preempted.json").exists()
    _same_as_reference(ref, cut)


def test_sigterm_to_torchrun_reaches_every_rank(tmp_path, reference):
    """A scheduler terminating the launcher: torchrun passes SIGTERM to its workers, which
    agree on one last step and write one checkpoint together."""
    overrides = [*COMMON, "backend=ddp", "trainer.batch_size=4"]
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_cmd(2, *overrides)
    ref = reference(*overrides, nproc=2)
    proc = subprocess.Popen([*cmd, f"run_dir={cut}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _signal_when(proc, cut, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    marker = json.loads((cut / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] < STEPS, out[-2000:] + err[-3000:]
    state = json.loads((cut / "checkpoints" / f"step-{marker['step']}" / "state.json").read_text())
    assert state["world_size"] == 2

    r = subprocess.run([*cmd, f"run_dir={cut}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_as_reference(ref, cut)


def test_stop_signals_are_checked_at_config_time(tmp_path):
    proc = run_cli(*TINY, "trainer.max_steps=1", "trainer.stop_signals=[SIGKILL]", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "trainer.stop_signals: 'SIGKILL' is not a signal a process can catch" in proc.stdout + proc.stderr


def test_sequential_experiment_stops_in_a_stage_and_resumes_there(tmp_path, reference):
    from test_sequential import stages_args

    args = [*TINY, *stages_args(tmp_path), "trainer.max_steps=30", "trainer.lr=3e-3", "logger.log_every=1"]
    cut = tmp_path / "cut"
    ref = reference(*args)
    proc = subprocess.Popen([sys.executable, "-m", "distft.train", *args, f"run_dir={cut}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_when(proc, cut / "stages" / "2-color", signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "(stage color)" in out
    marker = json.loads((cut / "preempted.json").read_text())  # where a launcher looks
    assert "2-color" in marker["checkpoint"]
    assert (cut / "stages" / "1-sent" / "summary.json").is_file()
    assert not (cut / "forgetting.json").exists()

    again = run_cli(*args, f"run_dir={cut}")
    assert "already finished" in again.stdout + again.stderr
    assert not (cut / "preempted.json").exists()
    expected = json.loads((ref / "forgetting.json").read_text())["matrix"]
    got = json.loads((cut / "forgetting.json").read_text())["matrix"]
    for row, ref_row in zip(got, expected):
        for v, e in zip(row, ref_row):
            assert (v is None and e is None) or v == pytest.approx(e, rel=1e-6), (got, expected)
    stage2_ref, stage2 = losses(ref / "stages" / "2-color"), losses(cut / "stages" / "2-color")
    assert sorted(stage2) == list(range(1, 31))
    assert [stage2[k] for k in sorted(stage2)] == pytest.approx([stage2_ref[k] for k in sorted(stage2_ref)], rel=1e-5)

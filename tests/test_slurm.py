"""The sbatch scripts on a real SLURM cluster on localhost (tests/slurm_cluster.py): two
slurmd daemons, so a --nodes=2 job really spans two nodes, each running its own launcher.

Skipped, with the reason, only where SLURM cannot be installed (not root, no apt); under
CI=true that is a failure instead."""
import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, losses, read_metrics
from slurm_cluster import ClusterUnavailable, LocalSlurm

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests: {e}")
        pytest.skip(f"no SLURM cluster: {e}")
    yield c
    c.stop()


def submit(cluster, tmp_path, script, *overrides, sbatch_flags=()):
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch([f"--output={log}", *sbatch_flags, script, *overrides], cwd=ROOT,
                         env={"PYTHON": sys.executable})
    return job, Path(str(log).replace("%j", str(job)))


def finished(cluster, job, log, timeout=400):
    info = cluster.wait_finished(job, timeout)
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-6000:]}\n{cluster.logs()}"
    return info, text


_uninterrupted = {}


def uninterrupted_job(cluster, tmp_path_factory, script, overrides):
    """The reference job of the preemption tests, run once per (script, overrides)."""
    key = (script, tuple(overrides))
    if key not in _uninterrupted:
        folder = tmp_path_factory.mktemp("uninterrupted")
        job, log = submit(cluster, folder, script, *overrides, f"run_dir={folder / 'ref'}")
        finished(cluster, job, log)
        _uninterrupted[key] = folder / "ref"
    return _uninterrupted[key]


def preemption_overrides(backend):
    return [*TINY, "trainer.max_steps=60", "trainer.lr=3e-3", "model.dropout=0.1", "trainer.eval_every=20",
            "logger.log_every=1", f"backend={backend}", "trainer.batch_size=4"]


def nodes_that_launched(text):
    return sorted(set(re.findall(r"\[distft\] (\S+) \(node \d\): starting the launcher", text)))


@pytest.mark.parametrize("script,backend", [("slurm/train.sbatch", "ddp"), ("slurm/deepspeed.sbatch", "zero2")])
def test_two_node_job_trains_like_one_process(cluster, tmp_path, reference, script, backend):
    """2 nodes x 1 process through each script: the same losses as one process with the
    same global batch."""
    common = [*TINY, f"trainer.max_steps={STEPS}", "trainer.lr=3e-3"]
    one = reference(*common, "trainer.batch_size=8")
    job, log = submit(cluster, tmp_path, script, *common, f"backend={backend}", "trainer.batch_size=4",
                      f"run_dir={tmp_path / 'job'}")
    info, text = finished(cluster, job, log)
    assert info["NumNodes"] == "2" and nodes_that_launched(text) == ["n1", "n2"], text[-3000:]
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["backend"] == backend
    expected, got = losses(one), losses(tmp_path / "job")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"


@pytest.mark.parametrize("script,backend", [("slurm/train.sbatch", "ddp"), ("slurm/deepspeed.sbatch", "zero2")])
def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, tmp_path_factory, script, backend):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@N sends before a time limit):
    every rank stops after the same step with a checkpoint, the job requeues itself and
    the second run resumes from it and ends with the losses of an uninterrupted job."""
    steps = 60
    overrides = preemption_overrides(backend)
    ref = uninterrupted_job(cluster, tmp_path_factory, script, overrides)

    cut = tmp_path / "cut"
    job, log = submit(cluster, tmp_path, script, *overrides, f"run_dir={cut}")
    deadline = time.time() + 300
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and any(e.get("step", 0) >= 3 for e in read_metrics(cut)):
            break
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.05)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    # The requeued job starts again once its old credential expired (cred_expire, 10 s here).
    info, text = finished(cluster, job, log)

    assert info["Restarts"] == "1", text[-4000:]
    stopped = re.findall(r"stopped by SIGUSR1 after step (\d+) of 60", text)
    assert stopped, text[-4000:]
    at = int(stopped[0])
    assert 3 <= at < steps
    assert f"requeueing job {job}" in text
    assert f"resumed from {cut / 'checkpoints' / f'step-{at}'}" in text, text[-4000:]
    assert not (cut / "preempted.json").exists()
    reference, resumed = losses(ref), losses(cut)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    ref_summary = json.loads((ref / "summary.json").read_text())
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["eval/loss"] == pytest.approx(ref_summary["eval/loss"], rel=1e-5)


def test_cancelled_job_leaves_a_checkpoint_that_a_new_job_resumes(cluster, tmp_path, tmp_path_factory):
    """`scancel JOB` (or a time limit, or preemption without requeue): SLURM sends SIGTERM
    to every process, they write a checkpoint before KillWait runs out, and submitting
    the same command again continues it to the losses of an uninterrupted job."""
    steps = 60
    overrides = preemption_overrides("ddp")
    ref = uninterrupted_job(cluster, tmp_path_factory, "slurm/train.sbatch", overrides)  # shared with the USR1 test

    cut = tmp_path / "cut"
    job, log = submit(cluster, tmp_path, "slurm/train.sbatch", *overrides, f"run_dir={cut}")
    deadline = time.time() + 300
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and any(e.get("step", 0) >= 3 for e in read_metrics(cut)):
            break
        time.sleep(0.05)
    cluster.run(["scancel", str(job)])
    info = cluster.wait_finished(job, 120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    marker = json.loads((cut / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and 3 <= marker["step"] < steps, log.read_text()[-3000:]

    again, again_log = submit(cluster, tmp_path, "slurm/train.sbatch", *overrides, f"run_dir={cut}")
    _, text = finished(cluster, again, again_log)
    assert f"resumed from {cut / 'checkpoints' / ('step-%d' % marker['step'])}" in text
    reference, resumed = losses(ref), losses(cut)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"


def test_array_job_runs_one_config_per_task(cluster, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\ntrainer.lr=1e-4\n\ntrainer.lr=2e-3 scheduler=constant\n")
    log = tmp_path / "array-%A_%a.out"
    job = cluster.sbatch(["--array=0-2", f"--output={log}", "slurm/array.sbatch", str(sweep), *TINY,
                          "trainer.max_steps=4"], cwd=ROOT,
                         env={"PYTHON": sys.executable, "DISTFT_OUTPUTS": str(tmp_path / "out")})
    # Tasks 0 and 1 run; task 2 has no line in the file and fails with the reason.
    deadline = time.time() + 300
    while time.time() < deadline:
        tasks = {t.get("ArrayTaskId"): t.get("JobState") for t in cluster.array_jobs(job)}
        if len(tasks) == 3 and all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in tasks.values()):
            break
        time.sleep(0.5)
    logs = {i: Path(str(log).replace("%A", str(job)).replace("%a", str(i))) for i in range(3)}
    assert tasks == {"0": "COMPLETED", "1": "COMPLETED", "2": "FAILED"}, (tasks, logs[0].read_text()[-3000:])
    assert f"array task 2 but {sweep} has 2 run line(s) (tasks 0-1)" in logs[2].read_text()
    for i, (lr, scheduler) in enumerate([(1e-4, "cosine"), (2e-3, "constant")]):
        run_dir = tmp_path / "out" / f"slurm-distft-array-{job}-{i}"
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
        config = (run_dir / "config.yaml").read_text()
        assert f"lr: {lr}" in config and f"shape: {scheduler}" in config, config  # the scheduler node
        assert [e["lr"] for e in read_metrics(run_dir) if "lr" in e][0] == pytest.approx(lr)


def test_sweep_array_job_runs_two_workers_on_one_study(cluster, tmp_path):
    folder = tmp_path / "study"
    log = tmp_path / "sweep-%A_%a.out"
    job = cluster.sbatch(["--array=0-1", f"--output={log}", "slurm/sweep.sbatch", "sweep=tiny_lr", f"sweep.dir={folder}",
                          "sweep.n_trials=4", *TINY, "trainer.max_steps=6", "trainer.eval_every=3",
                          "trainer.save_every=0"], cwd=ROOT,
                         env={"PYTHON": sys.executable})
    deadline = time.time() + 400
    while time.time() < deadline:
        tasks = {t.get("ArrayTaskId"): t.get("JobState") for t in cluster.array_jobs(job)}
        if len(tasks) == 2 and all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in tasks.values()):
            break
        time.sleep(0.5)
    logs = {i: Path(str(log).replace("%A", str(job)).replace("%a", str(i))) for i in range(2)}
    assert tasks == {"0": "COMPLETED", "1": "COMPLETED"}, (tasks, [p.read_text()[-3000:] for p in logs.values()])
    for i in range(2):
        assert f"sweep worker {i}" in logs[i].read_text()
    with open(folder / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    # Four trials between them, each run once, each in its own folder with its summary.
    assert sorted(int(t["number"]) for t in trials) == [0, 1, 2, 3]
    assert [t["state"] for t in trials] == ["complete"] * 4, trials
    assert len({t["run_dir"] for t in trials}) == 4
    for t in trials:
        assert json.loads((Path(t["run_dir"]) / "summary.json").read_text())["objective"] == float(t["objective"])

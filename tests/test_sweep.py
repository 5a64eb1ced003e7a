"""distft-sweep on the tiny model: grid and TPE studies, best.yaml, parallel workers on one
study, a killed worker, a distributed trial, pruning, bad spaces; and Hydra's --multirun.
Every trial is a real distft-train process; the study a real Optuna journal file."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, read_metrics, run_cli

optuna = pytest.importorskip("optuna")

pytestmark = pytest.mark.slow

# Each trial: 8 steps, evals at 4 and 8.
FAST = [*TINY, "trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=4"]
GRID3 = ["sweep.space.trainer.warmup_ratio=null",
         "sweep.space.trainer.lr={type:float,low:1e-4,high:1e-1,log:true,values:[1e-3,3e-3,1e-2]}"]


def sweep(folder, *overrides, check=True, timeout=600, threads="1", **popen):
    """threads: the OMP_NUM_THREADS it runs with; None: unset (distft-sweep's own share)."""
    cmd = [sys.executable, "-m", "distft.sweep", "sweep=tiny_lr", f"sweep.dir={folder}", *FAST, *overrides]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def rows(folder):
    with open(Path(folder) / "trials.csv") as f:
        return list(csv.DictReader(f))


def trial_lrs(folder):
    """The learning rate each trial's run really used (its first logged step)."""
    out = {}
    for r in rows(folder):
        if r["run_dir"] and (Path(r["run_dir"]) / "metrics.jsonl").exists():
            out[int(r["number"])] = [e["lr"] for e in read_metrics(r["run_dir"]) if "lr" in e][-1]
    return out


def test_grid_with_two_workers_runs_every_point_once(tmp_path):
    folder = tmp_path / "grid"
    proc = sweep(folder, "sweep.sampler=grid", *GRID3, "sweep.workers=2", "scheduler=constant", threads=None)
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # the two workers split this machine's cores
    assert f"2 workers, OMP_NUM_THREADS={share} for each trial process" in proc.stderr, proc.stderr[-3000:]
    table = rows(folder)
    assert [r["state"] for r in table] == ["complete"] * 3, table
    lrs = sorted(float(r["trainer.lr"]) for r in table)
    assert lrs == pytest.approx([1e-3, 3e-3, 1e-2])  # each point once, none twice
    # Both workers took trials (their ids are in the study), and each trial ran at its lr.
    study = optuna.load_study(study_name="tiny_lr", storage=_storage(folder))
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2, [t.user_attrs for t in study.trials]
    ran = trial_lrs(folder)
    for r in table:
        assert ran[int(r["number"])] == pytest.approx(float(r["trainer.lr"]))
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["objective"]) == summary["objective"]
    for name in ("history.png", "params.png", "best.yaml"):
        assert (folder / name).stat().st_size > 1000
    assert "best: trial" in proc.stdout and "rerun it: distft-train --config-path" in proc.stdout


def test_tpe_sweep_and_best_yaml_reproduces_the_best_trial(tmp_path):
    folder = tmp_path / "tpe"
    sweep(folder, "sweep.n_trials=3")
    table = rows(folder)
    assert len(table) == 3 and all(r["state"] == "complete" for r in table), table
    assert len({r["trainer.lr"] for r in table}) == 3  # sampled, not repeated
    best = min(table, key=lambda r: float(r["objective"]))  # causal_lm: loss, minimised
    text = (folder / "best.yaml").read_text()
    assert f"trial {best['number']}," in text
    assert (folder / "history.png").stat().st_size > 1000 and (folder / "params.png").stat().st_size > 1000
    # Rerun it as the README says: the same objective, to the last digit.
    rerun = tmp_path / "rerun"
    proc = subprocess.run([sys.executable, "-m", "distft.train", "--config-path", str(folder), "--config-name", "best",
                           f"run_dir={rerun}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((rerun / "summary.json").read_text())["objective"] == float(best["objective"])
    # The same command again adds nothing (the study is complete); more trials extend it.
    sweep(folder, "sweep.n_trials=3")
    assert len(rows(folder)) == 3


def test_stopped_or_killed_worker_then_the_same_command_completes_the_study(tmp_path):
    folder = tmp_path / "killed"
    args = ["sweep.n_trials=2", "trainer.max_steps=40", "trainer.save_every=5", "trainer.eval_every=20"]
    run0 = folder / "trials" / "0000"

    def start_and_wait_for_a_new_checkpoint():
        seen = set(run0.glob("checkpoints/step-*"))
        worker = sweep(folder, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not set(run0.glob("checkpoints/step-*")) - seen:
            assert worker.poll() is None, "the worker ended before it was stopped"
            time.sleep(0.2)
        return worker

    # SIGTERM (a cancelled SLURM task): the trial checkpoints, the worker queues it again and exits.
    worker = start_and_wait_for_a_new_checkpoint()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0
    study = optuna.load_study(study_name="tiny_lr", storage=_storage(folder))
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    # SIGKILL: nothing runs in the worker; its trial dies with it (PR_SET_PDEATHSIG) and
    # stays RUNNING in the study until a worker looks.
    worker = start_and_wait_for_a_new_checkpoint()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(1.0)
    study = optuna.load_study(study_name="tiny_lr", storage=_storage(folder))
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]
    proc = sweep(folder, *args)
    assert "is gone; marking it failed" in proc.stderr
    table = rows(folder)
    states = [(r["number"], r["state"], r["retry_of"]) for r in table]
    # Trials 1 and 2 took trial 0's parameters and run folder, each resuming from the last
    # checkpoint; one more trial made the study's 2.
    assert states == [("0", "fail", ""), ("1", "fail", "0"), ("2", "complete", "1"), ("3", "complete", "")], states
    assert {r["trainer.lr"] for r in table[:3]} == {table[0]["trainer.lr"]}
    assert {r["run_dir"] for r in table[:3]} == {str(run0)}
    assert (run0 / "trial.log").read_text().count("resumed from") == 2
    assert json.loads((run0 / "summary.json").read_text())["steps"] == 40


def test_two_process_trial_gets_the_same_parameters_on_both_ranks(tmp_path):
    folder = tmp_path / "ddp"
    sweep(folder, "sweep.n_trials=1", "sweep.nproc=2", "backend=ddp")
    (r,) = rows(folder)
    assert r["state"] == "complete"
    summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
    assert summary["processes"] == 2
    log = (Path(r["run_dir"]) / "trial.log").read_text()
    assert "trial 0: 2 rank(s) train with trainer.lr=" in log, log[-3000:]
    assert f"trainer.lr={r['trainer.lr']}" in log.replace(repr(float(r["trainer.lr"])), r["trainer.lr"])


def test_median_pruner_stops_a_bad_trial_and_keeps_its_folder(tmp_path):
    folder = tmp_path / "pruned"
    # Grid order is the enqueue order: a good learning rate first, then one that barely
    # moves the loss; the median of trial 0 at the first eval prunes trial 1 there.
    sweep(folder, "sweep.sampler=grid", "sweep.space.trainer.warmup_ratio=null",
          "sweep.space.trainer.lr={type:categorical,choices:[0.01,1e-7]}",
          "sweep.pruner=median", "sweep.pruner_startup_trials=1", "trainer.max_steps=16", "trainer.eval_every=4")
    table = rows(folder)
    assert [r["state"] for r in table] == ["complete", "pruned"], table
    assert int(table[0]["steps"]) == 16 and int(table[1]["steps"]) == 4
    assert json.loads((Path(table[1]["run_dir"]) / "summary.json").read_text())["stop_reason"].startswith("pruned")


def test_prune_on_loss_reports_the_eval_loss_in_the_studys_direction(tmp_path):
    """sweep.prune_on=loss: the pruner sees each eval's loss (negated, as the study maximises
    accuracy here) while the trial is still ranked by its objective."""
    from distft.sweep import storage

    folder = tmp_path / "on_loss"
    sweep(folder, "task=classification", "task.metric=accuracy", "task.greater_is_better=true", "sweep.sampler=grid",
          "sweep.space.trainer.warmup_ratio=null", "sweep.space.trainer.lr={type:categorical,choices:[0.01,0.003]}",
          "sweep.pruner=median", "sweep.pruner_startup_trials=1", "sweep.prune_on=loss")
    st = storage(folder)
    study = optuna.load_study(study_name=optuna.get_all_study_names(st)[0], storage=st)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in study.trials:
        evals = {e["step"]: e for e in read_metrics(t.user_attrs["run_dir"]) if "eval/loss" in e}
        assert t.intermediate_values and set(t.intermediate_values) <= set(evals)
        assert all(v == -evals[step]["eval/loss"] for step, v in t.intermediate_values.items())
        if t.state == optuna.trial.TrialState.COMPLETE:  # ranked by accuracy (of the exported weights)
            summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
            assert t.value == summary["objective"] and t.value in {e["eval/accuracy"] for e in evals.values()}


def _decisions(percentile, startup=4, warmup_evals=1, value=0.75, step=4):
    """build_pruner's decision on a trial reporting `value` after four finished trials
    that reached 0.9, 0.8, 0.7 and 0.6 at the same step (an in-memory study, no training)."""
    import optuna
    from omegaconf import OmegaConf

    from distft.sweep import build_pruner

    s = OmegaConf.create({"pruner": "percentile", "pruner_percentile": percentile, "pruner_startup_trials": startup,
                          "pruner_warmup_evals": warmup_evals})
    study = optuna.create_study(direction="maximize", pruner=build_pruner(s))
    for v in (0.9, 0.8, 0.7, 0.6):
        t = study.ask()
        t.report(v, step)
        study.tell(t, v)
    t = study.ask()
    t.report(value, step)
    return t.should_prune()


def test_percentile_pruner_keeps_the_given_share_of_trials():
    # 0.75 beats half of the finished trials at that step: kept in the top 50 or 70%, pruned
    # when only the top 25% go on; never before the startup trials finish or before the
    # warm-up evals (two here, one reported).
    assert not _decisions(50) and not _decisions(70)
    assert _decisions(25)
    assert not _decisions(25, startup=5)
    assert not _decisions(25, warmup_evals=2)
    from omegaconf import OmegaConf

    from distft.errors import ConfigError
    from distft.sweep import build_pruner

    for bad in (0, 101):
        with pytest.raises(ConfigError, match=f"sweep.pruner_percentile={bad}: the share of trials kept"):
            build_pruner(OmegaConf.create({"pruner": "percentile", "pruner_percentile": bad,
                                           "pruner_startup_trials": 4, "pruner_warmup_evals": 1}))


def test_successive_halving_keeps_the_top_of_each_rung():
    """ASHA: at its first rung (trainer.eval_every's step unless pruner_min_resource is set) a
    trial goes on only in the top 1/reduction_factor of the trials that reached it."""
    import optuna
    from omegaconf import OmegaConf

    from distft.errors import ConfigError
    from distft.sweep import build_pruner

    def decision(value, eval_every=4, **settings):
        s = OmegaConf.create({"pruner": "successive_halving", "pruner_startup_trials": 4, "pruner_warmup_evals": 1,
                              **settings})
        study = optuna.create_study(direction="maximize", pruner=build_pruner(s, eval_every))
        rung_at_4 = settings.get("pruner_min_resource", eval_every) == 4
        for v in (0.9, 0.8, 0.7):
            t = study.ask()
            t.report(v, 4)
            decided = t.should_prune()
            assert decided == (v != 0.9 and rung_at_4)  # the first is the best at the rung so far
            study.tell(t, v)
        t = study.ask()
        t.report(value, 4)
        return t.should_prune()

    assert decision(0.75) and not decision(0.95)  # 4 at the rung: the best one goes on
    assert decision(0.75, pruner_reduction_factor=2) and not decision(0.85, pruner_reduction_factor=2)  # top 2
    assert not decision(0.75, pruner_min_resource=8)  # the first rung is at step 8: nothing decided at 4
    assert not decision(0.75, eval_every=8)
    for bad, message in (({"pruner_reduction_factor": 1}, "sweep.pruner_reduction_factor=1: at least 2"),
                         ({"pruner_min_resource": 0}, "sweep.pruner_min_resource=0: the first rung's step"),
                         ({"pruner_min_early_stopping_rate": -1}, "cannot be negative")):
        with pytest.raises(ConfigError, match=message):
            build_pruner(OmegaConf.create({"pruner": "successive_halving", "pruner_startup_trials": 4,
                                           "pruner_warmup_evals": 1, **bad}), 4)


def test_local_workers_share_the_cores_unless_omp_num_threads_is_set():
    from distft.sweep import shared_threads

    assert shared_threads(2, 1, {}, cpus=2) == {"OMP_NUM_THREADS": "1"}
    assert shared_threads(2, 1, {}, cpus=16) == {"OMP_NUM_THREADS": "8"}
    assert shared_threads(2, 2, {}, cpus=16) == {"OMP_NUM_THREADS": "4"}  # torchrun trials: per rank
    assert shared_threads(4, 1, {}, cpus=2) == {"OMP_NUM_THREADS": "1"}  # never 0
    assert shared_threads(2, 1, {"OMP_NUM_THREADS": "3"}, cpus=16) == {}  # the caller's choice stands


def test_threshold_pruner_stops_what_is_worse_than_the_limit_in_the_studys_direction():
    """sweep.pruner=threshold: no comparison with other trials; a trial stops at its first
    eval past the limit, on the side the direction makes worse (the loss reported negated
    when the study maximises, as attach_trial reports it), from the warm-up eval on."""
    import optuna
    from omegaconf import OmegaConf

    from distft.errors import ConfigError
    from distft.sweep import build_pruner

    def decision(values, direction="maximize", prune_on="loss", limit=0.68, warmup_evals=1):
        s = OmegaConf.create({"pruner": "threshold", "pruner_threshold": limit, "prune_on": prune_on,
                              "pruner_startup_trials": 4, "pruner_warmup_evals": warmup_evals})
        study = optuna.create_study(direction=direction, pruner=build_pruner(s, 8))
        t = study.ask()
        for i, v in enumerate(values):
            t.report(v, 8 * (i + 1))
        return t.should_prune()

    assert decision([-0.6931]) and not decision([-0.6514])  # a loss of 0.693 is above 0.68: at chance
    assert decision([0.6931], direction="minimize") and not decision([0.6514], direction="minimize")
    assert not decision([-0.6931], warmup_evals=2) and decision([-0.6931, -0.6925], warmup_evals=2)
    assert not decision([-0.6931, -0.61], warmup_evals=2)  # judged at the latest eval
    assert decision([0.51], prune_on="objective", limit=0.6) and not decision([0.74], prune_on="objective", limit=0.6)
    assert decision([0.9], direction="minimize", prune_on="objective", limit=0.6)
    for bad, message in (({}, "sweep.pruner=threshold needs sweep.pruner_threshold"),
                         ({"pruner_threshold": float("nan")}, "needs sweep.pruner_threshold"),
                         ({"pruner_threshold": 0.0, "prune_on": "loss"}, "a loss is never below 0")):
        with pytest.raises(ConfigError, match=message):
            build_pruner(OmegaConf.create({"pruner": "threshold", "pruner_startup_trials": 4,
                                           "pruner_warmup_evals": 1, **bad}), 8)


@pytest.mark.parametrize("override,message", [
    ("sweep.space.trainer.lrr={type:float,low:1e-4,high:1e-2}", "sweep.space.trainer.lrr: no key trainer.lrr"),
    ("sweep.space.trainer.lr={type:float,low:1e-2,high:1e-2}", "sweep.space.trainer.lr: empty range"),
    ("sweep.space.trainer.lr={type:float,low:0.0,high:1e-2,log:true}", "a log range must be above zero"),
    ("sweep.space.trainer.lr={type:categorical,choices:[1e-3]}", "needs at least two choices"),
    ("sweep.space.trainer.batch_size={type:float,low:2.5,high:8.5}", "the sweep's space gives an invalid config"),
    ("sweep.sampler=annealing", "sweep.sampler=annealing: one of tpe, gp, random, grid"),
    ("sweep.prune_on=accuracy", "sweep.prune_on=accuracy: objective (task.metric, loss) or loss"),
    ("sweep.pruner=threshold", "sweep.pruner=threshold needs sweep.pruner_threshold"),
    ("sweep.pruner_threshold=0.68", "is the threshold pruner's, and sweep.pruner=none"),
])
def test_bad_space_is_refused_before_any_trial(tmp_path, override, message):
    folder = tmp_path / "bad"
    proc = sweep(folder, override, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distft-sweep: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not (folder / "trials").exists() or not any((folder / "trials").iterdir())


def test_hydra_multirun_grid_gives_each_job_its_own_run_folder(tmp_path):
    out = tmp_path / "multi"
    run_cli("--multirun", *TINY, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.lr=1e-3,2e-3",
            f"run_dir={out}")
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        run = out / str(job)
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
        assert [e["lr"] for e in read_metrics(run) if "lr" in e][0] == pytest.approx(lr)


def _storage(folder):
    from distft.sweep import storage

    return storage(Path(folder))

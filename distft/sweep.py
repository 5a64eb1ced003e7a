"""`distft-sweep`: a hyperparameter search with Optuna over any config key.

    distft-sweep sweep=tiny_lr                          # conf/sweep/tiny_lr.yaml, TPE
    distft-sweep sweep=lora_sst2 sweep.sampler=grid     # ... overrides as for distft-train
    distft-sweep sweep=lora_sst2 sweep.workers=2        # two workers on one study
    sbatch --array=0-3 slurm/sweep.sbatch sweep=lora_sst2   # four SLURM tasks, one study

The space lives in config (`sweep.space`: key -> {type, low, high, log, step, choices}).
Every trial is its own `distft-train` process (or a `torchrun` of `sweep.nproc` processes)
with the sampled values as overrides and its own run folder, so a trial cannot leak memory
into the next and every rank of a distributed trial reads the same parameters from its
command line. The trial's objective is its run summary's `objective` (task.metric of the
exported weights). With a pruner, the trial process reports each eval to the study through
the trainer's on_eval hook and stops when the pruner says so (its run folder is kept).

The study is an Optuna journal file in `sweep.dir` (SQLite is not safe for concurrent
writers): any number of workers, on this machine or on the nodes of a shared filesystem,
each take the next trial. A worker marks the trials it runs with its host, process and a
heartbeat file; a RUNNING trial whose worker is gone is failed and retried in its own run
folder, resuming from its last checkpoint. Optuna's own heartbeat exists only for its RDB
storage and only inside `study.optimize`, whose per-worker trial counts do not fit a study
with a fixed total and a grid shared by workers; hence the small bookkeeping here.

Writes, in sweep.dir: study.journal, trials.csv, history.png, params.png, best.yaml
(`distft-train --config-path <sweep.dir> --config-name best` reruns the best trial), and
trials/<number>/ (each trial's run folder and trial.log).
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from distft.errors import ConfigError, DistftError

log = logging.getLogger("distft.sweep")

TRIAL_ENV = "DISTFT_SWEEP_TRIAL"  # set for a trial's processes: {"dir", "study", "trial_id", "number"}
SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "threshold")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "values"}
_NOT_FOUND = object()


# --------------------------------------------------------------------------- the space
class Param:
    """One searched key: how to sample it, its grid values, and its override."""

    def __init__(self, key: str, spec: Dict[str, Any]):
        self.key = key
        where = f"sweep.space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping such as {{type: float, low: 1e-5, high: 1e-3, log: true}}, "
                              f"got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; a parameter has {sorted(_SPEC_KEYS)}")
        self.type = spec.get("type") or ("categorical" if "choices" in spec else None)
        if self.type not in ("float", "int", "categorical"):
            raise ConfigError(f"{where}: type must be float, int or categorical (got {spec.get('type')!r})")
        self.log = bool(spec.get("log", False))
        self.step = spec.get("step")
        self.values = list(spec["values"]) if spec.get("values") is not None else None
        if self.type == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                raise ConfigError(f"{where}: a categorical needs at least two choices (got {choices!r}); "
                                  "a single value is a plain override, not a search")
            # Optuna stores None/bool/int/float/str; a list choice (e.g. LoRA target modules)
            # is kept as its override text.
            self.choices = [c if c is None or isinstance(c, (bool, int, float, str)) else override_value(c)
                            for c in choices]
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ConfigError(f"{where}: repeated choices in {choices!r}")
            return
        for k in ("low", "high"):
            if not isinstance(spec.get(k), (int, float)) or isinstance(spec.get(k), bool):
                raise ConfigError(f"{where}: {self.type} needs numeric low and high (got {k}={spec.get(k)!r})")
        self.low, self.high = spec["low"], spec["high"]
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ConfigError(f"{where}: int bounds must be integers (got {self.low}..{self.high})")
        if not self.low < self.high:
            raise ConfigError(f"{where}: empty range low={self.low} .. high={self.high} (low must be below high)")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: a log range must be above zero (got low={self.low}); use log: false or a "
                              "positive low")
        if self.log and self.step is not None:
            raise ConfigError(f"{where}: step and log cannot be combined")
        if self.values is not None:
            bad = [v for v in self.values if not self.low <= v <= self.high]
            if bad or len(self.values) < 2:
                raise ConfigError(f"{where}: grid values must be at least two, within low..high (got {self.values})")

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        if self.values is not None:
            return [int(v) if self.type == "int" else float(v) for v in self.values]
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise ConfigError(f"sweep.space.{self.key}: sampler=grid needs `values: [...]` (or a step) for a float range")

    def override(self, value) -> str:
        return f"{self.key}={override_value(value)}"


def override_value(value) -> str:
    """A value as Hydra override text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[\w./:+-]+", text) or re.fullmatch(r"\[.*\]", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_space(cfg) -> List[Param]:
    """The searched parameters, each checked against the composed config. The space nests
    like the config (sweep.space.trainer.lr: {type: float, ...}), so a command line can add
    or drop one: 'sweep.space.trainer.lr={type:float,low:1e-5,high:1e-3,log:true}' (quoted for the shell)."""
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) if cfg.sweep.space else {}
    if not space:
        raise ConfigError("sweep.space is empty: name a sweep config (sweep=tiny_lr, conf/sweep/) or give "
                          "sweep.space.<key>={type: ..., ...}")
    params = []

    def walk(node, prefix):
        for name, spec in node.items():
            key = f"{prefix}{name}"
            if spec is None:
                continue  # dropped: sweep.space.<key>=null
            if isinstance(spec, dict) and spec and not (set(spec) & {"type", "choices"}):
                walk(spec, key + ".")  # a config node, not a parameter: go down
                continue
            if key.split(".")[0] in ("sweep", "run_dir", "resume", "hydra"):
                raise ConfigError(f"sweep.space.{key}: {key.split('.')[0]} cannot be searched")
            if OmegaConf.select(cfg, key, default=_NOT_FOUND, throw_on_missing=False) is _NOT_FOUND:
                raise ConfigError(f"sweep.space.{key}: no key {key} in the composed config "
                                  f"(misspelled, or not in this strategy/task's config?)")
            params.append(Param(key, spec))

    walk(space, "")
    return params


# --------------------------------------------------------------------------- the study
class Sweep:
    """One worker's view of the study in sweep.dir."""

    def __init__(self, cfg, overrides: List[str]):
        import optuna

        self.cfg, s = cfg, cfg.sweep
        if s.sampler not in SAMPLERS:
            raise ConfigError(f"sweep.sampler={s.sampler}: one of {', '.join(SAMPLERS)}")
        if s.pruner not in PRUNERS:
            raise ConfigError(f"sweep.pruner={s.pruner}: one of {', '.join(PRUNERS)}")
        build_pruner(s, cfg.trainer.eval_every)  # its own settings refused here, before any trial
        if s.prune_on not in ("objective", "loss"):
            raise ConfigError(f"sweep.prune_on={s.prune_on}: objective (task.metric, {cfg.task.metric}) or loss")
        if s.pruner != "none" and cfg.trainer.eval_every <= 0:
            raise ConfigError(f"sweep.pruner={s.pruner} prunes at evals, and trainer.eval_every={cfg.trainer.eval_every} "
                              "evaluates only at the end: set trainer.eval_every")
        if s.nproc < 1 or s.workers < 1:
            raise ConfigError("sweep.nproc and sweep.workers must be at least 1")
        if s.nproc > 1 and cfg.backend.name == "single":
            raise ConfigError(f"sweep.nproc={s.nproc} starts a distributed trial: choose backend=ddp (or fsdp, zero*)")
        self.params = parse_space(cfg)
        self.grid = None
        if s.sampler == "grid":
            self.grid = [dict(zip([p.key for p in self.params], combo))
                         for combo in itertools.product(*[p.grid() for p in self.params])]
        self.n_trials = len(self.grid) if self.grid is not None else s.n_trials  # a grid: every point
        if self.n_trials is None or self.n_trials < 1:
            raise ConfigError(f"sweep.n_trials={s.n_trials}: give the number of trials (at least 1)")
        check_trial_configs(self.params, overrides)
        self.name = s.name or "sweep"
        self.dir = Path(s.dir or Path("sweeps") / self.name).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "trials").mkdir(exist_ok=True)
        (self.dir / "heartbeats").mkdir(exist_ok=True)
        self.worker = s.worker if s.worker is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
        # The trial's command line: the user's overrides (sweep.* included, so a trial can
        # build the pruner) without the ones a trial sets itself.
        self.base = [o for o in space_overrides(overrides) if not re.match(r"^[+~]*(run_dir|resume)=", o)]
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.storage = storage(self.dir)
        self.lock = self._lock()
        direction = "maximize" if cfg.task.greater_is_better else "minimize"
        with self.lock:
            self.study = optuna.create_study(study_name=self.name, storage=self.storage, direction=direction,
                                             sampler=self._sampler(), load_if_exists=True)
            self._check_same_sweep()
            if self.grid is not None and not self.study.get_trials(deepcopy=False):
                for point in self.grid:
                    self.study.enqueue_trial(point, skip_if_exists=False)

    # -- construction
    def _lock(self):
        from optuna.storages.journal import JournalFileOpenLock

        class Held:  # JournalFileOpenLock as a context manager; works across NFS clients
            def __init__(self, path):
                self.lock = JournalFileOpenLock(path, grace_period=30)

            def __enter__(self):
                self.lock.acquire()

            def __exit__(self, *exc):
                self.lock.release()

        return Held(str(self.dir / "sweep"))

    def _sampler(self):
        import optuna

        seed = self.cfg.sweep.seed + self.worker
        if self.cfg.sweep.sampler == "tpe":
            # constant_liar: a trial running on another worker counts as a poor result, so
            # parallel workers do not all sample the same region.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup(self.n_trials,
                                                                                   self.cfg.sweep.startup_trials),
                                              multivariate=True, constant_liar=True)
        if self.cfg.sweep.sampler == "gp":
            startup = self.cfg.sweep.startup_trials
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10 if startup is None else startup)
        return optuna.samplers.RandomSampler(seed=seed)  # random, and grid (every point is enqueued)

    def _check_same_sweep(self) -> None:
        """Refuse to add trials of another space, sampler or direction to an existing study."""
        key = {"space": OmegaConf.to_container(self.cfg.sweep.space, resolve=True), "sampler": self.cfg.sweep.sampler,
               "direction": self.study.direction.name.lower()}  # n_trials may grow: the same command, more trials
        saved = self.study.user_attrs.get("sweep")
        if saved is None:
            self.study.set_user_attr("sweep", key)
        elif saved != key:
            raise ConfigError(f"{self.dir} holds a study with another sweep ({json.dumps(saved)}); this one is "
                              f"{json.dumps(key)}. Choose another sweep.dir (or sweep.name) for a new search")

    # -- the loop
    def run(self) -> int:
        """Take trials until the study has its n_trials (or the grid is done); return how many ran here."""

        self.signalled = None
        self.current = None  # the running trial's process group

        def forward(signum, frame):
            # SLURM's cancel/time limit (SIGTERM) or its warning (SIGUSR1): the trial checkpoints
            # and stops (distft-train's own handling), this worker queues it again and exits.
            self.signalled = signal.Signals(signum).name
            if self.current is not None:
                try:
                    os.killpg(self.current, signum)
                except ProcessLookupError:
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        import optuna

        ran = 0
        while self.signalled is None:
            with self.lock:
                self._fail_stale()
                trials = self.study.get_trials(deepcopy=False)
                states = optuna.trial.TrialState
                waiting = [t for t in trials if t.state == states.WAITING]
                counted = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED, states.RUNNING)
                           or (t.state == states.FAIL and not t.user_attrs.get("retried"))]
                own_failures = [t for t in trials if t.state == states.FAIL and not t.user_attrs.get("retried")]
                if len(own_failures) >= self.cfg.sweep.max_failures:
                    raise DistftError(f"{len(own_failures)} trials failed (sweep.max_failures="
                                      f"{self.cfg.sweep.max_failures}); see "
                                      + ", ".join(str(self.dir / 'trials' / f'{t.number:04d}' / 'trial.log')
                                                  for t in own_failures[:3]))
                if not waiting and (self.grid is not None or len(counted) >= self.n_trials):
                    break
                trial = self.study.ask()
                values = {p.key: p.suggest(trial) for p in self.params}
                resume_of = trial.user_attrs.get("resume_dir")  # a retry of a trial whose worker died
                run_dir = Path(resume_of) if resume_of else self.dir / "trials" / f"{trial.number:04d}"
                trial.set_user_attr("worker", self.id)
                trial.set_user_attr("run_dir", str(run_dir))
                self._beat(trial.number)
            self._run_trial(trial, values, run_dir)
            ran += 1
            self.report(show=False)  # trials.csv, the plots and best.yaml as the search goes
        return ran

    def _run_trial(self, trial, values: Dict[str, Any], run_dir: Path) -> None:
        import optuna

        run_dir.mkdir(parents=True, exist_ok=True)
        params = [p.override(values[p.key]) for p in self.params]
        train = ["-m", "distft.train", *self.base, *params, f"run_dir={run_dir}", "resume=auto"]
        if self.cfg.sweep.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.cfg.sweep.nproc}", *train]
        else:
            cmd = [sys.executable, *train]
        env = {**os.environ, TRIAL_ENV: json.dumps({"dir": str(self.dir), "study": self.name,
                                                    "trial_id": trial._trial_id, "number": trial.number})}
        env.pop("LOCAL_RANK", None), env.pop("RANK", None), env.pop("WORLD_SIZE", None)
        log.info("trial %d: %s", trial.number, " ".join(params))
        started = time.time()
        with open(run_dir / "trial.log", "a") as out:
            out.write("$ " + " ".join(cmd[1:]) + "\n")
            out.flush()
            # Its own process group, so a worker that finds this trial stale can end all of
            # it (torchrun and its ranks); and it dies with this worker (PR_SET_PDEATHSIG).
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            trial.set_user_attr("pgid", proc.pid)
            self.current = proc.pid
            if self.signalled:  # a signal that came while the trial was starting
                os.killpg(proc.pid, signal.Signals[self.signalled])
            stop = threading.Event()
            beat = threading.Thread(target=self._beat_until, args=(trial.number, stop), daemon=True)
            beat.start()
            try:
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                stop.set()
                self.current = None
        seconds = time.time() - started
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if rc == 0 and summary_path.exists() else None
        trial.set_user_attr("seconds", round(seconds, 1))
        with self.lock:
            if (run_dir / "preempted.json").exists() and (summary is None or summary.get("preempted")):
                log.warning("trial %d stopped with a checkpoint (%s); queued to resume", trial.number,
                            self.signalled or "preempted")
                self._retry(trial)
                return
            if summary is None or summary.get("preempted") or summary.get("objective") is None:
                why = (f"exit code {rc}" if rc else "stopped before the end (preempted)" if summary
                       else "no summary.json")
                log.warning("trial %d failed (%s); see %s", trial.number, why, run_dir / "trial.log")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return
            trial.set_user_attr("steps", summary["steps"])
            if str(summary.get("stop_reason") or "").startswith("pruned"):
                log.info("trial %d pruned at step %d", trial.number, summary["steps"])
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                log.info("trial %d: objective %.6g in %.0f s", trial.number, summary["objective"], seconds)
                self.study.tell(trial, summary["objective"])

    # -- liveness
    def _beat(self, number: int) -> None:
        (self.dir / "heartbeats" / f"{number:04d}").write_text(self.id)

    def _beat_until(self, number: int, stop: threading.Event) -> None:
        while not stop.wait(min(10.0, self.cfg.sweep.stale_after_s / 4)):
            self._beat(number)

    def _fail_stale(self) -> None:
        """Fail the RUNNING trials whose worker is gone, and queue each again to resume in its
        own run folder (caller holds the lock)."""
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if worker is None:
                continue  # asked a moment ago, not yet marked
            host, _, pid = worker.rpartition(":")
            beat = self.dir / "heartbeats" / f"{t.number:04d}"
            if host == socket.gethostname():
                stale = not _alive(int(pid))
            else:
                stale = not beat.exists() or time.time() - beat.stat().st_mtime > self.cfg.sweep.stale_after_s
            if not stale:
                continue
            pgid = t.user_attrs.get("pgid")
            if pgid and host == socket.gethostname():
                try:  # what is left of the trial (a rank that outlived its launcher)
                    os.killpg(int(pgid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            log.warning("trial %d: its worker %s is gone; marking it failed and running it again", t.number, worker)
            self._retry(t)

    def _retry(self, t) -> None:
        """Fail a trial that did not finish through no fault of its own and queue its
        parameters again, to resume in its run folder (caller holds the lock)."""
        import optuna

        self.storage.set_trial_user_attr(t._trial_id, "retried", True)
        self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self.study.enqueue_trial(dict(t.params), user_attrs={
            "retry_of": t.number, "resume_dir": t.user_attrs.get("run_dir")}, skip_if_exists=False)

    # -- results
    def report(self, show: bool = True) -> Path:
        """trials.csv, the printed table, history.png / params.png and best.yaml."""
        import optuna

        with self.lock:
            trials = self.study.get_trials(deepcopy=True)
        keys = [p.key for p in self.params]
        rows = []
        for t in trials:
            rows.append({"number": t.number, "state": t.state.name.lower(), "objective": t.value,
                         **{k: t.params.get(k) for k in keys}, "steps": t.user_attrs.get("steps"),
                         "seconds": t.user_attrs.get("seconds"), "run_dir": t.user_attrs.get("run_dir"),
                         "retry_of": t.user_attrs.get("retry_of")})
        path = self.dir / "trials.csv"
        tmp = path.with_suffix(f".csv.{os.getpid()}.tmp")  # workers may write at once
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["number", "state", "objective", *keys, "steps", "seconds", "run_dir",
                                                   "retry_of"])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        if show:
            print(table(rows, keys))
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            self._plots()
            best = self.study.best_trial
            write_best(best, self.dir, keys)
            if show:
                print(f"best: trial {best.number}, objective {best.value:.6g} "
                      + " ".join(f"{k}={override_value(best.params[k])}" for k in keys)
                      + f"\nrerun it: distft-train --config-path {self.dir} --config-name best")
        return path

    def _plots(self) -> None:
        """history.png (Optuna's optimization history) and params.png: the objective of each
        finished trial against each parameter, one panel per parameter, best trial marked."""
        import warnings

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        import optuna
        from optuna.visualization.matplotlib import plot_optimization_history

        metric = f"{self.cfg.task.metric} ({self.study.direction.name.lower()})"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
            ax = plot_optimization_history(self.study)
        ax.set_ylabel(metric)
        ax.figure.set_size_inches(8.0, 4.5)
        ax.figure.tight_layout()
        _save(ax.figure, self.dir / "history.png")
        plt.close(ax.figure)

        done = [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        best = self.study.best_trial
        fig, axes = plt.subplots(1, len(self.params), figsize=(3.6 * len(self.params) + 0.6, 3.6), sharey=True,
                                 squeeze=False)
        for ax, p in zip(axes[0], self.params):
            xs = [t.params[p.key] for t in done]
            if p.type == "categorical":
                labels = [str(c) for c in p.choices]
                xs = [labels.index(str(x)) for x in xs]
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            elif p.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only
            ax.scatter(xs, [t.value for t in done], c=[t.number for t in done], cmap="viridis", s=28)
            bx = best.params[p.key]
            ax.scatter([labels.index(str(bx)) if p.type == "categorical" else bx], [best.value], marker="*", s=160,
                       facecolors="none", edgecolors="red", label=f"best (trial {best.number})")
            ax.set_xlabel(p.key)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{self.name}: {len(done)} finished trials (colour: trial number)", fontsize=10)
        fig.tight_layout()
        _save(fig, self.dir / "params.png")
        plt.close(fig)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def storage(folder: Path):
    """The study's journal file (one append-only log; safe for writers on several hosts)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = str(folder / "study.journal")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def table(rows: List[dict], keys: List[str]) -> str:
    head = ["#", "state", "objective", *keys, "steps", "s"]
    body = [[str(r["number"]), r["state"], "" if r["objective"] is None else f"{r['objective']:.4f}",
             *[_short(r[k]) for k in keys], "" if r["steps"] is None else str(r["steps"]),
             "" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body])


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_best(trial, folder: Path, keys: List[str]) -> Path:
    """best.yaml: the best trial's whole config (as its run composed it), runnable with
    distft-train --config-path <folder> --config-name best."""
    run_dir = Path(trial.user_attrs["run_dir"])
    composed = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(composed)
    cfg.run_dir = "outputs/best-${now:%Y-%m-%d_%H-%M-%S}"  # a new folder: the trial's holds a finished run
    cfg.resume = "auto"
    node = OmegaConf.create({"defaults": ["train_schema", "_self_"]})
    node = OmegaConf.merge(node, cfg, {"hydra": {"run": {"dir": "${run_dir}"}, "output_subdir": ".hydra",
                                                 "job": {"chdir": False}}})
    header = (f"# The best trial of the sweep in {folder}: trial {trial.number}, objective {trial.value!r}\n"
              f"# ({', '.join(f'{k}={override_value(trial.params[k])}' for k in keys)}), run in {run_dir}.\n"
              f"# Rerun: distft-train --config-path {folder} --config-name best [overrides]\n")
    path = folder / "best.yaml"
    tmp = folder / f".{os.getpid()}.best.yaml"
    tmp.write_text(header + OmegaConf.to_yaml(node))
    os.replace(tmp, path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _die_with_parent() -> None:
    """In the trial's child: receive SIGKILL when the worker dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- in a trial
def attach_trial(trainer) -> None:
    """In a trial's processes (TRIAL_ENV set by the worker): report each eval to the study
    and stop the run when the pruner says so; every rank takes rank 0's decision."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec:
        return
    import optuna

    spec = json.loads(spec)
    cfg = trainer.cfg
    # Every rank must train with the trial's parameters (a search that samples inside each
    # rank gives each its own: transformers#18609). They come from the command line here;
    # check what each rank's config holds before the first step.
    keys = [p.key for p in parse_space(cfg)]
    seen = trainer.backend.gather_object({k: OmegaConf.select(cfg, k) for k in keys})
    if any(v != seen[0] for v in seen[1:]):
        raise DistftError(f"trial {spec['number']}: the ranks' parameters differ: {seen}")
    if trainer.backend.is_main:
        log.info("trial %d: %d rank(s) train with %s", spec["number"], len(seen),
                 " ".join(f"{k}={override_value(v)}" for k, v in seen[0].items()))
    study = trial = None
    if trainer.backend.is_main:
        study = optuna.load_study(study_name=spec["study"], storage=storage(Path(spec["dir"])),
                                  pruner=build_pruner(cfg.sweep, cfg.trainer.eval_every))
        trial = optuna.trial.Trial(study, spec["trial_id"])

    def report(step: int, metrics: Dict[str, float]) -> bool:
        prune = False
        if trial is not None:
            if cfg.sweep.get("prune_on", "objective") == "loss":
                # the pruner compares in the study's direction: a maximised objective gets -loss
                value = metrics.get("loss")
                value = None if value is None else (-value if cfg.task.greater_is_better else value)
            else:
                value = metrics.get(cfg.task.metric)
            if value is not None and math.isfinite(value):
                trial.report(float(value), step)
                # At the last step there is nothing left to save: the trial completes.
                prune = cfg.sweep.pruner != "none" and step < trainer.max_steps and trial.should_prune()
        prune = bool(trainer.backend.broadcast_object(prune))
        if prune:
            trainer.stop_reason = f"pruned by the sweep's {cfg.sweep.pruner} pruner at step {step}"
            if trainer.backend.is_main:
                log.info("trial %d: %s", spec["number"], trainer.stop_reason)
        return prune

    trainer.add_eval_hook(report)


def tpe_startup(n_trials: int, startup_trials: Optional[int]) -> int:
    """The random trials TPE starts with: sweep.startup_trials, else a third of the budget
    between 2 and 10 (Optuna's 10 would leave a 16-trial budget mostly random)."""
    return min(10, max(2, n_trials // 3)) if startup_trials is None else startup_trials


def build_pruner(s, eval_every: Optional[int] = None):
    """The sweep's pruner, never pruning before a trial's sweep.pruner_warmup_evals-th eval
    (Optuna's own warm-up counts steps; a sweep over batch size or epochs puts its evals at
    different steps). `eval_every`: the trials' trainer.eval_every, successive halving's
    first rung unless sweep.pruner_min_resource says otherwise."""
    import optuna

    if s.get("pruner_threshold") is not None and s.pruner != "threshold":
        raise ConfigError(f"sweep.pruner_threshold={s.pruner_threshold} is the threshold pruner's, and "
                          f"sweep.pruner={s.pruner}: set sweep.pruner=threshold or drop the threshold")
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner_startup_trials < 0 or s.pruner_warmup_evals < 0:
        raise ConfigError(f"sweep.pruner_startup_trials={s.pruner_startup_trials} and sweep.pruner_warmup_evals="
                          f"{s.pruner_warmup_evals} cannot be negative")
    if s.pruner == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials)
    elif s.pruner == "percentile":
        if not 0 < s.pruner_percentile <= 100:
            raise ConfigError(f"sweep.pruner_percentile={s.pruner_percentile}: the share of trials kept at each "
                              "eval, in percent: above 0 and at most 100 (50 is the median pruner)")
        inner = optuna.pruners.PercentilePruner(s.pruner_percentile, n_startup_trials=s.pruner_startup_trials)
    elif s.pruner == "successive_halving":
        rung = s.get("pruner_min_resource")
        rung = rung if rung is not None else (eval_every if eval_every and eval_every > 0 else "auto")
        factor, rate = s.get("pruner_reduction_factor", 3), s.get("pruner_min_early_stopping_rate", 0)
        if rung != "auto" and rung < 1:
            raise ConfigError(f"sweep.pruner_min_resource={rung}: the first rung's step, at least 1 "
                              "(null: trainer.eval_every)")
        if factor < 2:
            raise ConfigError(f"sweep.pruner_reduction_factor={factor}: at least 2 (a rung keeps 1/factor of the trials)")
        if rate < 0:
            raise ConfigError(f"sweep.pruner_min_early_stopping_rate={rate} cannot be negative")
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=rung, reduction_factor=factor,
                                                       min_early_stopping_rate=rate)
    elif s.pruner == "threshold":
        limit = s.get("pruner_threshold")
        on_loss = s.get("prune_on", "objective") == "loss"
        if limit is None or not math.isfinite(limit):
            raise ConfigError(f"sweep.pruner=threshold needs sweep.pruner_threshold (a finite number), not {limit}: "
                              "a trial stops at the first eval worse than it")
        if on_loss and limit <= 0:
            raise ConfigError(f"sweep.pruner_threshold={limit} with sweep.prune_on=loss: a loss is never below 0, so "
                              "every trial would stop at its first eval (a classifier at chance has loss ln(classes))")

        below = optuna.pruners.ThresholdPruner(lower=-limit if on_loss else limit)
        above = optuna.pruners.ThresholdPruner(upper=limit)

        class Threshold(optuna.pruners.BasePruner):
            """Optuna's ThresholdPruner on the side the study's direction makes worse: a loss
            (negated when the study maximises) or a minimised objective above the limit, a
            maximised objective below it. Which one needs the direction, known per study."""

            def prune(self, study, trial) -> bool:
                maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
                return (below if maximise else above).prune(study, trial)

        inner = Threshold()
    else:
        inner = optuna.pruners.HyperbandPruner()

    class WarmupEvals(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            if len(trial.intermediate_values) < max(1, s.pruner_warmup_evals):
                return False
            return inner.prune(study, trial)

    return WarmupEvals()


# --------------------------------------------------------------------------- the command
def compose(overrides: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distft import config as _config  # noqa: F401  (registers the structured configs)
    from distft.paths import CONF_DIR

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="train", overrides=space_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from e


def space_overrides(overrides: List[str]) -> List[str]:
    """`sweep.space.<key>=<spec>` sets (or with null, drops) one parameter whether or not
    the sweep config has it: Hydra would merge a new spec into the old one and refuse a new
    key without '+'."""
    out = []
    for o in overrides:
        m = re.match(r"^\+{0,2}(sweep\.space\.[\w.]+)=(.*)$", o, re.S)
        if m:
            out += [f"++{m.group(1)}=null", f"++{m.group(1)}={m.group(2)}"]
        else:
            out.append(o)
    return out


def check_trial_configs(params: List[Param], overrides: List[str]) -> None:
    """Compose the config at the space's corners before any trial runs, so a value the
    schema refuses (a float for an int key, say) fails now with the key named."""
    for pick in (0, -1):
        extra = []
        for p in params:
            values = p.grid() if (p.type == "categorical" or p.values is not None or p.type == "int"
                                  or p.step is not None) else [p.low, p.high]
            extra.append(p.override(values[pick] if p.type != "float" else float(values[pick])))
        try:
            cfg = compose([*overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"the sweep's space gives an invalid config ({' '.join(extra)}): {e}") from e
        from distft.config import validate_schema

        validate_schema(cfg)


def shared_threads(workers: int, nproc: int, env: Dict[str, str], cpus: Optional[int] = None) -> Dict[str, str]:
    """What the workers this command starts on one machine add to their environment: unless
    OMP_NUM_THREADS is set, each trial process gets an equal share of the cores. A torch
    process takes every core by default, so N workers at once would ask for N times the
    cores, and on CPU their OpenMP threads then wait on one another: two MiniLM trainings of 2
    threads each on 2 cores took 5.5 s a step where one alone took 0.4. A trial under torchrun
    (sweep.nproc > 1) passes the share to each rank instead of torchrun's own 1."""
    if "OMP_NUM_THREADS" in env:
        return {}
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cpus // (workers * nproc)))}


def run(overrides: List[str]) -> Path:
    cfg = compose(overrides)
    sweep = Sweep(cfg, overrides)
    if cfg.sweep.workers > 1 and cfg.sweep.worker is None:
        # sweep.workers=N on this machine: N worker processes on one study; this one waits
        # for them and writes the report.
        threads = shared_threads(cfg.sweep.workers, cfg.sweep.nproc, dict(os.environ))
        log.info("sweep %s in %s: %d workers%s", sweep.name, sweep.dir, cfg.sweep.workers,
                 f", OMP_NUM_THREADS={threads['OMP_NUM_THREADS']} for each trial process (a share of this "
                 "machine's cores; set OMP_NUM_THREADS or trainer.threads to choose)" if threads else "")
        procs = [subprocess.Popen([sys.executable, "-m", "distft.sweep", *overrides, f"sweep.worker={i}"],
                                  env={**os.environ, "DISTFT_SWEEP_CHILD": "1", **threads}, preexec_fn=_die_with_parent)
                 for i in range(cfg.sweep.workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise DistftError(f"sweep workers exited with codes {codes}")
        return sweep.report()
    log.info("sweep %s in %s: %s sampler, %d trials, worker %d", sweep.name, sweep.dir, cfg.sweep.sampler,
             sweep.n_trials, sweep.worker)
    ran = sweep.run()
    log.info("worker %d ran %d trial(s)", sweep.worker, ran)
    return sweep.report(show=not os.environ.get("DISTFT_SWEEP_CHILD"))


def main(argv: Optional[List[str]] = None) -> int:
    import optuna

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker logs each trial itself
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        run(argv)
    except DistftError as e:
        print(f"distft-sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

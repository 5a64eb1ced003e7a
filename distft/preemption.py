"""Stopping on a scheduler's signal: SIGUSR1 (SLURM's warning before a time limit or
preemption, `#SBATCH --signal=B:USR1@N`) and SIGTERM (what SLURM, Kubernetes and the
launchers send before killing) ask the run to stop after the current optimizer step.

The handler only records the signal; the training loop folds the request into the
all-reduce it already does every step, so all ranks agree on the same last step, write
one checkpoint together and leave. A rank never stops in the middle of a collective.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from distft.errors import ConfigError

PREEMPTED_FILE = "preempted.json"


def parse_signals(names: List[str]) -> List[signal.Signals]:
    out = []
    for name in names:
        key = name if str(name).startswith("SIG") else f"SIG{name}"
        sig = getattr(signal, str(key).upper(), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"trainer.stop_signals: {name!r} is not a signal a process can catch "
                              "(e.g. SIGUSR1, SIGTERM, SIGINT)")
        out.append(sig)
    return out


class StopRequest:
    """Records the first stop signal received; `install()` from the main thread."""

    def __init__(self, signals: List[signal.Signals]):
        self.signals = signals
        self.received: Optional[str] = None
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def write_marker(run_dir: Path, step: int, signal_name: str, checkpoint: Path) -> None:
    """`preempted.json` says the run stopped early on purpose with a resumable checkpoint;
    the sbatch scripts requeue the job only when it exists."""
    tmp = run_dir / f"{PREEMPTED_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "signal": signal_name, "checkpoint": str(checkpoint),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    os.replace(tmp, run_dir / PREEMPTED_FILE)


def clear_marker(run_dir: Path) -> None:
    try:
        (run_dir / PREEMPTED_FILE).unlink()
    except FileNotFoundError:
        pass

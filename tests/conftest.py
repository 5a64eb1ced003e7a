import atexit
import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

# Under pytest-xdist (scripts/test.sh runs two workers) the workers share the cores: each
# worker's torch takes cores / workers threads unless OMP_NUM_THREADS says otherwise. Two
# workers of two OpenMP threads each on two cores spun against each other (tests ran 2-4x
# slower than alone). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
# Before anything imports the hub libraries, which read these once.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# Nothing here comes from the hub: fail at once instead of waiting on connection timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tokenised-data cache of the test session, away from the user's own (removed at exit).
if "DISTFT_DATA_CACHE" not in os.environ:
    os.environ["DISTFT_DATA_CACHE"] = tempfile.mkdtemp(prefix="distft-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DISTFT_DATA_CACHE"], ignore_errors=True)

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import distft.config  # noqa: F401  (registers the schemas)
from distft.paths import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Small enough to train a few steps in well under a second.
TINY = [
    "model.from_config.hidden_size=32",
    "model.from_config.intermediate_size=64",
    "model.from_config.num_hidden_layers=2",
    "model.from_config.num_attention_heads=2",
    "model.from_config.num_key_value_heads=1",
    "data.num_train=96",
    "data.num_validation=32",
    "logger=csv",
    "logger.progress_bar=false",
    "logger.plots=false",
    "trainer.batch_size=8",
    "trainer.warmup_steps=0",
    # fp32 whatever the CPU: what a test asserts must not depend on the machine's bf16
    # (precision=auto is tested on its own in test_precision.py).
    "trainer.precision=fp32",
]


def compose_cfg(run_dir, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides])


@pytest.fixture
def cfg_for(tmp_path):
    def make(*overrides, tiny=True):
        return compose_cfg(tmp_path / "run", [*(TINY if tiny else []), *overrides])

    return make


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} is not present beside the checkout")
    return path


def run_cli(*args, check=True, timeout=600, env=None):
    """Run `python -m distft.train` as a user would, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "distft.train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"distft-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def torchrun_cmd(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "distft.train", *args]


def run_torchrun(nproc, *args, timeout=600):
    proc = subprocess.run(torchrun_cmd(nproc, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run that several tests compare against, run once per session for
    each distinct set of overrides: `reference(*overrides)` on one process (in this one:
    the CLI's own Trainer, without paying a new interpreter's imports),
    `reference(*overrides, nproc=2)` under torchrun. Returns its run_dir; read it, never
    write to it."""
    from distft.train import run as train

    done = {}

    def run(*overrides, nproc=1):
        key = (nproc, tuple(overrides))
        if key not in done:
            run_dir = tmp_path_factory.mktemp("reference")
            if nproc == 1:
                train(compose_cfg(run_dir, overrides))
            else:
                run_torchrun(nproc, *overrides, f"run_dir={run_dir}")
            done[key] = run_dir
        return done[key]

    return run


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Return once the run in `run_dir` has logged `step` (or its process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if (Path(run_dir) / "metrics.jsonl").exists() and any(e.get("step", 0) >= step
                                                                  for e in read_metrics(run_dir)):
                return
        except json.JSONDecodeError:
            pass  # read while the trainer was appending a line: look again
        time.sleep(0.02)


def losses(run_dir: Path):
    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if "loss" in e}

"""DISTFT_MALLOC: the launchers preload tcmalloc or jemalloc into the training processes
(which report the allocator they run on), and refuse an unknown choice or a missing
library with one clear line."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, losses


def launch(tmp_path, malloc, *args, nproc=1):
    env = {**os.environ, "DISTFT_MALLOC": malloc, "NPROC": str(nproc), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    env.pop("LD_PRELOAD", None)
    return subprocess.run(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("malloc,lib", [("tcmalloc", "libtcmalloc_minimal.so.4"), ("jemalloc", "libjemalloc.so.2")])
def test_launcher_runs_training_on_the_chosen_allocator(tmp_path, malloc, lib):
    present = any(os.path.exists(os.path.join(d, lib)) for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                                                                  "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"))
    if not present:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the allocator tests: {lib} missing (scripts/install_slurm.sh installs it)")
        pytest.skip(f"{lib} is not installed (scripts/install_slurm.sh installs it)")
    runs = {}
    for choice in ("system", malloc):
        run_dir = tmp_path / choice
        proc = launch(tmp_path, choice, *TINY, "backend=ddp", "trainer.max_steps=3", f"run_dir={run_dir}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert f"memory allocator: {choice}" in out, out[-3000:]
        runs[choice] = losses(run_dir)
    assert runs[malloc] == runs["system"]  # the allocator changes memory, not numbers


@pytest.mark.parametrize("malloc,message", [
    ("tcmalloc2", "choose system, tcmalloc, jemalloc or a path"),
    ("/nowhere/libtcmalloc.so", "not found"),
])
def test_bad_choice_is_refused_before_starting(tmp_path, malloc, message):
    proc = launch(tmp_path, malloc, *TINY, f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"DISTFT_MALLOC={malloc}" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_in_process_report():
    from distft.trainer import allocator_in_use

    expected = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else \
        "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    assert allocator_in_use() == expected

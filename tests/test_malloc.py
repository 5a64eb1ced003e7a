"""DISTFT_MALLOC: the launchers preload tcmalloc or jemalloc into the training processes
(which report the allocator they run on), and refuse an unknown choice or a missing
library with one clear line."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, losses


def malloc_env(malloc):
    env = {**os.environ, "DISTFT_MALLOC": malloc, "NPROC": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("LD_PRELOAD", None)
    return env


def launch(malloc, *args):
    return subprocess.run(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env=malloc_env(malloc),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("malloc", ["tcmalloc", "jemalloc"])
def test_launcher_runs_training_on_the_chosen_allocator(tmp_path, malloc):
    # launch/malloc.sh itself says whether the library is there.
    found = subprocess.run(["bash", "-c", "source launch/malloc.sh"], cwd=ROOT, env=malloc_env(malloc),
                           capture_output=True, text=True)
    if found.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the allocator tests: {found.stderr.strip()}")
        pytest.skip(found.stderr.strip())
    runs = {}
    for choice in ("system", malloc):
        run_dir = tmp_path / choice
        proc = launch(choice, *TINY, "backend=ddp", "trainer.max_steps=3", f"run_dir={run_dir}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert f"memory allocator: {choice}" in out, out[-3000:]
        if choice == "system":  # glibc, tuned by trainer.release_freed_memory (on by default)
            assert "memory allocator: system (glibc; freed blocks over 128 KiB go back to the OS)" in out
        # the hint towards a faster allocator, on CPU with glibc's only
        assert ("the launchers (scripts/train.sh, launch/*.sh, slurm/) preload it" in out) == (choice == "system"), \
            out[-3000:]
        runs[choice] = losses(run_dir)
    assert runs[malloc] == runs["system"]  # the allocator changes memory, not numbers


def sourced(script, env):
    """LD_PRELOAD after sourcing a malloc.sh, and its exit status."""
    proc = subprocess.run(["bash", "-c", f"source {script}; echo \"$LD_PRELOAD\""], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_default_is_tcmalloc_when_installed_else_the_system_malloc(tmp_path):
    env = malloc_env("tcmalloc")
    rc, tcmalloc, err = sourced("launch/malloc.sh", env)
    if rc != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the allocator tests: {err.strip()}")
        pytest.skip(err.strip())
    env.pop("DISTFT_MALLOC")
    assert sourced("launch/malloc.sh", env)[:2] == (0, tcmalloc)  # unset = auto = tcmalloc here
    assert sourced("launch/malloc.sh", {**env, "DISTFT_MALLOC": "auto"})[:2] == (0, tcmalloc)
    # sourced twice (a launcher started by an sbatch script): preloaded once
    assert sourced("launch/malloc.sh; source launch/malloc.sh", env)[:2] == (0, tcmalloc)
    # an allocator the caller preloaded stays the only one
    assert sourced("launch/malloc.sh", {**env, "LD_PRELOAD": "/opt/libjemalloc.so.2"})[:2] == \
        (0, "/opt/libjemalloc.so.2")
    # where the library is missing, auto falls back to the system's malloc without a word,
    # while an explicit choice stops (the same script, looking for a library no system has)
    missing = tmp_path / "malloc.sh"
    missing.write_text((ROOT / "launch" / "malloc.sh").read_text()
                       .replace("libtcmalloc_minimal.so.4", "libtcmalloc_nowhere.so.0"))
    assert sourced(missing, env) == (0, "", "")
    rc, _, err = sourced(missing, {**env, "DISTFT_MALLOC": "tcmalloc"})
    assert rc == 2 and "libtcmalloc_nowhere.so.0 not found" in err, err


@pytest.mark.parametrize("malloc,message", [
    ("tcmalloc2", "choose auto, system, tcmalloc, jemalloc or a path"),
    ("/nowhere/libtcmalloc.so", "not found"),
])
def test_bad_choice_is_refused_before_starting(tmp_path, malloc, message):
    proc = launch(malloc, *TINY, f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"DISTFT_MALLOC={malloc}" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_in_process_report():
    from distft.memory import allocator_in_use

    expected = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else \
        "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    assert allocator_in_use() == expected


FRAGMENT = """
import json, sys, torch
from distft.memory import release_freed_memory
released = release_freed_memory() if sys.argv[1] == "on" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
start = rss()
keep = []
for step in range(3):  # activations of a few steps: half of them outlive the step
    blocks = [torch.ones(256, 1024) for _ in range(256)]  # 1 MiB each, written
    keep += blocks[::2]
    del blocks
print(json.dumps({"released": released, "start_mb": start, "held_mb": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_go_back_to_the_os_with_glibc():
    """With the threshold fixed, blocks freed between live ones leave the resident set; with
    glibc's adjusting default they stay (the pattern of a CPU run's steps)."""
    got = {}
    for mode in ("on", "off"):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_")}
        proc = subprocess.run([sys.executable, "-c", FRAGMENT, mode], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got[mode] = json.loads(proc.stdout)
    assert got["on"]["released"] is True and got["off"]["released"] is False
    # 384 MiB live, 384 MiB freed between them: what the resident set holds beyond the live
    on, off = (got[m]["held_mb"] - got[m]["start_mb"] - 384 for m in ("on", "off"))
    assert on < 32, got  # the freed blocks went back
    assert off > 96, got  # glibc's default keeps a good part of them (146-248 MiB seen)


PEAK = """
import json, torch
from distft.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
mb = lambda b: b / 2**20
reset = reset_peak_rss()
before = mb(peak_rss_bytes())
x = torch.ones(64, 2**20)  # 256 MiB, written, then freed
del x
held = mb(peak_rss_bytes())
again = reset_peak_rss()
print(json.dumps({"reset": reset and again, "before": before, "held": held, "after": mb(peak_rss_bytes()),
                  "now": mb(rss_bytes())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and clear_refs")
def test_peak_resident_set_sees_freed_tensors_and_resets():
    """The CPU peak a run reports (memory_kind cpu_peak_rss) is the kernel's high-water mark
    since training began: a tensor freed between two samples still counts, loading's does not."""
    proc = subprocess.run([sys.executable, "-c", PEAK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["reset"] is True, got
    assert got["held"] >= got["before"] + 250, got  # the freed 256 MiB is in the peak
    assert got["after"] < got["held"] - 200 and got["after"] <= got["now"] + 8, got  # reset to the resident set now


TRIM = """
import json, torch
from distft.memory import release_freed_memory, rss_bytes, trim_freed_memory
release_freed_memory()
mb = lambda b: b / 2**20
start = mb(rss_bytes())
small = [torch.ones(8, 1024) for _ in range(16384)]  # 32 KiB each, under the threshold: from the heap
del small[::2]  # 512 MiB written, half freed between live ones
held = mb(rss_bytes())
trimmed = trim_freed_memory()
print(json.dumps({"trimmed": trimmed, "start": start, "held": held, "after": mb(rss_bytes())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_trim_hands_back_freed_small_blocks():
    """Blocks under the mmap threshold stay in glibc's heap when freed, their pages resident;
    trim_freed_memory (the trainer calls it after each optimizer step on CPU) returns them."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_")}
    proc = subprocess.run([sys.executable, "-c", TRIM], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["trimmed"] is True, got
    assert got["held"] - got["start"] > 480, got  # the freed half is still resident
    assert got["held"] - got["after"] > 160, got  # and most of it (256 MiB) leaves with the trim

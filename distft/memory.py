"""The training processes' host memory: which allocator serves them, and glibc's tuning."""
from __future__ import annotations

import functools
import os
from pathlib import Path


def rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The largest resident set this process has had since it started or since the last
    reset_peak_rss() (Linux: VmHWM in /proc/self/status); 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Start peak_rss_bytes() again from the resident set now (writing 5 to
    /proc/self/clear_refs, Linux 4.0 and later), as torch.cuda.reset_peak_memory_stats does
    for the GPU's allocator. False where the kernel refuses it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def allocator_in_use() -> str:
    """tcmalloc or jemalloc when one is loaded into this process (DISTFT_MALLOC in the
    launchers puts it in LD_PRELOAD), else the system's malloc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


# glibc hands a freed block above its mmap threshold back to the OS, but raises that
# threshold (up to 32 MiB) each time it does, so after the first step a CPU run's
# activations, gathered shards and gradient buckets come from its heaps, which keep the
# pages when they are freed: the resident set climbs step after step far above the live
# tensors. A fixed threshold stops that (mallopt turns the adjustment off); SmolLM2 on 2
# processes, peak MB a process without -> with: fsdp 3152 -> 1589, zero3 3462 -> 1922, ddp
# 3413 -> 3132, for page faults that made a CPU fsdp step 1.46x slower (bench/backends.py).
# No Python library wraps glibc's mallopt, hence ctypes.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.lru_cache(maxsize=None)
def _glibc_malloc():
    """The C library, where glibc's own malloc serves this process (no tcmalloc/jemalloc
    preloaded), else None. Asked once: the allocator cannot change while a process runs,
    and the trainer asks after every step."""
    import ctypes
    import platform

    if allocator_in_use() != "system" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process's later allocations.
    False (nothing changed) with tcmalloc/jemalloc preloaded, another C library, or
    MALLOC_MMAP_THRESHOLD_ set by the user (glibc's own variable wins)."""
    libc = _glibc_malloc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


def trim_freed_memory() -> bool:
    """Hand the pages of freed blocks inside glibc's heaps back to the OS (malloc_trim):
    blocks under the mmap threshold (the many small tensors and Python objects of a step)
    stay in the heaps when freed, and their pages stay resident. Called at the end of each
    optimizer step of a CPU run where release_freed_memory() took effect: SmolLM2 on 2
    processes, peak MB a process zero3 2024 -> 2010, fsdp 1985 -> 1979, ddp 3360 unchanged
    (bench/backends.py); a call takes 2-5 ms (the tiny model's 0.3 s step, SmolLM2's 6 s).
    False where glibc's malloc is not the allocator."""
    libc = _glibc_malloc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

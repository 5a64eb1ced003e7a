#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its localhost SLURM cluster: Debian's
# slurmctld, slurmd, slurm-client and munge (about 13 MB, no daemons are started here),
# and the allocators DISTFT_MALLOC can choose (tests/test_malloc.py): libtcmalloc-minimal4,
# libjemalloc2 (under 1 MB).
#   bash scripts/install_slurm.sh              # best effort: says why when it cannot
#   bash scripts/install_slurm.sh --required   # CI: fail when it cannot
set -uo pipefail
PKGS=(slurmctld slurmd slurm-client munge libtcmalloc-minimal4 libjemalloc2)
required=${1:-}
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null && ldconfig -p | grep -q libtcmalloc_minimal.so.4 \
   && ldconfig -p | grep -q libjemalloc.so.2; then
  exit 0
fi
why=""
if [ "$(id -u)" != 0 ]; then why="not root";
elif ! command -v apt-get >/dev/null; then why="apt-get not available"; fi
if [ -z "$why" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/dev/null; } \
    || why="apt-get install ${PKGS[*]} failed"
fi
if [ -n "$why" ]; then
  echo "SLURM and allocator packages not installed ($why): the SLURM and allocator tests will skip" >&2
  [ "$required" = --required ] && exit 1
fi
exit 0

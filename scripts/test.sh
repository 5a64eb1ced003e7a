#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow end-to-end runs included.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick ones, -n 0 for one process).
# Two pytest workers by default (DISTFT_TEST_WORKERS): much of a test's time is a fresh
# interpreter importing torch or a launcher waiting, which the other worker's test fills;
# a file's tests stay on one worker (module fixtures such as the SLURM cluster start once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=15 -n "${DISTFT_TEST_WORKERS:-2}" --dist loadfile "$@"

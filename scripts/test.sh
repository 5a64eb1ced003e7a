#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow end-to-end runs included.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=15 "$@"

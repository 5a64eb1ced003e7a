#!/usr/bin/env bash
# Set up (idempotent) and run the default fine-tune; extra arguments are Hydra overrides.
#   bash scripts/train.sh                      # tiny Llama on generated data, CPU, W&B offline
#   bash scripts/train.sh strategy=lora model=minilm task=classification ...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source launch/malloc.sh  # DISTFT_MALLOC=tcmalloc|jemalloc: see there
exec .venv/bin/distft-train "$@"

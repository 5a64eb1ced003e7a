#!/usr/bin/env bash
# Set up (idempotent) and run the default fine-tune (conf/quickstart.yaml): the real
# all-MiniLM-L6-v2 fine-tuned for sentiment on the bundled Amazon review sentences, CPU,
# W&B offline. Extra arguments are Hydra overrides of it.
#   bash scripts/train.sh                          # the default fine-tune
#   bash scripts/train.sh strategy=lora trainer.lr=1e-3
# Plain `.venv/bin/distft-train` starts from conf/train.yaml instead (a tiny model on
# generated text, for smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source launch/malloc.sh  # DISTFT_MALLOC=auto (tcmalloc when installed)|system|tcmalloc|jemalloc: see there
exec .venv/bin/distft-train --config-name quickstart "$@"

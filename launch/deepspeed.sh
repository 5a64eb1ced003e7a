#!/usr/bin/env bash
# Start distft-train with the deepspeed launcher; arguments are Hydra overrides.
#
# One node, 2 processes (on CPU this uses DeepSpeed's CPU accelerator and gloo):
#   NPROC=2 bash launch/deepspeed.sh backend=zero3 run_dir=outputs/zero3-run
#
# Several nodes: a hostfile with one line per node ("node1 slots=8"), run on the first node:
#   HOSTFILE=hostfile MASTER_ADDR=node1 NPROC=8 bash launch/deepspeed.sh backend=zero2 run_dir=/shared/run
#
# --no_local_rank: distft reads LOCAL_RANK from the environment (Hydra would reject
# --local_rank=N as an override). Give run_dir explicitly, on a shared filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source launch/malloc.sh  # DISTFT_MALLOC=auto (tcmalloc when installed)|system|tcmalloc|jemalloc: see there
ARGS=(--num_gpus "${NPROC:-2}" --no_local_rank --module)
if [ -n "${HOSTFILE:-}" ]; then
  ARGS=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
        --master_port "${MASTER_PORT:-29500}" "${ARGS[@]}")
fi
source launch/threads.sh
distft_threads "$(nproc)" "${NPROC:-2}"  # each process a share of the cores, unless OMP_NUM_THREADS is set
exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" distft.train "$@"

#!/usr/bin/env bash
# Start distft-train on N processes per node with torchrun; arguments are Hydra overrides.
#
# One node, 2 processes (CPU over gloo, or 2 GPUs over NCCL):
#   NPROC=2 bash launch/torchrun.sh backend=ddp run_dir=outputs/ddp-run
#
# Several nodes: run the same command on every node, with the first node's address:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 NPROC=8 bash launch/torchrun.sh backend=ddp run_dir=/shared/run
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 NPROC=8 bash launch/torchrun.sh backend=ddp run_dir=/shared/run
#
# Give run_dir explicitly (on a shared filesystem across nodes): every rank must write to
# and resume from the same folder. trainer.batch_size is per process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source launch/malloc.sh  # DISTFT_MALLOC=auto (tcmalloc when installed)|system|tcmalloc|jemalloc: see there
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-distft}")
else
  RDZV=(--standalone)
fi
source launch/threads.sh
distft_threads "$(nproc)" "$NPROC"  # each process a share of the cores, unless OMP_NUM_THREADS is set
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" -m distft.train "$@"

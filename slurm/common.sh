# Sourced by the sbatch scripts in this folder; not a job script itself.
#
# distft_setup "$@"   where the code and Python are, run_dir, the nodes and the rendezvous
# distft_run CMD...   run CMD as a job step; SIGUSR1 -> checkpoint -> requeue

distft_setup() {
  # The checkout the job was submitted from (sbatch runs a copy of the script elsewhere).
  DISTFT_HOME=${DISTFT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$DISTFT_HOME" || { echo "distft: cannot cd to DISTFT_HOME=$DISTFT_HOME" >&2; exit 2; }
  source launch/malloc.sh  # DISTFT_MALLOC (default auto: tcmalloc when installed), exported to every node's step
  source launch/threads.sh
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
  fi
  if ! "$PYTHON" -c "import distft" 2>/dev/null; then
    echo "distft: $PYTHON cannot import distft; submit from the distft checkout after 'bash scripts/setup.sh'," \
         "or set PYTHON=/path/to/env/bin/python (sbatch --export=ALL,PYTHON=...)" >&2
    exit 2
  fi

  # One run_dir for the whole job and its requeues (the job id survives a requeue), on a
  # filesystem every node sees: $DISTFT_OUTPUTS (default outputs/ in the checkout)
  # /slurm-<job name>-<job id>[-<array task>]. A run_dir=... override of the user's wins.
  local tag=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}
  RUN_DIR=${DISTFT_OUTPUTS:-outputs}/slurm-${SLURM_JOB_NAME:-distft}-$tag
  local a
  for a in "$@"; do
    case $a in run_dir=*) RUN_DIR=${a#run_dir=} ;; esac
  done
  case $RUN_DIR in /*) ;; *) RUN_DIR=$DISTFT_HOME/$RUN_DIR ;; esac
  ARGS=("run_dir=$RUN_DIR" "$@")

  # The nodes of this job; the first one hosts the rendezvous. Its address is SLURM's
  # NodeAddr for it (the node name itself on most clusters).
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  NNODES=${#NODES[@]}
  MASTER_ADDR=$(scontrol show node "${NODES[0]}" -o | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
  MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
  # The rendezvous port: MASTER_PORT, else one derived from the job id so that two jobs
  # sharing a node do not collide.
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
  # Processes per node: one per GPU given to the job, else NPROC_PER_NODE (default 1).
  NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  # CPU threads per process: the task's cores shared by its processes.
  distft_threads "${SLURM_CPUS_PER_TASK:-1}" "$NPROC_PER_NODE"
  export TOKENIZERS_PARALLELISM=false
  echo "[distft] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${NODES[*]}: $NNODES node(s) x" \
       "$NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, run_dir=$RUN_DIR"
}

distft_run() {
  # SIGUSR1 (from --signal=B:USR1@N or `scancel --signal=USR1 --batch`) reaches only this
  # shell: pass it to the job step, whose processes finish their step and write a
  # checkpoint (the launchers themselves ignore USR1, see the srun lines), then requeue.
  # SIGTERM (cancel, preemption, time limit) is passed on the same way; SLURM decides
  # whether the job comes back.
  local stop="" step rc
  trap 'stop=USR1; echo "[distft] SIGUSR1: every rank checkpoints after its current step"; kill -USR1 "$step" 2>/dev/null' USR1
  trap 'stop=TERM; echo "[distft] SIGTERM: every rank checkpoints after its current step"; kill -TERM "$step" 2>/dev/null' TERM
  "$@" &
  step=$!
  # `wait` returns early when a trap runs; wait again until the step has really ended.
  while :; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break
  done
  if [ "$stop" = USR1 ] && [ -f "$RUN_DIR/preempted.json" ]; then
    echo "[distft] checkpoint written ($(tr -d '\n ' < "$RUN_DIR/preempted.json")); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[distft] scontrol requeue failed; resubmit the same command to resume from the checkpoint" >&2
    exit 1
  fi
  if [ -f "$RUN_DIR/preempted.json" ]; then
    echo "[distft] stopped with a checkpoint ($stop); the same command resumes it (resume=auto)"
  fi
  return "$rc"
}

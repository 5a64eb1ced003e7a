# Sourced by the launchers (launch/torchrun.sh, launch/deepspeed.sh, slurm/common.sh).
#
#   distft_threads CORES PROCESSES
#
# exports OMP_NUM_THREADS, unless it is set, as each process's equal share of the cores (at
# least one). torch takes every core by default, and processes asking together for more
# cores than there are wait on each other's threads (two of 2 threads each on 2 cores: 11x
# slower steps). distft.sweep.shared_threads does the same for sweep workers.
distft_threads() {
  local share=$(( $1 / $2 ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( share > 0 ? share : 1 ))}
}

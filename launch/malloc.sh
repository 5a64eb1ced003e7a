# Sourced by the launchers (launch/*.sh, scripts/train.sh, slurm/common.sh): choose the
# memory allocator of the training processes with DISTFT_MALLOC.
#
#   DISTFT_MALLOC=system    glibc's malloc (the default)
#   DISTFT_MALLOC=tcmalloc  gperftools' tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4)
#   DISTFT_MALLOC=jemalloc  jemalloc (Debian/Ubuntu: libjemalloc2)
#   DISTFT_MALLOC=/path/to/libsomething.so
#
# On CPU, glibc keeps the memory of freed activations in its heaps, so the resident set
# grows well past the live tensors; tcmalloc returns it (SmolLM2 LoRA on 2 cores: about
# 30% less peak RSS at the same tokens/s, see BENCHMARKS.md). The library is put in
# LD_PRELOAD, which the launchers' child processes inherit; distft logs the allocator in use.

distft_malloc() {
  local choice=${DISTFT_MALLOC:-system} lib path=""
  case $choice in
    system|glibc|"") return 0 ;;
    tcmalloc) lib=libtcmalloc_minimal.so.4 ;;
    jemalloc) lib=libjemalloc.so.2 ;;
    */*) lib=$choice; path=$choice ;;
    *) echo "distft: DISTFT_MALLOC=$choice: choose system, tcmalloc, jemalloc or a path to the library" >&2
       return 2 ;;
  esac
  if [ -z "$path" ]; then
    local d
    # The active environment first (conda's gperftools/jemalloc), then the system's.
    for d in ${CONDA_PREFIX:+"$CONDA_PREFIX/lib"} /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu \
             /lib/x86_64-linux-gnu /lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
      if [ -e "$d/$lib" ]; then path=$d/$lib; break; fi
    done
  fi
  if [ -z "$path" ] || [ ! -e "$path" ]; then
    local pkg=libtcmalloc-minimal4
    [ "$choice" = jemalloc ] && pkg=libjemalloc2
    echo "distft: DISTFT_MALLOC=$choice: $lib not found (Debian/Ubuntu: apt-get install $pkg;" \
         "conda: gperftools or jemalloc); unset DISTFT_MALLOC to use the system's malloc" >&2
    return 2
  fi
  export LD_PRELOAD="$path${LD_PRELOAD:+:$LD_PRELOAD}"
}
distft_malloc || exit 2

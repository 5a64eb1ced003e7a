# Sourced by the launchers (launch/*.sh, scripts/train.sh, slurm/common.sh): choose the
# memory allocator of the training processes with DISTFT_MALLOC.
#
#   DISTFT_MALLOC=auto      tcmalloc when it is installed, else the system's malloc (the default)
#   DISTFT_MALLOC=system    glibc's malloc
#   DISTFT_MALLOC=tcmalloc  gperftools' tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4)
#   DISTFT_MALLOC=jemalloc  jemalloc (Debian/Ubuntu: libjemalloc2)
#   DISTFT_MALLOC=/path/to/libsomething.so
#
# On CPU, glibc keeps the memory of freed activations in its heaps, so the resident set
# grows well past the live tensors; tcmalloc returns it (SmolLM2 LoRA on 2 cores: about
# 30% less peak RSS at the same tokens/s, see BENCHMARKS.md), and on an Intel Xeon with AMX
# it trained 2.6x faster (README, Speed and memory): hence `auto`. The library is put in
# LD_PRELOAD, which the launchers' child processes inherit; distft logs the allocator in use.
# An explicit choice whose library is missing stops the launcher; `auto` falls back quietly.

distft_malloc() {
  local choice=${DISTFT_MALLOC:-auto} lib path=""
  case $choice in
    system|glibc) return 0 ;;
    auto|tcmalloc) lib=libtcmalloc_minimal.so.4 ;;
    jemalloc) lib=libjemalloc.so.2 ;;
    */*) lib=$choice; path=$choice ;;
    *) echo "distft: DISTFT_MALLOC=$choice: choose auto, system, tcmalloc, jemalloc or a path to the library" >&2
       return 2 ;;
  esac
  if [ "$choice" = auto ]; then  # an allocator preloaded by the caller stays the only one
    case ${LD_PRELOAD:-} in *tcmalloc*|*jemalloc*|*mimalloc*) return 0 ;; esac
  fi
  if [ -z "$path" ]; then
    local d
    # The active environment first (conda's gperftools/jemalloc), then the system's.
    for d in ${CONDA_PREFIX:+"$CONDA_PREFIX/lib"} /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu \
             /lib/x86_64-linux-gnu /lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
      if [ -e "$d/$lib" ]; then path=$d/$lib; break; fi
    done
  fi
  if [ -z "$path" ] && [ "$choice" = auto ]; then return 0; fi
  if [ -z "$path" ] || [ ! -e "$path" ]; then
    local pkg=libtcmalloc-minimal4
    [ "$choice" = jemalloc ] && pkg=libjemalloc2
    echo "distft: DISTFT_MALLOC=$choice: $lib not found (Debian/Ubuntu: apt-get install $pkg;" \
         "conda: gperftools or jemalloc); DISTFT_MALLOC=system for the system's malloc" >&2
    return 2
  fi
  case :${LD_PRELOAD:-}: in *":$path:"*) return 0 ;; esac  # already there (a launcher inside a launcher)
  export LD_PRELOAD="$path${LD_PRELOAD:+:$LD_PRELOAD}"
  # gperftools reports every allocation over 1 GiB on stderr; loading a large model makes many.
  [ "$lib" = libtcmalloc_minimal.so.4 ] && export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}
  return 0
}
distft_malloc || exit 2

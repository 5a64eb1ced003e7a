"""Resumable checkpoints, written atomically.

checkpoints/step-N/
  weights.safetensors   the trainable parameters, whole (the frozen ones are rebuilt
                        from the model config and seed, so an adapter run stays small)
  optimizer.pt          optimizer + scheduler state (tensors and numbers only; loaded
                        with weights_only=True, so nothing arbitrary is unpickled); the
                        optimizer part is None where a backend keeps it sharded:
  dcp/                  FSDP2 only: the optimizer state, sharded, torch.distributed.checkpoint
  zero/                 DeepSpeed ZeRO only: each rank's partition of the optimizer state,
                        in DeepSpeed's own format (written and read by DeepSpeed itself)
  rng.safetensors       torch CPU (and CUDA) generator states, one set per rank
  state.json            step, data position, best metric, early-stopping counter, the
                        Python/NumPy RNG states, and the batch geometry and state format
                        that decide whether another process count can continue it

A checkpoint is written under a temporary name and renamed when complete, so a run
killed mid-write leaves no folder that `resume=auto` could mistake for a checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distft.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> Dict[str, torch.Tensor]:
    """This process's torch generator states (each rank has its own, for dropout)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _py_np_rng() -> Dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(rng: Dict[str, torch.Tensor], py_np: Dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, keys, gauss = py_np["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = py_np["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def tmp_dir_of(final: Path) -> Path:
    # One writer per run_dir (rank 0), so the name needs no pid; every rank of a sharding
    # backend can find it to add its own shard.
    return final.parent / f".tmp-{final.name}"


def atomic_dir(final: Path):
    """A temporary sibling folder to write into; `commit_dir` renames it into place."""
    tmp = tmp_dir_of(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def checkpoint_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step}"


def write_checkpoint(final: Path, step: int, weights: Dict[str, torch.Tensor], optimizer: Optional[Dict],
                     scheduler: Dict, state: Dict, rng_per_rank: List[Dict[str, torch.Tensor]], keep: int) -> Path:
    """Write rank 0's files into the temporary folder of `final` (shards of other ranks may
    already be there), then rename it to `final` and drop checkpoints beyond the newest `keep`."""
    tmp = tmp_dir_of(final)
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
    rng = {f"rank{r}.{k}": v for r, states in enumerate(rng_per_rank) for k, v in states.items()}
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": _py_np_rng()}))
    commit_dir(tmp, final)
    _rotate(final.parent, keep)
    return final


def _rotate(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(list_checkpoints(ckpt_root))
    for step in steps[:-keep]:
        shutil.rmtree(ckpt_root / f"step-{step}", ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> Dict[int, Path]:
    if not ckpt_root.is_dir():
        return {}
    out = {}
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "state.json").is_file():
            out[int(m.group(1))] = d
    return out


def find_resume_checkpoint(resume: str, ckpt_root: Path) -> Optional[Path]:
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[max(found)] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"resume={resume}: not a complete distft checkpoint (no state.json)")
    return path


def exported_weights(run_dir: Path, steps: int, exported_step: int) -> Path:
    """The folder holding the trainable weights a finished run exported: best/ when the
    export came from an earlier step, else the newest checkpoint (the last step's)."""
    run_dir = Path(run_dir)
    if exported_step != steps and (run_dir / "best" / "weights.safetensors").is_file():
        return run_dir / "best"
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"{run_dir}: no checkpoint holds the exported weights")
    return found[max(found)]


def read_state(path: Path) -> Dict:
    return json.loads((path / "state.json").read_text())


def check_resumable(path: Path, state: Dict, *, world_size: int, batch_size: int, grad_accum: int,
                    state_format: str) -> int:
    """Refuse, with the reason, a checkpoint this run cannot continue exactly; returns the
    process count that wrote it.

    Another process count is fine when every process-independent quantity stays: the
    global micro-batch (batch_size x processes, which fixes the data order) and the
    accumulation (which fixes the schedule). The weights are stored whole and the
    optimizer state either whole, as resharding DCP files, or converted to a DeepSpeed
    universal checkpoint by the ZeRO backend."""
    written_by = state.get("world_size", 1)
    fmt = state.get("state_format")
    if fmt is not None and fmt != state_format:
        raise ConfigError(f"{path} holds {fmt} optimizer state; this run's backend keeps {state_format} state. "
                          f"Resume with the backend that wrote it (backend={fmt if fmt != 'torch' else 'single or ddp'})")
    if written_by == world_size:
        return written_by
    global_batch = state.get("global_micro_batch")
    if global_batch is None:
        raise ConfigError(f"{path} was written by {written_by} process(es) before distft recorded the batch "
                          f"geometry; resume it with {written_by} (this run has {world_size})")
    if global_batch % world_size or state.get("grad_accum") != grad_accum or batch_size * world_size != global_batch:
        hint = (f"set trainer.batch_size={global_batch // world_size} trainer.grad_accum={state.get('grad_accum')}"
                if global_batch % world_size == 0 else f"use a process count that divides {global_batch}")
        raise ConfigError(
            f"{path} was written by {written_by} process(es) with {global_batch} examples per micro-batch "
            f"(batch_size x processes) and grad_accum={state.get('grad_accum')}; continuing on {world_size} "
            f"process(es) gives the same data order and schedule only with the same values: {hint}"
        )
    return written_by


def read_checkpoint(path: Path, rank: int = 0, seed: int = 0):
    """(weights, optimizer state, scheduler state, trainer state) of a checkpoint; restores
    this process's RNG states (a rank the writing run did not have is seeded afresh from
    the seed, the rank and the step: its dropout masks are new ones)."""
    state = read_state(path)
    for key in ("world_size", "global_micro_batch", "grad_accum", "state_format"):
        state.pop(key, None)
    weights = load_file(str(path / "weights.safetensors"))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    prefix = f"rank{rank}."
    rng = {k[len(prefix):]: v for k, v in load_file(str(path / "rng.safetensors")).items() if k.startswith(prefix)}
    py_np = state.pop("rng")
    if rng:
        _restore_rng(rng, py_np)
    else:
        _restore_rng({"torch": torch.Generator().manual_seed(seed + 7919 * rank + state["step"]).get_state()}, py_np)
    return weights, opt["optimizer"], opt["scheduler"], state

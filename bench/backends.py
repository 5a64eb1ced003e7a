"""Step time and peak memory per process of each backend against DDP, in one run.

    python bench/backends.py                   # tiny model and SmolLM2-135M, 2 processes
    python bench/backends.py --models tiny --steps 20
    python bench/backends.py --quick           # tiny only, few steps
    python bench/backends.py --set trainer.release_freed_memory=false   # glibc's malloc untuned

Each backend trains the same config (full fine-tuning, generated instruction data) on
`--nproc` processes started by torchrun. Step time is the median over the steps after the
first two; peak memory is per process during training (CPU: the resident set's high-water
mark since training began, memory_kind cpu_peak_rss; GPU: allocator peak). Ratios are against DDP from
the same run. Writes bench/results/backends.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
MODELS = {
    "tiny": ["model=tiny_llama", "trainer.batch_size=8", "data.max_length=256"],
    "smollm2": ["model=smollm2", "trainer.batch_size=2", "data.max_length=128"],
}


def train_overrides(overrides) -> list:
    """distft-train's overrides for a benchmark run of `overrides`."""
    return ["task=instruction", "trainer.eval_every=0", "trainer.save_every=0", "data.num_train=256",
            "data.num_validation=8", "trainer.lr=1e-4", "logger=csv", "trainer.precision=fp32",
            "logger.progress_bar=false", *overrides]


def train(run_dir: Path, nproc: int, overrides) -> dict:
    """One training run of `overrides` (instruction data, fp32, no eval or intermediate
    checkpoint) on `nproc` processes (torchrun above one); returns the environment it ran in."""
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = [sys.executable, "-m", "distft.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "distft.train"]
    cmd = [*launcher, *train_overrides(overrides), f"run_dir={run_dir}", "resume=never"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    print("$", " ".join(cmd[len(launcher):]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return env


def run(model: str, backend: str, nproc: int, steps: int, out: Path, extra=()) -> dict:
    run_dir = out / "runs" / f"backends-{model}-{backend}"
    train(run_dir, nproc, [*MODELS[model], f"backend={backend}", "strategy=full", f"trainer.max_steps={steps}", *extra])
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [e["step_seconds"] for e in events if "step_seconds" in e][2:]
    shutil.rmtree(run_dir, ignore_errors=True)  # a SmolLM2 run leaves 1.6 GB of export and checkpoint
    return {"model": model, "backend": backend, "processes": nproc,
            "step_seconds": statistics.median(times), "peak_memory_mb": summary["peak_memory_mb_per_process"],
            "memory_kind": summary["memory_kind"], "final_loss": [e["loss"] for e in events if "loss" in e][-1]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--backends", nargs="*", default=BACKENDS, choices=BACKENDS)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="distft-train overrides for every run (e.g. trainer.release_freed_memory=false)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.steps = ["tiny"], 5
    out = Path(args.out)
    rows = [run(m, b, args.nproc, args.steps, out, args.set) for m in args.models for b in args.backends]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["backend"] == "ddp")
        r["time_vs_ddp"] = r["step_seconds"] / base["step_seconds"]
        r["memory_vs_ddp"] = max(r["peak_memory_mb"]) / max(base["peak_memory_mb"])
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
    (out / "backends.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine}; {args.nproc} processes; {args.steps} steps, full fine-tuning; "
             f"command: `python bench/backends.py {' '.join(sys.argv[1:])}`", "",
             "| model | backend | step s (median) | x DDP | peak MB per process | x DDP | final loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['step_seconds']:.3f} | {r['time_vs_ddp']:.2f} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_memory_mb'])} | {r['memory_vs_ddp']:.3f} | "
                     f"{r['final_loss']:.4f} |")
    lines += ["", "Reading the memory column on CPU: it is each process's peak resident set from the first training "
              "step on (the kernel's high-water mark, reset when training starts: the forward's activations and the "
              "optimizer's first step count, the model load does not). The activations, the logits and the runtime "
              "(distft-plan prints each) are the same under every backend; sharding divides the rest. Under "
              "fsdp and zero3 each process maps the weights from safetensors and keeps "
              "its shard (model.sharded_loading); with trainer.release_freed_memory (on by default, glibc) freed "
              "blocks go back to the OS, so parameter sharding shows (`--set trainer.release_freed_memory=false` "
              "for glibc's own behaviour, which keeps them). On GPU the script reports the allocator's peak. The "
              "equal final losses are a check: every backend trains the same model on the same global batches."]
    (out / "backends.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

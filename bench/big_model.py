"""A model of about a billion parameters on the sharded backends, on one host: does each
process stay below what one whole fp32 copy of the model and its Adam state would need?

    python bench/big_model.py                      # fsdp and zero3, 2 processes, 3 steps
    python bench/big_model.py --backends zero3 --set trainer.precision=bf16

The model is conf/model/llama_1b.yaml (TinyLlama-1.1B's shape, 970M parameters, random
weights built from the config, the byte tokenizer). Each backend trains 3 steps of one
packed 256-token row per process, fp32, full fine-tuning; sharded loading builds the model
once in a child process and each rank maps its shard. Reported per process: the peak
resident set during training (the kernel's high-water mark from the first step on) and
distft-plan's plan of the same run, against 12 bytes a parameter (fp32 weights + Adam's two
states) and 16 (with fp32 gradients). Writes bench/results/big_model.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from backends import train  # noqa: E402
from report import run_rows  # noqa: E402

MODEL = ["model=llama_1b", "trainer.batch_size=1", "data.max_length=256", "data.packing=true", "data.num_train=64",
         "strategy=full"]


def run(backend: str, nproc: int, steps: int, out: Path, extra) -> dict:
    run_dir = out / "runs" / f"big-{backend}"
    env = train(run_dir, nproc, [*MODEL, f"backend={backend}", f"trainer.max_steps={steps}", *extra])
    summary = json.loads((run_dir / "summary.json").read_text())
    check = json.loads(subprocess.run([sys.executable, "-m", "distft.plan", "--check", str(run_dir), "--json"],
                                      cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"backend": backend, "processes": nproc, "parameters": summary["total_params"],
            "peak_memory_mb": summary["peak_memory_mb_per_process"], "memory_kind": summary["memory_kind"],
            "planned_peak_mb": check["planned_peak_mb"], "memory_error": check["memory_error"],
            "losses": losses, "extra": list(extra)}


def render(machine: str, rows: list) -> str:
    lines = [f"Machine: {machine}; command: `python bench/big_model.py {' '.join(sys.argv[1:])}` (rows of earlier "
             "invocations kept)", "",
             "conf/model/llama_1b.yaml, full fine-tuning, one packed 256-token row a process, 3 steps; peak resident "
             "set a process from the first step on (the load not counted).", "",
             "| backend | overrides | processes | parameters | peak MB per process | planned MB | fp32 copy + Adam MB "
             "| + gradients MB | losses |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["parameters"]
        lines.append(f"| {r['backend']} | {' '.join(r['extra']) or '-'} | {r['processes']} | {n:,} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_memory_mb'])} | {r['planned_peak_mb']:.0f} | "
                     f"{12 * n / 2**20:.0f} | {16 * n / 2**20:.0f} | {', '.join(f'{x:.4f}' for x in r['losses'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="*", default=["fsdp", "zero3"], choices=["fsdp", "zero3"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="distft-train overrides for every run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    name = lambda b: " ".join([b, *args.set])  # noqa: E731
    saved = Path(args.out) / "big_model.json"
    order = [r["row"] for r in json.loads(saved.read_text())["rows"]] if saved.exists() else []
    order += [name(b) for b in args.backends if name(b) not in order]
    run_rows(Path(args.out), "big_model", order, [name(b) for b in args.backends],
             lambda n: {"row": n, **run(n.split()[0], args.nproc, args.steps, Path(args.out), args.set)}, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())

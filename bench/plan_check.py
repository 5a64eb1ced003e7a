"""distft-plan against measured runs: planned and measured peak memory per process (and
tokens/s) for each model, strategy, backend and activation-checkpointing setting.

    python bench/plan_check.py                          # tiny and SmolLM2-135M, the whole matrix
    python bench/plan_check.py --models tiny --backends ddp zero3
    python bench/plan_check.py --quick                  # tiny, full, zero3, no checkpointing
    python bench/plan_check.py --replan                 # today's planner against the saved rows' runs

Each case trains a few steps for real (`single` in one process, the others on `--nproc`
processes under torchrun), then `distft-plan --check RUN_DIR --json` plans the same config
in a fresh process and compares with the run's summary.json: on CPU the measured peak is
the resident set's high-water mark from the first training step on. Rows of earlier
invocations are kept; writes bench/results/plan_check.{json,md}.
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
from backends import train, train_overrides  # noqa: E402
from report import run_rows  # noqa: E402

BACKENDS = ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"]
STRATEGIES = ["full", "lora"]
MODELS = {
    "tiny": ["model=tiny_llama", "trainer.batch_size=8", "data.max_length=256"],
    "smollm2": ["model=smollm2", "trainer.batch_size=2", "data.max_length=256"],
}
TARGET = 0.20  # |planned / measured - 1| on peak memory per process


def row_name(model, strategy, backend, ac):
    return f"{model}-{strategy}-{backend}" + ("-ac" if ac else "")


def case_overrides(name: str, steps: int) -> list:
    model, strategy, backend, *rest = name.split("-")
    return [*MODELS[model], f"backend={backend}", f"strategy={strategy}",
            f"trainer.activation_checkpointing={'true' if rest else 'false'}", f"trainer.max_steps={steps}",
            "data.packing=true"]


def run_case(name: str, nproc: int, steps: int, out: Path) -> dict:
    model, strategy, backend, *rest = name.split("-")
    ac = bool(rest)
    run_dir = out / "runs" / f"plan-{name}"
    procs = 1 if backend == "single" else nproc
    env = train(run_dir, procs, case_overrides(name, steps))
    proc = subprocess.run([sys.executable, "-m", "distft.plan", "--check", str(run_dir), "--json"], cwd=ROOT,
                          env=env, check=True, capture_output=True, text=True)
    check = json.loads(proc.stdout)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"row": name, "model": model, "strategy": strategy, "backend": backend, "checkpointing": ac,
            "processes": procs, **{k: v for k, v in check.items() if k != "run_dir"}}


def replan_case(row: dict, steps: int) -> dict:
    """`row` planned again by today's distft-plan (same config, this machine's runtime),
    against the peak and tokens/s its run measured: for a change to the planner, without
    training again. The row says it was replanned."""
    cmd = [sys.executable, "-m", "distft.plan", "--json", "plan.gpu=cpu", f"plan.gpus_per_node={row['processes']}",
           *train_overrides(case_overrides(row["row"], steps))]
    p = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    planned_mb, tps = p["total_gb"] * 1e9 / 2**20, p["tokens_per_second"]
    out = {**row, "planned_peak_mb": planned_mb, "memory_error": planned_mb / row["measured_peak_mb"] - 1,
           "planned_tokens_per_second": tps, "replanned": True,
           "planned_parts_mb": {k: v * 1e9 / 2**20 for k, v in p["parts_gb"].items()}}
    if row.get("measured_tokens_per_second"):
        out["time_error"] = row["measured_tokens_per_second"] / tps - 1
    return out


def render(machine: str, rows: list) -> str:
    lines = [f"Machine: {machine}; command: `python bench/plan_check.py {' '.join(sys.argv[1:])}`", "",
             "Planned (`distft-plan --check`) against measured peak memory per process: the CPU resident set's "
             "high-water mark from the first training step on, fp32, packed rows. Measured tokens/s come from "
             "runs made while other work shared the 2 cores: read them as an order of magnitude. "
             f"Target: within {TARGET:.0%}. Rows marked replanned were planned again (`--replan`) after a change to "
             "the planner, against the peak their run had measured.", "",
             "| model | strategy | backend | AC | processes | planned MB | measured MB | error | "
             "planned tokens/s | measured tokens/s | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['strategy']} | {r['backend']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['processes']} | {r['planned_peak_mb']:.0f} | {r['measured_peak_mb']:.0f} | "
                     f"{r['memory_error']:+.1%} | {r['planned_tokens_per_second']:.0f} | "
                     f"{r['measured_tokens_per_second'] or 0:.0f} |" + (" replanned |" if r.get("replanned") else " |"))
    errors = [abs(r["memory_error"]) for r in rows]
    if errors:
        inside = sum(e <= TARGET for e in errors)
        lines += ["", f"{inside} of {len(rows)} cases within {TARGET:.0%}; largest error {max(errors):.1%}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--strategies", nargs="*", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--backends", nargs="*", default=BACKENDS, choices=BACKENDS)
    ap.add_argument("--checkpointing", nargs="*", default=["no", "yes"], choices=["no", "yes"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny, full, zero3, no checkpointing, 3 steps")
    ap.add_argument("--replan", action="store_true",
                    help="plan the saved rows again (a planner change) against what their runs measured; no training")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    stem = "plan_check"
    if args.quick:
        args.models, args.strategies, args.backends, args.checkpointing, args.steps = \
            ["tiny"], ["full"], ["zero3"], ["no"], 3
        stem = "plan_check-quick"
    order = [row_name(m, s, b, ac) for m in MODELS for s in STRATEGIES for b in BACKENDS for ac in (False, True)]
    names = [row_name(m, s, b, ac == "yes") for m in args.models for s in args.strategies for b in args.backends
             for ac in args.checkpointing]
    if args.replan:
        saved = {r["row"]: r for r in json.loads((Path(args.out) / f"{stem}.json").read_text())["rows"]}
        names = [n for n in names if n in saved]
        run_rows(Path(args.out), stem, order, names, lambda n: replan_case(saved[n], args.steps), render)
        return 0
    run_rows(Path(args.out), stem, order, names, lambda n: run_case(n, args.nproc, args.steps, Path(args.out)), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())

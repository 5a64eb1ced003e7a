"""One multi-task run against single-task runs: SST-2 + AG News + TREC on MiniLM.

    python bench/multitask.py              # LoRA, 2 epochs of each dataset
    python bench/multitask.py --quick      # 200 examples per task, a smoke run

Each single-task run trains the real MiniLM on one dataset from ../shared/data; the
multi-task run trains one shared encoder with one head per task on all three (the
sampler proportional to size, so each example is seen about as often as in its
single-task run), with the same strategy, learning rate, batch and epochs. Accuracy is
on each dataset's validation split with the final weights (no selection on validation).
The target: every task within 2 points of its single-task run. Writes
bench/results/multitask.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
TASKS = ["sst2", "agnews", "trec"]
COMMON = ["model=minilm", "task=classification", "strategy=lora", "strategy.r=16", "strategy.alpha=32",
          "strategy.dropout=0.0", "strategy.target_modules=[query,key,value,dense]", "trainer.lr=1e-3",
          "trainer.batch_size=32", "trainer.max_steps=-1", "trainer.warmup_ratio=0.06", "trainer.eval_every=0",
          "trainer.save_every=0", "trainer.export_best=false", "data.max_length=96", "logger=csv",
          "logger.progress_bar=false", "resume=never", "trainer.precision=fp32"]


def run(name: str, args: list, out: Path) -> dict:
    run_dir = out / "runs" / f"multitask-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distft.train", *COMMON, *args, f"run_dir={run_dir}"]
    print("$", " ".join(cmd[2:]), flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "wall_seconds": round(time.time() - started, 1), "command": " ".join(cmd[2:])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not all((DATA / t / "train.jsonl").is_file() for t in TASKS):
        print(f"{DATA} lacks {TASKS}: this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    limit = ["data.max_train_examples=200", "data.max_validation_examples=100"] if args.quick else []
    epochs = [f"trainer.epochs={1 if args.quick else args.epochs}"]
    out = Path(args.out)
    single = {}
    for t in TASKS:
        single[t] = run(t, [*epochs, *limit, "data=files", f"data.train={DATA / t / 'train.jsonl'}",
                            f"data.validation={DATA / t / 'validation.jsonl'}"], out)
    members = []
    for t in TASKS:
        members += [f"+data.tasks.{t}.data.train={DATA / t / 'train.jsonl'}",
                    f"+data.tasks.{t}.data.validation={DATA / t / 'validation.jsonl'}"]
    multi = run("mixture", [*epochs, *limit, "data=mixture", "data.sampler=proportional", *members], out)

    rows = []
    for t in TASKS:
        a = single[t]["summary"]["eval/accuracy"]
        b = multi["summary"][f"eval/{t}/accuracy"]
        rows.append({"task": t, "single_task": a, "multi_task": b, "difference_points": 100 * (b - a),
                     "within_2_points": b >= a - 0.02})
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
    (out / "multitask.json").write_text(json.dumps(
        {"machine": machine, "rows": rows, "single": single, "multi": multi}, indent=2))
    lines = [f"Machine: {machine}; MiniLM + LoRA (r 16), lr 1e-3, batch 32, max_length 96, "
             f"{'1 epoch, 200 examples per task (quick)' if args.quick else f'{args.epochs:g} epochs'}; "
             f"command: `python bench/multitask.py {' '.join(sys.argv[1:])}`", "",
             "| task | single-task accuracy | multi-task accuracy | difference (points) | within 2 points |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['single_task']:.4f} | {r['multi_task']:.4f} | "
                     f"{r['difference_points']:+.2f} | {'yes' if r['within_2_points'] else 'no'} |")
    secs = sum(s["wall_seconds"] for s in single.values())
    lines += ["", f"Wall time: single-task runs {secs:.0f} s in all, multi-task run {multi['wall_seconds']:.0f} s.",
              "", "Commands:", ""] + [f"    {s['command']}" for s in [*single.values(), multi]]
    (out / "multitask.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

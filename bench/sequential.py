"""SST-2, then AG News, on MiniLM with LoRA: one command, the forgetting matrix.

    python bench/sequential.py            # 1 epoch per stage
    python bench/sequential.py --quick    # 200 examples per stage

Runs `distft-train experiment=sequential_sst2_agnews ...` (the stages are in
conf/experiment/sequential_sst2_agnews.yaml, data from ../shared/data) and copies the
stage-by-task accuracy matrix to bench/results/sequential.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep finished stages of an interrupted run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not (ROOT.parent / "shared" / "data" / "agnews").is_dir():
        print("this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    out = Path(args.out)
    run_dir = out / "runs" / "sequential"
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distft.train", "experiment=sequential_sst2_agnews", "model=minilm",
           "task=classification", "strategy=lora", "strategy.r=16", "strategy.alpha=32", "strategy.dropout=0.0",
           "strategy.target_modules=[query,key,value,dense]", "trainer.lr=1e-3", "trainer.batch_size=32",
           "trainer.max_steps=-1", "trainer.epochs=1", "trainer.warmup_ratio=0.06", "trainer.save_every=0",
           "trainer.export_best=false", "data.max_length=96", "logger=csv", "trainer.precision=fp32", "logger.progress_bar=false",
           f"run_dir={run_dir}"]
    if args.quick:
        cmd += ["data.max_train_examples=200", "data.max_validation_examples=100"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((run_dir / "forgetting.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "forgetting.json", out / "sequential.json")
    shutil.copy(run_dir / "forgetting.png", out / "sequential.png")
    names = result["tasks"]
    lines = [f"MiniLM + LoRA (r 16), lr 1e-3, batch 32, 1 epoch per stage{' (quick)' if args.quick else ''}; "
             f"command: `python {' '.join(['-m', 'distft.train'] + cmd[3:])}`", "",
             f"Validation {result['metric']} after each stage (rows) on each task (columns):", "",
             "| after stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row) + " |")
    lines += ["", "Forgetting (best minus final): "
              + ", ".join(f"{k} {v * 100:.2f} points" for k, v in result["forgetting"].items()),
              "", "![matrix](sequential.png)"]
    (out / "sequential.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

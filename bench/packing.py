"""Packed vs padded training on the Alpaca data: non-pad tokens per second, same run.

    python bench/packing.py                 # SmolLM2-135M + LoRA, max_length 256, batch 8
    python bench/packing.py --quick         # the tiny model, a smoke run
    python bench/packing.py --repeats 2     # A B A B

Both cases train the same model, strategy, learning rate and seed on the same Alpaca rows
(../shared/data/alpaca), batch 8: padded = one example per row, padded to the longest in
its batch; packed = examples packed into rows of max_length tokens (data.packing=true).
Throughput is non-pad tokens over the summed step times after the first two steps.
Writes bench/results/packing.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "train.jsonl"
MODELS = {
    "smollm2": ["model=smollm2", "strategy=lora", "strategy.r=16", "strategy.alpha=32",
                "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]", "trainer.lr=2e-4"],
    "tiny": ["model=tiny_llama", "strategy=full", "trainer.lr=1e-3"],
}


def run(model: str, packed: bool, steps: int, max_length: int, rows: int, out: Path, tag: str) -> dict:
    run_dir = out / "runs" / f"packing-{model}-{'packed' if packed else 'padded'}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distft.train", *MODELS[model], "task=instruction", "data=files",
           f"data.train={ALPACA}", f"data.max_train_examples={rows}", "data.validation_split=0.02", "data.drop_empty=true",
           f"data.max_length={max_length}", f"data.packing={str(packed).lower()}", "trainer.batch_size=8",
           f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.warmup_steps=0",
           "trainer.export_best=false", "logger=csv", "trainer.precision=fp32", "logger.progress_bar=false", f"run_dir={run_dir}",
           "resume=never"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ev = [e for e in events if "step_seconds" in e][2:]
    report = json.loads((run_dir / "data_report.json").read_text())
    tokens = sum(e["tokens"] for e in steps_ev)
    return {"model": model, "case": "packed" if packed else "padded", "tag": tag,
            "tokens_per_second": tokens / sum(e["step_seconds"] for e in steps_ev),
            "padding_share": 1 - tokens / sum(e["padded_tokens"] for e in steps_ev),
            "step_seconds": sum(e["step_seconds"] for e in steps_ev) / len(steps_ev),
            "final_loss": [e["loss"] for e in events if "loss" in e][-1],
            "packing": report.get("packing")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rows", type=int, default=500, help="Alpaca rows to read")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not ALPACA.is_file():
        print(f"{ALPACA} not found: this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    if args.quick:
        args.model, args.steps = "tiny", 6
    out = Path(args.out)
    results = []
    for i in range(args.repeats):  # A B A B: drift on the machine hits both cases alike
        for packed in (False, True):
            results.append(run(args.model, packed, args.steps, args.max_length, args.rows, out, str(i)))
    mean = {case: sum(r["tokens_per_second"] for r in results if r["case"] == case) / args.repeats
            for case in ("padded", "packed")}
    ratio = mean["packed"] / mean["padded"]
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
    (out / "packing.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": results,
                                                  "packed_vs_padded": ratio}, indent=2))
    lines = [f"Machine: {machine}; model {args.model}; Alpaca ({args.rows} rows), max_length {args.max_length}, "
             f"batch 8, {args.steps} steps; command: `python bench/packing.py {' '.join(sys.argv[1:])}`", "",
             "| case | repeat | non-pad tokens/s | padding share | s/step | final loss |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['tag']} | {r['tokens_per_second']:.1f} | {r['padding_share']:.1%} | "
                     f"{r['step_seconds']:.2f} | {r['final_loss']:.4f} |")
    packing = next(r["packing"] for r in results if r["case"] == "packed")
    lines += ["", f"Packed vs padded, non-pad tokens/s: **{ratio:.2f}x** "
                  f"({packing['examples']} examples in {packing['rows']} rows, {packing['fill']:.0%} full)."]
    (out / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

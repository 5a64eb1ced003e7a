"""Instruction tuning of the real SmolLM2-135M-Instruct with LoRA on Alpaca, end to end.

    python bench/instruction_smollm2.py            # 60 steps, packed rows of 256 tokens
    python bench/instruction_smollm2.py --quick    # 6 steps, a smoke run

Trains `model=smollm2 task=instruction strategy=lora` on ../shared/data/alpaca (5% held
out, the prompt masked, the EOS trained), evaluates the held-out loss before training and
during it, then shows the base model's and the tuned adapter's answers to a few prompts
with `distft-generate --before`. Writes bench/results/instruction_smollm2.{json,md}.
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
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
           "Rewrite this sentence in the passive voice: The cat chased the mouse."]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not ALPACA.is_file():
        print(f"{ALPACA} not found: this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    steps = 6 if args.quick else args.steps
    out = Path(args.out)
    run_dir = out / "runs" / "instruction-smollm2"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [sys.executable, "-m", "distft.train", "model=smollm2", "task=instruction", "strategy=lora",
             "strategy.r=16", "strategy.alpha=32", "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]",
             "data=files", f"data.train={ALPACA}", "data.validation_split=0.05", "data.max_validation_examples=64",
             "data.drop_empty=true", "data.max_length=256", "data.packing=true", "trainer.batch_size=4",
             f"trainer.max_steps={steps}", "trainer.lr=5e-4", "trainer.warmup_steps=5",
             f"trainer.eval_every={max(1, steps // 2)}", "trainer.eval_before_training=true",
             "trainer.eval_batch_size=8", "trainer.save_every=0", "logger=csv", "trainer.precision=fp32", "logger.progress_bar=false",
             f"run_dir={run_dir}", "resume=never"]
    print("$", " ".join(train[2:]), flush=True)
    subprocess.run(train, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(e["step"], e["eval/loss"]) for e in events if "eval/loss" in e]
    generate = [sys.executable, "-m", "distft.generate", str(run_dir / "final"), "--before", "--json",
                "--max-new-tokens", "48"] + [a for p in PROMPTS for a in ("--prompt", p)]
    print("$", " ".join(generate[2:]), flush=True)
    proc = subprocess.run(generate, cwd=ROOT, check=True, capture_output=True, text=True)
    answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
    report = json.loads((run_dir / "data_report.json").read_text())
    (out / "instruction_smollm2.json").write_text(json.dumps(
        {"machine": machine, "evals": evals, "answers": answers, "data": report}, indent=2))
    lines = [f"Machine: {machine}; SmolLM2-135M-Instruct + LoRA (r 16, q/k/v/o), Alpaca, packed rows of 256, "
             f"batch 4, lr 5e-4, {steps} steps; command: `python bench/instruction_smollm2.py "
             f"{' '.join(sys.argv[1:])}`", "",
             f"Training rows: {report['packing']['rows']} ({report['packing']['examples']} examples); "
             f"held-out examples: {report['validation']['kept']}.", "",
             "| step | held-out loss |", "|---|---|"] + [f"| {s} | {v:.4f} |" for s, v in evals]
    lines += ["", "Answers (greedy, 48 new tokens at most; Alpaca prompt format), base vs tuned:", ""]
    for a in answers:
        lines += [f"**{a['prompt']}**", "", "- before: " + a["before"].replace("\n", " "),
                  "- after: " + a["after"].replace("\n", " "), ""]
    (out / "instruction_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if evals[-1][1] < evals[0][1] else 1


if __name__ == "__main__":
    sys.exit(main())

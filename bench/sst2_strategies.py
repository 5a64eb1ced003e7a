"""Each strategy on the real MiniLM with SST-2: one `distft-train` command per strategy,
validation accuracy against the targets of the core issue.

    python bench/sst2_strategies.py                 # all four (about 25 minutes on 2 CPU cores)
    python bench/sst2_strategies.py --only lora     # one
    python bench/sst2_strategies.py --quick         # 300 examples each, a smoke run

Validation accuracy is of the final weights (eval only at the end, no checkpoint
selection on the validation set). Writes bench/results/sst2_strategies.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2"

COMMON = [
    "model=minilm", "task=classification", "data=files",
    f"data.train={DATA / 'train.jsonl'}", f"data.validation={DATA / 'validation.jsonl'}",
    "data.max_length=64", "trainer.max_steps=-1", "trainer.batch_size=32", "trainer.warmup_ratio=0.06",
    "trainer.eval_every=0", "trainer.save_every=0", "logger=csv", "trainer.precision=fp32", "logger.progress_bar=false",
]

# strategy -> (overrides, target accuracy)
RUNS = {
    "full": (["strategy=full", "trainer.lr=1e-4", "trainer.epochs=2", "trainer.weight_decay=0.01"], 0.85),
    "lora": (["strategy=lora", "strategy.r=16", "strategy.alpha=32",
              "strategy.target_modules=[query,key,value,dense]", "trainer.lr=1e-3", "trainer.epochs=3"], 0.83),
    "bitfit": (["strategy=bitfit", "trainer.lr=2e-3", "trainer.epochs=3", "trainer.weight_decay=0.0"], 0.80),
    "partial": (["strategy=partial", "strategy.head=mlp", "strategy.head_hidden=[256]",
                 "trainer.lr=1e-3", "trainer.epochs=4"], 0.78),
}


def _relative(arg: str) -> str:
    # Record commands as a user runs them from the repo root, without this machine's paths.
    return arg.replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"SST-2 not found at {DATA}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rows = []
    for name in args.only or list(RUNS):
        overrides, target = RUNS[name]
        run_dir = out / "runs" / f"sst2-{name}{'-quick' if args.quick else ''}"
        extra = ["data.max_train_examples=300", "data.max_validation_examples=200", "trainer.epochs=1"] if args.quick else []
        cmd = [sys.executable, "-m", "distft.train", *COMMON, *overrides, *extra, f"run_dir={run_dir}", "resume=never"]
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        summary = json.loads((run_dir / "summary.json").read_text())
        acc = summary["eval/accuracy"]
        rows.append({
            "strategy": name, "accuracy": acc, "target": target, "met": acc >= target,
            "steps": summary["steps"], "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"], "wall_seconds": round(time.time() - t0, 1),
            "command": "distft-train " + " ".join(shlex.quote(_relative(c)) for c in cmd[3:]),
        })
        print(f"{name}: accuracy {acc:.4f} (target {target})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-quick" if args.quick else ""
    (out / f"sst2_strategies{tag}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| strategy | val accuracy | target | met | trainable / total params | steps | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['accuracy']:.4f} | {r['target']} | {'yes' if r['met'] else 'NO'} | "
                     f"{r['trainable_params']:,} / {r['total_params']:,} | {r['steps']} | {r['wall_seconds']} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    (out / f"sst2_strategies{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A/B of one config key on SmolLM2 LoRA (packed bf16 by default, Alpaca, batch 8 x 256):
the values alternate (A B A B, so machine drift hits both alike), each run in a fresh
process through bench/vs_hf_trainer.py's runner; tokens/s, peak RSS and held-out loss.

    python bench/ab.py trainer.lean_dropout_rng fast torch --repeats 3 --malloc tcmalloc
    python bench/ab.py trainer.frozen_in_bf16 true false          # bench/frozen_bf16_ab.py
    python bench/ab.py trainer.lean_dropout_rng fast torch --model tiny --repeats 1 --steps 3 --precision fp32  # smoke
    python bench/ab.py malloc system tcmalloc     # the key `malloc`: the allocator (launch/malloc.sh), not a config key

Writes bench/results/ab-<key>.json (the rows, each value's mean tokens/s, the machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import vs_hf_trainer as vs  # noqa: E402


def run_ab(key: str, values, repeats: int, steps: int, out: Path, malloc: str = "system",
           layout: str = "packed", precision: str = "bf16", name: str | None = None, model: str = "smollm2") -> dict:
    scratch = out / "runs" / f"ab-{key}"
    scratch.mkdir(parents=True, exist_ok=True)
    train, heldout = vs.split_data(scratch, 500)
    rows = []
    for rep in range(repeats):
        for value in values:
            case = {"name": f"{key.split('.')[-1]}-{value}", "runner": "distft", "model": model, "strategy": "lora",
                    "layout": layout, "precision": precision, "repeat": rep, "steps": steps, "batch": 8,
                    "max_length": 256, "seed": 0, "threads": 2, "train": str(train), "heldout": str(heldout),
                    "out": str(scratch), "overrides": [] if key == "malloc" else [f"{key}={value}"]}
            r = vs.one_in_a_fresh_process(case, value if key == "malloc" else malloc)
            if r is None:
                raise SystemExit(f"the run with {key}={value} failed (output above)")
            rows.append({"value": value, "repeat": rep, "tokens_per_second": r["tokens_per_second"],
                         "heldout_loss": r.get("heldout_loss"), "peak_rss_mb": r.get("peak_rss_mb"),
                         "train_loss": r.get("train_loss")})
            print(rows[-1], flush=True)
    mean = {v: statistics.mean(r["tokens_per_second"] for r in rows if r["value"] == v) for v in values}
    result = {"machine": vs.machine_line(2), "model": model, "key": key, "layout": layout, "precision": precision, "malloc": "each value" if key == "malloc" else malloc,
              "steps": steps, "command": "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
              "mean_tokens_per_second": mean, "rows": rows}
    (out / (name or f"ab-{key}.json")).write_text(json.dumps(result, indent=2))
    print(f"{key}: " + ", ".join(f"{v} {t:.1f} tokens/s" for v, t in mean.items()), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("key")
    ap.add_argument("values", nargs="+")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layout", choices=["packed", "padded"], default="packed")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--model", choices=list(vs.MODELS), default="smollm2", help="tiny: a smoke run")
    ap.add_argument("--malloc", default="system", help="system, tcmalloc, jemalloc (launch/malloc.sh)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if len(args.values) < 2:
        ap.error("give at least two values to compare")
    run_ab(args.key, args.values, args.repeats, args.steps, Path(args.out), args.malloc, args.layout, args.precision,
           model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())

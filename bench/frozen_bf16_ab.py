"""A/B: LoRA packed bf16 on SmolLM2 with the frozen Linear weights held in bf16
(trainer.frozen_in_bf16=true, the default) and without, alternating, each case in a fresh
process (bench/vs_hf_trainer.py's runner). Needs a CPU (or GPU) with native bf16.

    python bench/frozen_bf16_ab.py [--repeats 2 --steps 6]
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import vs_hf_trainer as vs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    scratch = out / "runs" / "frozen_bf16_ab"
    scratch.mkdir(parents=True, exist_ok=True)
    train, heldout = vs.split_data(scratch, 500)
    rows = []
    for rep in range(args.repeats):
        for frozen in ("true", "false"):
            case = {"name": f"frozen-bf16-{frozen}-{rep}", "runner": "distft", "model": "smollm2", "strategy": "lora",
                    "layout": "packed", "precision": "bf16", "repeat": rep, "steps": args.steps, "batch": 8,
                    "max_length": 256, "seed": 0, "threads": 2, "train": str(train), "heldout": str(heldout),
                    "out": str(scratch), "overrides": [f"trainer.frozen_in_bf16={frozen}"]}
            r = vs.one_in_a_fresh_process(case)
            if r is None:
                return 1
            rows.append({"frozen_in_bf16": frozen == "true", "repeat": rep, "tokens_per_second": r["tokens_per_second"],
                         "heldout_loss": r.get("heldout_loss"), "peak_rss_mb": r.get("peak_rss_mb")})
            print(rows[-1], flush=True)
    result = {"machine": vs.machine_line(2), "command": "python bench/frozen_bf16_ab.py " + " ".join(sys.argv[1:]),
              "rows": rows}
    (out / "frozen_bf16_ab.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

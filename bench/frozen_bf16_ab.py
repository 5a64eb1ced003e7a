"""A/B: LoRA packed bf16 on SmolLM2 with the frozen Linear weights held in bf16
(trainer.frozen_in_bf16=true, the default) and without, alternating, each case in a fresh
process (bench/ab.py). Needs a CPU (or GPU) with native bf16.

    python bench/frozen_bf16_ab.py [--repeats 2 --steps 6]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ab import run_ab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    run_ab("trainer.frozen_in_bf16", ["true", "false"], args.repeats, args.steps, Path(args.out),
           name="frozen_bf16_ab.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

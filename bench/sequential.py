"""Forgetting in sequential fine-tuning, and what each guard gives back (MiniLM).

    python bench/sequential.py                         # LoRA and full: plain, l2sp, ewc, replay; then 3 stages
    python bench/sequential.py --strategies lora       # one strategy's table
    python bench/sequential.py --settings plain replay # some settings (rows of other settings are kept)
    python bench/sequential.py --three                 # only the 3-stage runs (SST-2, AG News, TREC)
    python bench/sequential.py --quick                 # 96 examples a stage: a smoke run (asserts nothing)

Each setting runs `distft-train experiment=sequential_sst2_agnews ... regularizer=...`, one
epoch per stage, final weights (no selection on validation). Stage 1 (SST-2) is one run
shared by every setting of a strategy (the guards act from stage 2 on: stage 1 runs
under regularizer=ewc, which trains exactly as plain and leaves the Fisher estimate); each
setting's stage 2 starts from it. Writes bench/results/sequential.{json,md} and one
forgetting-matrix PNG per run (bench/results/sequential-*.png).
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
SHARED = ROOT.parent / "shared" / "data"

COMMON = ["model=minilm", "task=classification", "trainer.max_steps=-1", "trainer.epochs=1",
          "trainer.warmup_ratio=0.06", "trainer.save_every=0", "trainer.export_best=false", "trainer.eval_every=0",
          "data.max_length=96", "trainer.batch_size=32", "logger=csv", "trainer.precision=fp32",
          "logger.progress_bar=false"]
STRATEGIES = {
    "lora": ["strategy=lora", "strategy.r=16", "strategy.alpha=32", "strategy.dropout=0.0",
             "strategy.target_modules=[query,key,value,dense]", "trainer.lr=1e-3"],
    "full": ["strategy=full", "trainer.lr=5e-5"],
}
# Strengths: a penalty matters once its gradient (strength x F x drift) is comparable to the
# loss gradient per weight. LoRA's first-tried strengths are kept; full fine-tuning's were
# scaled from them before any full run, not searched on the validation sets: its weights
# drift about 12x less (lr 5e-5 vs 1e-3), its per-weight loss gradient is about 4x smaller
# and its Fisher per weight about 12x smaller (similar per-example gradient norms over 34x
# more weights), which asks for about 3x LoRA's L2-SP strength and 20-30x its EWC
# strength. Each row's command shows them.
SETTINGS = {
    "plain": {"lora": [], "full": []},
    "l2sp": {"lora": ["regularizer=l2sp", "regularizer.strength=0.1"],
             "full": ["regularizer=l2sp", "regularizer.strength=0.3"]},
    "ewc": {"lora": ["regularizer=ewc", "regularizer.strength=5000"],
            "full": ["regularizer=ewc", "regularizer.strength=1e5"]},
    "replay": {"lora": ["regularizer=replay", "regularizer.size=1000"],
               "full": ["regularizer=replay", "regularizer.size=1000"]},
}
THREE = ("ewc", "replay")  # the 3-stage runs (LoRA)


def _relative(arg: str) -> str:
    return arg.replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")


def run(cmd_args, quick: bool) -> float:
    cmd = [sys.executable, "-m", "distft.train", *cmd_args]
    if quick:
        cmd += ["data.max_train_examples=96", "data.max_validation_examples=48"]
    print("$ distft-train " + " ".join(_relative(a) for a in cmd[3:]), flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})
    return time.time() - started


def sequential(strategy: str, setting: str, experiment: str, shared_first: Path, out: Path, quick: bool,
               reuse: bool) -> dict:
    """One sequential run of `setting`, its first stage copied from `shared_first`."""
    run_dir = out / "runs" / f"sequential-{experiment}-{strategy}-{setting}{'-quick' if quick else ''}"
    args = [f"experiment={experiment}", *COMMON, *STRATEGIES[strategy], *SETTINGS[setting][strategy],
            f"run_dir={run_dir}"]
    wall_file = run_dir / "bench_wall_s.json"
    if reuse and wall_file.is_file() and json.loads(wall_file.read_text())["args"] == args:
        wall = json.loads(wall_file.read_text())["wall_s"]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        first = run_dir / "stages" / "1-sst2"
        first.parent.mkdir(parents=True)
        shutil.copytree(shared_first / "stages" / "1-sst2", first)
        wall = run(args, quick)
        wall_file.write_text(json.dumps({"args": args, "wall_s": wall}))
    result = json.loads((run_dir / "forgetting.json").read_text())
    png = out / f"sequential-{experiment.replace('sequential_', '')}-{strategy}-{setting}{'-quick' if quick else ''}.png"
    shutil.copy(run_dir / "forgetting.png", png)
    return {"strategy": strategy, "setting": setting, "experiment": experiment, "matrix": result["matrix"],
            "tasks": result["tasks"], "forgetting": result["forgetting"], "wall_s": None if wall is None else round(wall, 1),
            "png": png.name, "command": "distft-train " + " ".join(_relative(a) for a in args[:-1])}


def first_stage(strategy: str, out: Path, quick: bool, keep: bool) -> Path:
    """Stage 1 alone (an experiment of its first stage, SST-2 in both experiments), under
    regularizer=ewc: it trains as plain does and leaves its Fisher for the EWC setting."""
    run_dir = out / "runs" / f"sequential-{strategy}-stage1{'-quick' if quick else ''}"
    if keep and (run_dir / "stages" / "1-sst2" / "summary.json").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    stage = "[{name: sst2, data: {train: ../shared/data/sst2/train.jsonl, validation: ../shared/data/sst2/validation.jsonl}}]"
    run(["experiment=sequential", f"experiment.stages={stage}", *COMMON, *STRATEGIES[strategy], "regularizer=ewc",
         f"run_dir={run_dir}"], quick)
    return run_dir


def table(rows, strategies) -> list:
    lines = []
    for strategy in strategies:
        two = [r for r in rows if r["strategy"] == strategy and len(r["tasks"]) == 2]
        if not two:
            continue
        plain = next((r for r in two if r["setting"] == "plain"), None)
        lines += [f"### {strategy}: SST-2, then AG News (accuracy, final weights)", "",
                  "| setting | SST-2 after stage 1 | SST-2 after stage 2 | SST-2 drop (points) | drop vs plain | "
                  "AG News | AG News vs plain | wall s |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(two, key=lambda r: list(SETTINGS).index(r["setting"])):
            (s1, _), (s2, ag) = r["matrix"]
            drop = 100 * (s1 - s2)
            vs = "" if plain is None or r is plain else \
                f"{100 * (1 - drop / (100 * (plain['matrix'][0][0] - plain['matrix'][1][0]))):.0f}% less"
            ag_vs = "" if plain is None or r is plain else f"{100 * (ag - plain['matrix'][1][1]):+.2f}"
            lines.append(f"| {r['setting']} | {s1:.4f} | {s2:.4f} | {drop:.2f} | {vs} | {ag:.4f} | {ag_vs} | "
                         f"{r['wall_s'] if r['wall_s'] is not None else '-'} |")
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in two] + [""]
    three = [r for r in rows if len(r["tasks"]) == 3]
    for r in three:
        lines += [f"### {r['strategy']} + {r['setting']}: SST-2, AG News, TREC", "",
                  "| after stage | " + " | ".join(r["tasks"]) + " |", "|---" * (len(r["tasks"]) + 1) + "|"]
        for stage, row in zip(r["tasks"], r["matrix"]):
            lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row) + " |")
        lines += ["", "Forgetting (best minus final, points): " +
                  ", ".join(f"{k} {100 * v:.2f}" for k, v in r["forgetting"].items()), "",
                  f"    {r['command']}", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="*", choices=list(STRATEGIES), default=list(STRATEGIES))
    ap.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--three", action="store_true", help="only the 3-stage runs")
    ap.add_argument("--no-three", action="store_true", help="skip the 3-stage runs")
    ap.add_argument("--three-settings", nargs="*", choices=list(THREE), default=list(THREE),
                    help="the settings of the 3-stage runs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs of the same commands (an interrupted benchmark goes on)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not (SHARED / "trec").is_dir():
        print("this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sequential-quick" if args.quick else "sequential"
    path = out / f"{stem}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows = [r for r in saved.get("rows", []) if isinstance(r, dict)] if isinstance(saved, dict) else []

    def keep(row):
        rows[:] = [r for r in rows if (r["strategy"], r["setting"], r["experiment"]) !=
                   (row["strategy"], row["setting"], row["experiment"])] + [row]
        write(rows, out, stem, args)

    if not args.three:
        for strategy in args.strategies:
            first = first_stage(strategy, out, args.quick, args.reuse)
            for setting in args.settings:
                keep(sequential(strategy, setting, "sequential_sst2_agnews", first, out, args.quick, args.reuse))
    if args.three or not args.no_three:
        first = first_stage("lora", out, args.quick, args.reuse or "lora" in args.strategies and not args.three)
        for setting in args.three_settings:
            keep(sequential("lora", setting, "sequential_sst2_agnews_trec", first, out, args.quick, args.reuse))
    print((out / f"{stem}.md").read_text())
    return 0


def write(rows, out: Path, stem: str, args) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine}. Command: `python bench/sequential.py {' '.join(sys.argv[1:])}` (rows of earlier "
             "invocations kept).", "",
             "MiniLM, one epoch per stage, batch 32, final weights; stage 1 shared by every setting of a strategy "
             "(the guards act from stage 2 on). Drop = SST-2 accuracy after stage 1 minus after stage 2; "
             "\"drop vs plain\" = how much of plain sequential's drop the guard removes.", ""]
    lines += table(rows, list(STRATEGIES))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

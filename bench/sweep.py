"""Hyperparameter search on SST-2 with MiniLM + LoRA: grid against TPE, and what a pruner saves.

    python bench/sweep.py             # every row below (about an hour on 2 CPU cores)
    python bench/sweep.py --rows tpe  # some rows (rows of earlier invocations are kept)
    python bench/sweep.py --quick     # the tiny model on generated data, 2 trials a row: a smoke run

Every row is `distft-sweep sweep=lora_sst2` (conf/sweep/lora_sst2.yaml: 2,000 training
examples, the 872 validation, max length 64, one epoch at batch 32, an eval every 16 steps)
with the same budget of 16 trials:
- default: no search, the config's own values (lr 3e-3, r 8, alpha 16, no weight decay
  or warmup beyond the config's), one distft-train run;
- grid: lr {3e-4, 1e-3, 3e-3, 1e-2} x r {4, 8, 16, 32};
- tpe: TPE over lr, r, alpha, weight decay and warmup;
- tpe_pruned: the same with the median pruner (4 startup trials, prunes from a trial's
  first eval on), whose training steps are compared with tpe's.

Writes bench/results/sweep.{json,md} and each row's optimization history as
bench/results/sweep-<row>.png; the studies stay in bench/results/runs/sweep-<row>/.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import run_rows  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2"

GRID_ONLY = ["sweep.space.strategy.alpha=null", "sweep.space.trainer.weight_decay=null",
             "sweep.space.trainer.warmup_ratio=null"]
ROWS = {
    "grid": ["sweep.sampler=grid", *GRID_ONLY],
    "tpe": ["sweep.sampler=tpe"],
    "tpe_pruned": ["sweep.sampler=tpe", "sweep.pruner=median", "sweep.pruner_startup_trials=4",
                   "sweep.pruner_warmup_evals=1"],
}
ORDER = ["default", *ROWS]
# --quick: the tiny model on generated data (seconds per trial).
QUICK = ["sweep=tiny_lr", "sweep.n_trials=2", "trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=0",
         "data.num_train=96", "model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
         "model.from_config.num_hidden_layers=2", "model.from_config.num_attention_heads=2",
         "model.from_config.num_key_value_heads=1", "trainer.precision=fp32", "logger.progress_bar=false"]
QUICK_ROWS = {"grid": ["sweep.sampler=grid", "sweep.space.trainer.warmup_ratio=null",
                       "sweep.space.trainer.lr={type:float,low:1e-3,high:1e-2,log:true,values:[1e-3,1e-2]}"], "tpe": ["sweep.sampler=tpe"],
              "tpe_pruned": ["sweep.sampler=tpe", "sweep.pruner=median", "sweep.pruner_startup_trials=1"]}


def base(quick: bool) -> list:
    if quick:
        return list(QUICK)
    return ["sweep=lora_sst2", "data=files", "data.text_field=text", f"data.train={SST2 / 'train.jsonl'}",
            f"data.validation={SST2 / 'validation.jsonl'}"]


def show(args) -> str:
    return " ".join(str(a).replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "") for a in args)


def sweep_row(name: str, out: Path, quick: bool) -> dict:
    folder = out / "runs" / f"sweep-{name}{'-quick' if quick else ''}"
    shutil.rmtree(folder, ignore_errors=True)
    args = [*base(quick), *(QUICK_ROWS if quick else ROWS)[name], f"sweep.dir={folder}"]
    print("$ distft-sweep " + show(args), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "distft.sweep", *args], cwd=ROOT, check=True,
                   env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.time() - started
    with open(folder / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    keys = [k for k in trials[0] if k not in ("number", "state", "objective", "steps", "seconds", "run_dir", "retry_of")]
    complete = [t for t in trials if t["state"] == "complete"]
    pick = min if quick else max  # quick: a loss; else an accuracy
    best = pick(complete, key=lambda t: float(t["objective"]))
    if (folder / "history.png").exists():
        shutil.copy(folder / "history.png", out / f"sweep-{name}{'-quick' if quick else ''}.png")
    return {"row": name, "best": float(best["objective"]), "best_trial": int(best["number"]),
            "best_params": {k: best[k] for k in keys}, "trials": len(trials),
            "states": {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")},
            "steps": sum(int(t["steps"] or 0) for t in trials), "wall_s": round(wall, 1),
            "command": "distft-sweep " + show(args[:-1])}


def default_row(out: Path, quick: bool) -> dict:
    run_dir = out / "runs" / f"sweep-default{'-quick' if quick else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*base(quick), f"run_dir={run_dir}"]
    print("$ distft-train " + show(args), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "distft.train", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "WANDB_MODE": "offline"})
    s = json.loads((run_dir / "summary.json").read_text())
    return {"row": "default", "best": s["objective"], "trials": 1, "steps": s["steps"],
            "wall_s": round(time.time() - started, 1), "command": "distft-train " + show(args[:-1])}


def report(machine: str, rows: list, quick: bool) -> str:
    what = ("the tiny model on generated data (objective: validation loss, lower is better)" if quick else
            "MiniLM + LoRA, SST-2 (2,000 train / 872 validation), max length 64, one epoch at batch 32; "
            "objective: validation accuracy of the final weights")
    lines = [f"Machine: {machine}. Command: `python bench/sweep.py{' --quick' if quick else ''}` "
             "(rows of earlier invocations kept).", "",
             f"{what}. Budget: {max(r['trials'] for r in rows)} trials a search.", "",
             "| row | best objective | best trial's parameters | trials (complete / pruned / failed) | "
             "training steps | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.get("best_params", {}).items())
        states = r.get("states")
        counts = f"{r['trials']} ({states['complete']} / {states['pruned']} / {states['fail']})" if states else "1"
        lines.append(f"| {r['row']} | {r['best']:.4f} | {params or 'the config'} | {counts} | {r['steps']} | "
                     f"{r['wall_s']} |")
    by = {r["row"]: r for r in rows}
    if {"tpe", "tpe_pruned"} <= set(by):
        lines += ["", f"Pruned against unpruned TPE: {by['tpe_pruned']['steps'] / by['tpe']['steps']:.2f}x the training "
                      f"steps, best {by['tpe_pruned']['best'] - by['tpe']['best']:+.4f}."]
    if {"grid", "tpe"} <= set(by):
        lines += [f"TPE's best minus the grid's: {by['tpe']['best'] - by['grid']['best']:+.4f}."]
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", choices=ORDER, default=ORDER)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not args.quick and not SST2.is_dir():
        print("this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    out = Path(args.out)
    run_rows(out, "sweep-quick" if args.quick else "sweep", ORDER, args.rows,
             lambda name: default_row(out, args.quick) if name == "default" else sweep_row(name, out, args.quick),
             lambda machine, rows: report(machine, rows, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())

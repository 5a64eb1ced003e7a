"""Differentially private fine-tuning (privacy=dp, Opacus) on real models and data.

    python bench/privacy.py                  # all three parts below (about 3 hours on 2 CPU cores)
    python bench/privacy.py --only sst2      # MiniLM + SST-2: LoRA at epsilon 8, 3, 1 (group-wise and
                                             # one-bound clipping); full at 8
    python bench/privacy.py --only smollm2   # SmolLM2-135M + LoRA on Alpaca at epsilon 8
    python bench/privacy.py --only cost      # LoRA step time and peak memory, DP vs not
    python bench/privacy.py --quick          # small shapes, a smoke run (asserts no number)
    python bench/privacy.py --runs lora-eps8 full-eps8   # some of the SST-2 runs
    python bench/privacy.py --report         # privacy.md again from privacy.json

Every accuracy is of the final weights (no selection on the validation set). The
non-private numbers beside the SST-2 ones come from bench/results/sst2_strategies.json
(the same data, model and LoRA shape). Writes bench/results/privacy.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SST2 = SHARED / "sst2"
ALPACA = SHARED / "alpaca" / "train.jsonl"

SST2_COMMON = [
    "model=minilm", "task=classification", "data=files", f"data.train={SST2 / 'train.jsonl'}",
    f"data.validation={SST2 / 'validation.jsonl'}", "data.max_length=64", "trainer.max_steps=-1",
    "trainer.eval_every=0", "trainer.save_every=0", "logger=csv", "trainer.precision=fp32",
    "logger.progress_bar=false",
]
LORA = ["strategy=lora", "strategy.r=16", "strategy.alpha=32", "strategy.target_modules=[query,key,value,dense]"]
# How the recipe was found (epsilon 8, delta 1e-5, final weights, 872 validation; every run
# deterministic: the same command gives the same accuracy):
# - A fresh head's gradient took the whole clip (MiniLM features of norm 5: per-example
#   norm 3.6 against a clip of 1), and clipped runs stayed at 0.51. task.head=pooled
#   task.normalize=true (unit-length mean-pooled features, all-MiniLM's own Normalize)
#   brings it near 1: LoRA r8 on query/value, 1024 a step, 10 epochs (80 steps, noise
#   1.011), lr 5e-3: 0.7729; with trainer.head_lr=2e-2: 0.7764. Their training loss falls to
#   0.45 by step 15 and then climbs (0.8-0.9): the accuracy stays at 0.77-0.78 from then on.
# - The same over 3 epochs (24 steps, noise 0.770): 0.7752. Without noise (clip only) it
#   is unstable at those rates (loss 0.47 -> 0.73; 0.7706): in noise Adam divides by the
#   noise's scale and steps more gently, so the rates were too high, not the noise too large.
# - What limits it is the head: with LoRA frozen (trainer.lr=1e-8) the head alone reaches
#   0.6640 at head_lr 2e-2 (loss 0.54) but 0.7924 at 1e-1 (loss 0.39-0.43); with LoRA at
#   5e-3 beside that head the loss diverges after step 9 (0.7775).
# - This recipe: head_lr 1e-1, LoRA at 1e-3 or 2e-3: 0.7936 (both); clip 0.3: 0.7947 (an
#   early loss spike to 1.24 from clipping every example, then recovery); clip 0.1: 0.7110;
#   clip 0.3 with head_lr 5e-2 and LoRA 2e-3: 0.7408; 6 epochs at LoRA 2e-3: loss climbing
#   again after step 13 (stopped). LoRA adds about 0.1 point to the DP head here: its noisy
#   steps do as much harm as good, and the 0.80 target stays 0.6 point away. Rank 8 on
#   every query/key/value/dense layer with the old rates (lr 5e-3, head 2e-2, 10 epochs):
#   loss 0.94 at step 22 (stopped); at this recipe's rates: 0.7936.
# - Per-example gradient norms at the start (48 SST-2 examples, this head): LoRA 0.11, the
#   head 1.0, so the clip is the head's. alpha 128 (LoRA's share near the head's) at LoRA
#   1.25e-4 or 2.5e-4: the loss climbs to 1.4 (0.5619, 0.6858); with the head at 2e-2, or
#   alpha 64 with LoRA 2.5e-4 and the head at 5e-2: climbing too (stopped).
# - Larger logical batches at the same epsilon (less noise per step, fewer steps): 2048 a
#   step over 6 epochs (23 steps, noise 1.074): 0.7947; 4000 over 6 (12 steps, noise 1.283):
#   0.7787. Without noise (clip only) this recipe reaches 0.7878 (the loss climbs to 0.6-0.7
#   after step 13): noise is not what holds it below 0.80, these 24 steps are. Head first,
#   adapters after (LP-FT: the adapters' rate 0 for 12 steps, then LoRA 2e-3 with its own
#   warm-up and cosine, through a scheduler._target_ of per-group factors): 0.7924, the
#   head-alone figure.
# - Group-wise clipping (privacy.head_max_grad_norm): the head's part of each example's
#   gradient clipped apart, both bounds 0.1, so the adapters' 0.1 is no longer a tenth of
#   one bound of 1 and the noise on them falls 7x (noise scale 0.141). The recipe above
#   with it, seeds 0 / 1 / 2 / 3 (`seed=N`): 0.7982 / 0.7913 / 0.7913 / 0.7936 (mean
#   0.7936), against 0.7936 / 0.7798 with one bound of 1 (seeds 0 / 1); seeds move either
#   recipe by more than half a point.
#   The adapters now move: the loss jumps from 0.63 to 1.3 after warm-up (steps 5-10) and
#   recovers to 0.42; at LoRA 5e-4 the same jump (0.7890); with 10 warm-up steps a later
#   one (0.7982); a head bound of 0.3 at 256 a step over 3 epochs (94 steps, head 3e-2,
#   LoRA 5e-4, warm-up 10): 0.7878; the head at 3e-2 at 1024 a step: loss climbing at step
#   8 (stopped). One bound of 0.15 over the gradient with the head's part scaled by 0.1 (the
#   head not clipped, Adam blind to the scale): loss climbing to 1.48 by step 14 (stopped).
# - More of the group-clipped recipe's knobs, each alone (seed 0): 6 epochs (48 steps, noise
#   0.891, warm-up 10): 0.7913, the loss still 0.64 at step 45; the head's bound at 0.05
#   (noise scale 0.112: more of it on the head, less on the adapters): 0.7913; rank 8 on
#   every query/key/value/dense layer: 0.7947.
# - At epsilon 3 and 1 group-wise clipping gives 0.7878 and 0.7007, against 0.7890 and
#   0.7775 with one bound (the lora-flat rows): with 1.3x and 2.7x the noise, the adapters'
#   larger share of the step is mostly noise.
# - LoRA-FA / FFA-LoRA (strategy.train_a=false: each A frozen at its init, 37,634 trained
#   parameters instead of 74,498, so half the noisy coordinates), `seed=0`: 0.7947 at LoRA
#   1e-3 (final eval loss 0.557) and at 3e-3 (0.631); the recipe as is at `seed=0`: 0.7947
#   (loss 0.564); at the default seed 42 (the rows' own, whose recipe gives 0.7982, again when
#   rerun in that session) LoRA-FA at 1e-3: 0.7924. The head decides.
# - The head from label texts (task.label_texts=["This is a negative review.","This is a
#   positive review."], a zero-shot classifier learned from no example: 0.7064 before any
#   step, eval loss 0.576), the recipe otherwise as is (seed 42): 0.7936, the same loss jump
#   after warm-up (0.58 -> 1.10 at step 8, then 0.45). With the head at 3e-2: 0.6342 (loss
#   climbing to 1.07 and staying near 0.8). The head frozen at that init and only the
#   adapters trained (task.train_head=false, one bound of 0.1 on them): 0.5344, the loss
#   climbing from 0.575 to 0.85: noisy adapter steps move the features away from the head;
#   the head's high rate is what follows them.
# - What is under the head: a non-private logistic regression on MiniLM's frozen pooled
#   features scores 0.803 (bench/results/features.md, 128 tokens); the DP head alone here
#   0.7924. Past 0.80 the adapters have to move the features, in 24 noisy steps.
# - Averaging the iterates (post-processing, no privacy cost; the recipe's 24 checkpoints
#   averaged offline with torch.optim.swa_utils' EMA, then evaluated): EMA decay 0.5: 0.7982
#   (eval loss 0.5640 against the final weights' 0.5649), 0.7: 0.7970, 0.8: 0.7901, 0.9:
#   0.7821 (loss 0.4890), from step 0, 8 or 12 alike; a plain mean of the last 4 / 8 / 12:
#   0.7982 / 0.7982 / 0.7913. Averaging lowers the loss, not the error: not kept.
# - A public warm start: LoRA + head trained without DP on the bundled Amazon sentences
#   (800, public; 0.7489 on SST-2 by itself), then the recipe from there (init_from): 0.7867,
#   eval loss 0.96 (the warm head is too confident for the noisy steps after it).
# - The recipe evaluated every 2 steps: at chance from step 2 to 8 (eval loss up to 1.33, one
#   class predicted), 0.71 at step 12, 0.79 from step 16, 0.7982 at 22-24. Adam beta1 0.5 /
#   0.7 (less momentum through that overshoot): 0.7901 / 0.7913. Features centred on a public
#   mean (the pooled, unit-length MiniLM features of the 800 bundled Amazon sentences, cosine
#   0.40 to each; subtracted, then renormalised; a scratch plugin): 0.7890, the same overshoot;
#   with the head at 3e-2 as well: 0.5206.
# - Dropout off everywhere (model.dropout=0.0 task.head_dropout=0.0 strategy.dropout=0.0, as
#   Li et al. 2021 do for DP fine-tuning): 0.7970. The group-clipped recipe at 2048 a step over
#   6 epochs (24 steps, noise 1.074: noise over batch 0.00052 against 0.00075): 0.7970. LoRA
#   rank 2 (alpha 4; 18,434 adapter weights, a quarter of the noisy coordinates): 0.7959.
# - Where the loss jump after warm-up comes from: the head. With LoRA frozen (trainer.lr=1e-8)
#   the head alone jumps the same (0.63 -> 1.25 at step 7; 0.7833); with Adam's beta1 at 0 or
#   0.5 for the head alone (its own param group, a scratch patch) the jump is smaller and over
#   by step 8, and the recipe gives 0.7936 / 0.7936. It comes from clipping: a head clipped at
#   0.1 (its examples' norms near 1) steps on each example's direction, not on the loss's
#   gradient. Without DP at the same 1024 a step and 24 steps (trainer.grad_accum=16) the loss
#   falls smoothly (0.69 -> 0.40) and the run gives 0.8131 at LoRA 1e-3 and at 5e-3 (2e-2:
#   0.7615): what 24 steps can reach here.
# - privacy.head_noise_share (each group's noise sized to its own bound, the same epsilon):
#   the head's bound at 1 (its gradients' own norm) and share 0.5 keep the adapters' noise
#   scale at 0.141 while the head follows the loss: no jump (0.69 -> 0.41 by step 9), and
#   0.7982 at the default seed, as the recipe; seeds 1 / 2: 0.7924 / 0.7947 (the recipe as is
#   0.7913 / 0.7913; a mean over the three of 0.7951 against 0.7936). With it, LoRA at 3e-3 /
#   5e-3: the loss climbs from step 10 (0.7557 / 0.7362); share 0.2 (adapters' noise 0.112):
#   0.7924, at LoRA 2e-3 0.7798, at 3e-3 0.7523; 6 epochs (48 steps): 0.7947, the loss
#   drifting up after step 25; a head bound of 0.3 with share 0.5: 0.7913. Fewer, less noisy
#   steps now that the head settles by step 9: 2 epochs (16 steps, noise 0.715): 0.7833, at
#   LoRA 2e-3 0.7764; 2048 a step over 3 epochs (12 steps, noise 0.892): 0.7867. Adam's eps as
#   a damper of the noisy coordinates (1e-4; 3e-4 at LoRA 3e-3; 1e-3 at 1e-2): 0.7695 /
#   0.6881 / 0.5149. Adapters on the last two layers' query/value only (24,576 adapter weights,
#   a third; `strategy.target_modules=[layer.4.attention.self.query,...]`): 0.7844, at LoRA
#   2e-3 0.7741. Once the head no longer overshoots, the adapters' noisy steps are what is
#   left: below LoRA 1e-3 they barely move, above it they undo the features.
# - SGD with momentum 0.9 in place of Adam (`optimizer._target_=torch.optim.SGD
#   ~optimizer.betas ~optimizer.eps +optimizer.momentum=0.9`; the rates where Adam, its second
#   moment all noise, steps alike: about lr x (1 - beta1) / noise std), with the head share:
#   LoRA 0.5 / head 5: 0.7936 (eval loss 0.464, the lowest yet); 1 / 10: 0.7821; 1 / 5:
#   0.7810; 0.5 / 8: 0.7867; 0.25 / 5: 0.7878; 0.5 / 5 over 6 epochs: 0.7729.
# - Where the adapters sit, with the head share (seed 42 unless named): the attention's
#   output (attention.output.dense): 0.7798; the feed-forward's up-projection
#   (intermediate.dense, 92,160 adapter weights): 0.8016, seeds 1 / 2 / 3: 0.8005 / 0.7856 /
#   0.8039 (mean 0.7979; query/value with the share at seeds 42 / 1 / 2 / 3: 0.7982 /
#   0.7924 / 0.7947 / 0.7924, mean 0.7944), at LoRA 2e-3 0.7890, rank 4 0.7924, without the
#   share (both bounds 0.1) 0.7936; the whole feed-forward (intermediate.dense and each
#   layer's output.dense, 184,320 adapter weights): 0.8050, seeds 1 / 2 / 3: 0.8016 /
#   0.7959 / 0.8028 (mean 0.8013), higher than query/value at every seed and a lower eval
#   loss (0.479-0.494 against 0.496); without the share (both bounds 0.1): 0.7878. The
#   recipe since: the lora rows below.
# Physical micro-batches of 64.
DP_HEAD = ["task.head=pooled", "task.normalize=true", "trainer.head_lr=1e-1"]
DP_LORA = ["strategy=lora", "strategy.r=8", "strategy.alpha=16", "strategy.target_modules=[query,value]", *DP_HEAD]
DP_SST2 = ["privacy=dp", "privacy.delta=1e-5", "privacy.max_grad_norm=1.0", "privacy.logical_batch_size=1024",
           "trainer.batch_size=64", "trainer.weight_decay=0.0", "trainer.epochs=3", "trainer.warmup_steps=5"]
# The recipe: adapters on the feed-forward layers (each layer's up-projection
# intermediate.dense and down-projection output.dense; `N.output.dense` so that the
# attention's output.dense is left out), the head's part clipped at its own norm (1) with
# half the noise budget (privacy.head_noise_share), the adapters at 0.1.
FFN = "strategy.target_modules=[intermediate.dense," + ",".join(f"{i}.output.dense" for i in range(6)) + "]"
DP_LORA_FFN = ["strategy=lora", "strategy.r=8", "strategy.alpha=16", FFN, *DP_HEAD]
HEAD_SHARE = ["privacy.max_grad_norm=0.1", "privacy.head_max_grad_norm=1.0", "privacy.head_noise_share=0.5"]
SST2_RUNS = {  # name -> (overrides, target accuracy or None)
    "lora-eps8": ([*DP_LORA_FFN, *DP_SST2, *HEAD_SHARE, "privacy.target_epsilon=8", "trainer.lr=1e-3"], 0.80),
    "lora-eps3": ([*DP_LORA_FFN, *DP_SST2, *HEAD_SHARE, "privacy.target_epsilon=3", "trainer.lr=1e-3"], None),
    "lora-eps1": ([*DP_LORA_FFN, *DP_SST2, *HEAD_SHARE, "privacy.target_epsilon=1", "trainer.lr=1e-3"], None),
    # The recipe before (adapters on query/value, both bounds 0.1, one noise scale): 0.7982 /
    # 0.7878 / 0.7007 at epsilon 8 / 3 / 1 (privacy.json of commit 1fb30d6), under these names.
    # One bound of 1 over head and adapters (the recipe before group-wise clipping). The
    # epsilon 8 and 3 rows were last run as lora-eps8 / lora-eps3 before the split (0.7936,
    # 0.7890: privacy.json of commit 35f930a, the same overrides), not yet under these names.
    "lora-flat-eps8": ([*DP_LORA, *DP_SST2, "privacy.target_epsilon=8", "trainer.lr=1e-3"], None),
    "lora-flat-eps3": ([*DP_LORA, *DP_SST2, "privacy.target_epsilon=3", "trainer.lr=1e-3"], None),
    "lora-flat-eps1": ([*DP_LORA, *DP_SST2, "privacy.target_epsilon=1", "trainer.lr=1e-3"], None),
    # Every weight trains (ghost clipping), the same normalised head at its own rate. Not a
    # recipe yet: the loss climbs from step 5 (0.63 -> 1.55; 0.5493), and at lr 1e-5 too (0.68
    # -> 0.85 by step 7, stopped). Not the clip's share: at the start the backbone's
    # per-example norm is 1.25 against the head's 1.0. Not the head's rate alone either: with
    # the head at 2e-2 and the backbone at 5e-5 the loss falls to 0.64 by step 6, then climbs
    # from step 12 to 0.79 (0.5115): noisy Adam steps on 22.7M weights move the features.
    # SGD with momentum 0.9 (head 0.5, backbone 0.05 or 0.005): one class throughout (0.5092),
    # the loss climbing to 1.2 alike at both backbone rates.
    "full-eps8": (["strategy=full", *DP_HEAD, *DP_SST2, "privacy.target_epsilon=8", "trainer.lr=1e-4"], None),
}

SMOL_COMMON = [
    "model=smollm2", "task=instruction", "strategy=lora", "strategy.r=16", "strategy.alpha=32",
    "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]", "strategy.dropout=0.0", "data=files",
    f"data.train={ALPACA}", "data.validation_split=0.05", "data.max_validation_examples=64", "data.drop_empty=true",
    "data.max_length=192", "trainer.batch_size=8", "trainer.eval_batch_size=8", "trainer.eval_before_training=true",
    "trainer.save_every=0", "logger=csv", "trainer.precision=fp32", "logger.progress_bar=false",
    "scheduler=constant", "trainer.warmup_steps=0", "trainer.weight_decay=0.0",
]
SMOL_RUNS = {
    "non-private": ["trainer.grad_accum=8", "trainer.lr=5e-4"],
    # The non-private recipe with DP-SGD at the same rate (an estimate, kept once run): with
    # about 1,900 examples, 64 a step, the noise on a coordinate of the mean gradient is near
    # 0.01 (noise 0.53 over 64) against at most 7e-4 of clipped signal (1 over the square
    # root of 1.8M adapter weights), and Adam turns a higher rate into a larger random walk
    # of the adapters. Measured: held-out loss 1.9415 -> 1.8872 at epsilon 7.99 (30 steps),
    # against 1.7377 without DP: about a quarter of the non-private gain. A step takes 45-60 s
    # here (fp32, 2 cores), a run about 30 minutes. Other rates untried.
    "dp-eps8": ["privacy=dp", "privacy.target_epsilon=8", "privacy.delta=1e-5", "privacy.logical_batch_size=64",
                "trainer.lr=5e-4"],
}


def _relative(arg: str) -> str:
    return arg.replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")


def train(name: str, overrides, out: Path) -> dict:
    run_dir = out / "runs" / f"privacy-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "distft.train", *overrides, f"run_dir={run_dir}", "resume=never"]
    shown = "distft-train " + " ".join(shlex.quote(_relative(a)) for a in cmd[3:])
    print("$", shown, flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "WANDB_MODE": "offline"})
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"command": shown, "wall_s": round(time.time() - started, 1), "summary": summary, "events": events}


def part_sst2(out: Path, quick: bool, runs=None) -> dict:
    baseline = {}
    path = ROOT / "bench" / "results" / "sst2_strategies.json"
    if path.exists():
        for row in json.loads(path.read_text()):
            baseline[row["strategy"]] = row["accuracy"]
    rows = []
    for name, (overrides, target) in SST2_RUNS.items():
        if (quick and name != "lora-eps8") or (runs and name not in runs):
            continue
        extra = ["data.max_train_examples=600", "data.max_validation_examples=64", "trainer.epochs=1",
                 "privacy.logical_batch_size=128"] if quick else []
        r = train(f"sst2-{name}", [*SST2_COMMON, *overrides, *extra], out)
        s = r["summary"]
        rows.append({"run": name, "accuracy": s["eval/accuracy"], "target": target,
                     "non_private_accuracy": baseline.get(name.split("-")[0]),
                     "epsilon": s["privacy/epsilon"], "delta": s["privacy/delta"],
                     "noise_multiplier": s["privacy/noise_multiplier"], "steps": s["steps"],
                     "trainable_params": s["trainable_params"], "wall_s": r["wall_s"], "command": r["command"]})
        print(f"{name}: accuracy {s['eval/accuracy']:.4f} at epsilon {s['privacy/epsilon']:.2f}", flush=True)
    return {"rows": rows}


def part_smollm2(out: Path, quick: bool) -> dict:
    rows = []
    for name, overrides in SMOL_RUNS.items():
        extra = ["trainer.max_steps=2", "data.max_validation_examples=8"] if quick else ["trainer.epochs=1"]
        r = train(f"smollm2-{name}", [*SMOL_COMMON, *overrides, *extra], out)
        s = r["summary"]
        evals = [(e["step"], e["eval/loss"]) for e in r["events"] if "eval/loss" in e]
        rows.append({"run": name, "untrained_loss": evals[0][1], "held_out_loss": s["eval/loss"], "steps": s["steps"],
                     "epsilon": s.get("privacy/epsilon"), "noise_multiplier": s.get("privacy/noise_multiplier"),
                     "wall_s": r["wall_s"], "command": r["command"]})
        print(f"{name}: held-out loss {evals[0][1]:.4f} -> {s['eval/loss']:.4f}", flush=True)
    return {"rows": rows}


def part_cost(out: Path, quick: bool) -> dict:
    """The same physical batch (32 examples of SST-2, LoRA): seconds per step and peak
    memory without and with DP. Under DP the logical batch is the physical one, so a step
    is one forward and backward over about 32 examples in both runs."""
    steps = 6 if quick else 40
    common = [*SST2_COMMON, *LORA, "trainer.batch_size=32", f"trainer.max_steps={steps}", "logger.log_every=1",
              "trainer.warmup_steps=0",
              "trainer.lr=1e-3", "data.max_validation_examples=64"]
    result = {}
    for name, extra in (("non-private", []), ("dp", ["privacy=dp", "privacy.noise_multiplier=1.0",
                                                     "privacy.target_epsilon=null"])):
        r = train(f"cost-{name}", [*common, *extra], out)
        timed = [e for e in r["events"] if "step_seconds" in e][5:]  # after the first steps' warm-up
        result[name] = {"step_s": statistics.median(e["step_seconds"] for e in timed),
                        "s_per_example": sum(e["step_seconds"] for e in timed) / max(1, sum(e["rows"] for e in timed)),
                        "peak_mb": max(r["summary"]["peak_memory_mb_per_process"]), "command": r["command"]}
    result["step_time_ratio"] = result["dp"]["step_s"] / result["non-private"]["step_s"]
    result["per_example_time_ratio"] = result["dp"]["s_per_example"] / result["non-private"]["s_per_example"]
    result["peak_memory_ratio"] = result["dp"]["peak_mb"] / result["non-private"]["peak_mb"]
    print(f"cost: step time x{result['step_time_ratio']:.2f}, per example x{result['per_example_time_ratio']:.2f}, "
          f"peak memory x{result['peak_memory_ratio']:.2f}", flush=True)
    return result


def _clip(command: str) -> str:
    """A row's clipping bounds, read from its command: `1` (one bound), `0.1, head 0.1`,
    `0.1, head 1 (noise share 0.5)`."""
    found = dict(re.findall(r"privacy\.(max_grad_norm|head_max_grad_norm|head_noise_share)=(\S+)", command))
    short = lambda v: v.rstrip("0").rstrip(".") if "." in v else v  # noqa: E731
    bound = short(found.get("max_grad_norm", "1.0"))
    if "head_max_grad_norm" not in found:
        return bound
    share = f" (noise share {found['head_noise_share']})" if "head_noise_share" in found else ""
    return f"{bound}, head {short(found['head_max_grad_norm'])}{share}"


def _adapters(command: str) -> str:
    """Where a row's adapters sit, read from its command: `query,value`, `feed-forward`, `-`."""
    found = re.search(r"strategy\.target_modules=\[([^]]*)\]", command)
    if "strategy=lora" not in command or not found:
        return "-"
    return "feed-forward" if "intermediate.dense" in found.group(1) else found.group(1)


def report(results: dict, out: Path, machine: str, stem: str) -> None:
    lines = [f"Machine: {machine}. Written by `python bench/privacy.py {' '.join(sys.argv[1:])}`; each row's own "
             "command is listed under its table.", ""]
    if "sst2" in results:
        lines += ["## MiniLM + SST-2 (8,000 train, 872 validation), DP-SGD, delta 1e-5", "",
                  "| run | accuracy | non-private | target | met | epsilon | adapters | clip | noise | steps | trainable "
                  "| wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["sst2"]["rows"]:
            np_acc = f"{r['non_private_accuracy']:.4f}" if r["non_private_accuracy"] is not None else "-"
            target = f"{r['target']}" if r["target"] else "-"
            met = "-" if not r["target"] else ("yes" if r["accuracy"] >= r["target"] else "**no**")
            lines.append(f"| {r['run']} | {r['accuracy']:.4f} | {np_acc} | {target} | {met} | {r['epsilon']:.2f} | "
                         f"{_adapters(r['command'])} | {_clip(r['command'])} | {r['noise_multiplier']:.3f} | "
                         f"{r['steps']} | {r['trainable_params']:,} | {r['wall_s']} |")
        lines += ["", "Non-private accuracies: bench/results/sst2_strategies.json. Commands:", ""]
        lines += [f"    {r['command']}" for r in results["sst2"]["rows"]] + [""]
    if "smollm2" in results:
        lines += ["## SmolLM2-135M-Instruct + LoRA, Alpaca subset (held-out loss)", "",
                  "| run | untrained | after | epsilon | steps | wall s |", "|---|---|---|---|---|---|"]
        for r in results["smollm2"]["rows"]:
            eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
            lines.append(f"| {r['run']} | {r['untrained_loss']:.4f} | {r['held_out_loss']:.4f} | {eps} | "
                         f"{r['steps']} | {r['wall_s']} |")
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results["smollm2"]["rows"]] + [""]
    if "cost" in results:
        c = results["cost"]
        lines += ["## Cost at the same physical batch (LoRA, SST-2, 32 examples a step)", "",
                  "| | median step s | peak memory MB |", "|---|---|---|",
                  f"| non-private | {c['non-private']['step_s']:.3f} | {c['non-private']['peak_mb']:.0f} |",
                  f"| DP-SGD | {c['dp']['step_s']:.3f} | {c['dp']['peak_mb']:.0f} |", "",
                  f"DP / non-private: step time x{c['step_time_ratio']:.2f} (target at most 1.5), per example "
                  f"x{c['per_example_time_ratio']:.2f}, peak memory x{c['peak_memory_ratio']:.2f} (target at most 1.3; "
                  "CPU: resident memory sampled during the run).", "",
                  "Commands:", "", f"    {c['non-private']['command']}", f"    {c['dp']['command']}", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=["sst2", "smollm2", "cost"])
    ap.add_argument("--runs", nargs="*", choices=sorted(SST2_RUNS), help="some of the SST-2 runs (the others kept)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rebuild privacy.md from privacy.json")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not SST2.is_dir() or not ALPACA.is_file():
        print(f"SST-2 or Alpaca not found under {SHARED}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"
    stem = "privacy-quick" if args.quick else "privacy"  # a smoke run never replaces the results
    path = out / f"{stem}.json"
    results = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    if args.report:
        report(results, out, results.get("machine", machine), stem)
        return 0
    parts = {"sst2": part_sst2, "smollm2": part_smollm2, "cost": part_cost}
    for name in args.only or list(parts):
        part = part_sst2(out, args.quick, args.runs) if name == "sst2" else parts[name](out, args.quick)
        if path.exists() and not args.quick:  # read again: another invocation may have written meanwhile
            results = json.loads(path.read_text())
        if name == "sst2":
            kept = [r for r in results.get("sst2", {}).get("rows", []) if args.runs and r["run"] not in args.runs]
            order = list(SST2_RUNS)
            part["rows"] = sorted(kept + part["rows"], key=lambda r: order.index(r["run"]))
        results[name] = part
        results["machine"] = machine
        path.write_text(json.dumps(results, indent=2))
    report(results, out, machine, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())

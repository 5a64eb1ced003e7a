"""distft against transformers.Trainer (+ peft) on the same work, side by side.

    python bench/vs_hf_trainer.py                  # SmolLM2-135M: LoRA and full, the main cases
    python bench/vs_hf_trainer.py --quick          # the tiny model, a smoke run (used by the tests)
    python bench/vs_hf_trainer.py --repeats 2      # A B A B

Both runners get the same model (loaded by distft's loader, so the same weights), the same
tokenized Alpaca examples (distft's instruction task: Alpaca template, prompt masked,
EOS target), max_length, batch size, AdamW settings, learning rate, cosine schedule,
steps, precision and seed. The HF Trainer pads each batch to its longest example with
transformers' DataCollatorForSeq2Seq (its usual setup; TRL's SFTTrainer wraps the same).
distft runs padded the same way, and packed (data.packing=true).

Measured per run, each in a fresh process, cases alternating A B A B:
- non-pad tokens/s and steps/s over the optimizer steps after the first two (the time from
  the start of a step to the end of its optimizer update);
- peak RSS of the process while training (sampled every 5 ms by a thread; the model load
  before is not counted; distft's eval at the last step, in its loop, is: HF's train() does
  none), and how much of it training added over the RSS at its start (activations,
  gradients, optimizer state, logits), or the CUDA allocator's peak on GPU;
- held-out loss per target token after training, computed by the same function for both
  runners on the same 64 held-out examples.

Writes bench/results/vs_hf_trainer.{json,md,png} and regenerates BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "train.jsonl"
WARMUP = 2  # steps left out of the throughput
HELD_OUT = 64

MODELS = {"smollm2": ["model=smollm2"], "tiny": ["model=tiny_llama"]}
STRATEGIES = {
    "lora": ["strategy=lora", "strategy.r=16", "strategy.alpha=32", "strategy.dropout=0.05",
             "strategy.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    "full": ["strategy=full"],
}
LR = {"lora": 2e-4, "full": 2e-5}
# A case's variant "ac" turns on activation checkpointing (distft:
# trainer.activation_checkpointing=true; the HF Trainer: gradient_checkpointing=True,
# non-reentrant), for the memory targets.


# ----------------------------------------------------------------------------- one run
class PeakRSS:
    """The largest resident set of this process while running (a 5 ms sampling thread)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * self._page)
            time.sleep(0.005)

    def __enter__(self):
        with open("/proc/self/statm") as f:
            self.start = int(f.read().split()[1]) * self._page
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()

    def __exit__(self, *exc):
        self.stop()


def compose(case, run_dir: Path):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distft import config as _config  # noqa: F401  (registers the structured configs)
    from distft.paths import CONF_DIR

    overrides = [*MODELS[case["model"]], *STRATEGIES[case["strategy"]], f"trainer.lr={LR[case['strategy']]}",
                 "task=instruction", "data=files", f"data.train={case['train']}", f"data.validation={case['heldout']}",
                 "data.drop_empty=true", f"data.max_length={case['max_length']}",
                 f"data.packing={str(case['layout'] == 'packed').lower()}", f"trainer.batch_size={case['batch']}",
                 f"trainer.max_steps={case['steps']}", f"trainer.precision={case['precision']}",
                 "trainer.eval_every=0", "trainer.save_every=0", "trainer.warmup_steps=0", "trainer.export_best=false",
                 "logger=csv", "logger.progress_bar=false", "logger.plots=false", "data.cache_dir=null",
                 f"seed={case['seed']}", f"run_dir={run_dir}", "resume=never",
                 f"trainer.activation_checkpointing={str(case.get('variant') == 'ac').lower()}",
                 f"trainer.compile={str(case.get('variant') == 'compile').lower()}",
                 *case.get("overrides", [])]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def heldout_loss(model, task, examples, device) -> float:
    """Mean loss per target token on the held-out examples, fp32, one function for both runners."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = task.collate(examples[i:i + 8])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            targets = batch["labels"][:, 1:].to(device)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def run_distft(case, run_dir: Path) -> dict:
    import torch

    from distft.trainer import Trainer

    trainer = Trainer(compose(case, run_dir)).setup()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        # The peak of the training loop: the eval at the last step is part of distft's loop
        # and counted; the final export (which HF's train() does not do) comes after the
        # sampling stops.
        finish = trainer.finish

        def finish_unsampled(stopped_early):
            rss.stop()
            peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda" else None
            trainer.bench_peak_cuda_mb = peak_cuda
            return finish(stopped_early)

        trainer.finish = finish_unsampled
        trainer.train()
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "step_seconds" in e]
    timed = steps[WARMUP:]
    model = trainer.backend.unwrap(trainer.model)
    return {"seconds": sum(e["step_seconds"] for e in timed), "tokens": sum(e["tokens"] for e in timed),
            "padded_tokens": sum(e["padded_tokens"] for e in timed), "timed_steps": len(timed),
            "train_loss": [e["loss"] for e in steps],
            "peak_rss_mb": rss.peak / 2**20, "added_rss_mb": (rss.peak - rss.start) / 2**20,
            "peak_cuda_mb": trainer.bench_peak_cuda_mb,
            "heldout_loss": heldout_loss(model, trainer.task, trainer.val_examples, trainer.device),
            "rows": len(trainer.train_examples)}


def run_hf(case, run_dir: Path) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from distft.data.prepare import prepare
    from distft.models import load_model, load_tokenizer
    from distft.models.loading import resolve_model_path
    from distft.tasks import build_task

    cfg = compose(case, run_dir)
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    task = build_task(cfg.task, cfg.data, tokenizer)
    train, heldout, _, _ = prepare(cfg.data, task, cfg.seed)
    model = load_model(cfg.model, "next_tokens", tokenizer, None, seed=cfg.seed)
    if case["strategy"] == "lora":
        from peft import LoraConfig, get_peft_model

        s = cfg.strategy
        model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 target_modules=list(s.target_modules), task_type="CAUSAL_LM"))
    cuda = torch.cuda.is_available()
    t = cfg.trainer
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=case["batch"], max_steps=case["steps"],
        learning_rate=t.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps, max_grad_norm=t.max_grad_norm,
        bf16=case["precision"] == "bf16", use_cpu=not cuda, seed=case["seed"], data_seed=case["seed"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, gradient_checkpointing=case.get("variant") == "ac",
        gradient_checkpointing_kwargs={"use_reentrant": False} if case.get("variant") == "ac" else None)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train]
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    record = {"start": [], "end": [], "tokens": [], "padded": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            record["start"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            record["end"].append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            record["tokens"].append(int(inputs["attention_mask"].sum()))
            record["padded"].append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = range(WARMUP, len(record["end"]))
    device = next(model.parameters()).device
    return {"seconds": sum(record["end"][i] - record["start"][i] for i in timed),
            "tokens": sum(record["tokens"][i] for i in timed), "padded_tokens": sum(record["padded"][i] for i in timed),
            "timed_steps": len(timed), "train_loss": losses, "peak_rss_mb": rss.peak / 2**20,
            "added_rss_mb": (rss.peak - rss.start) / 2**20,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "heldout_loss": heldout_loss(model, task, heldout, device), "rows": len(rows)}


def one(case) -> dict:
    import torch

    from distft.memory import allocator_in_use, release_freed_memory

    torch.set_num_threads(case["threads"])
    # Both runners alike: on glibc, distft's trainer fixes the mmap threshold
    # (trainer.release_freed_memory); the HF Trainer gets the same tuning here.
    release_freed_memory()
    run_dir = Path(case["out"]) / "runs" / f"vs_hf-{case['name']}-{case['repeat']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    result = (run_hf if case["runner"] == "hf" else run_distft)(case, run_dir)
    result["allocator"] = allocator_in_use()
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    result["steps_per_second"] = result["timed_steps"] / result["seconds"]
    return {**{k: case[k] for k in ("name", "runner", "model", "strategy", "layout", "precision", "repeat")},
            "variant": case.get("variant", ""),
            **result}


def default_threads() -> int:
    """Intra-op threads when --threads is not given: OMP_NUM_THREADS, else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def machine_line(threads: int) -> str:
    """The processor, its vector capability (bf16 speed depends on it), cores and torch."""
    import torch

    from distft.precision import cpu_capability

    name = torch.cpu.get_capabilities().get("cpu_name") if hasattr(torch.cpu, "get_capabilities") else None
    return (f"{name or platform.processor() or platform.machine()} ({cpu_capability()}), {os.cpu_count()} CPU cores "
            f"({threads} threads), torch {torch.__version__}"
            + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def add_malloc_arg(ap, help: str) -> None:
    """--malloc: the allocator `one_in_a_fresh_process` starts runs on; DISTFT_MALLOC, else
    the system's (a benchmark names its allocator rather than take the launchers' auto)."""
    ap.add_argument("--malloc", default=os.environ.get("DISTFT_MALLOC", "system"), help=help)


def add_process_args(ap, malloc_help: str = "allocator of the run: system, tcmalloc, jemalloc (launch/malloc.sh)") -> None:
    """--threads, --out, --malloc and the hidden --one (a case run in the fresh process that
    `one_in_a_fresh_process` starts): the arguments of a benchmark that runs one."""
    ap.add_argument("--threads", type=int, default=default_threads(), help=default_threads.__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    add_malloc_arg(ap, malloc_help)
    ap.add_argument("--one", help=argparse.SUPPRESS)


def measure_shapes(one: str, measure) -> int:
    """The fresh process's side of a shapes benchmark (bench/attention.py, chunked_loss.py):
    `measure(*shape, repeats)` for each shape of the --one JSON, printed as the RESULT line."""
    import torch

    case = json.loads(one)
    torch.set_num_threads(case["threads"])
    rows = [measure(*shape, case["repeats"]) for shape in case["shapes"]]
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


def shapes_in_a_fresh_process(args, script: str, stem: str, shapes: list, repeats: int, **extra):
    """Measure `shapes` in one fresh process and write <args.out>/<stem>.json (the machine, the
    command, `extra`, the rows) and the BENCHMARKS.md beside it; the rows, or None if the run
    failed."""
    rows = one_in_a_fresh_process({"shapes": shapes, "repeats": repeats, "threads": args.threads}, args.malloc,
                                  script=script)
    if rows is None:
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": f"{machine_line(args.threads)}, allocator {args.malloc}",
         "command": f"python bench/{Path(script).name} " + " ".join(sys.argv[1:]), **extra, "rows": rows}, indent=2))
    from bench.report import write_benchmarks_md

    print(write_benchmarks_md(out))
    return rows


def one_in_a_fresh_process(case, malloc: str = "system", script: str = __file__):
    """One case in its own process (`script --one <case as JSON>`, which prints its result
    on a line starting RESULT), started through launch/malloc.sh as distft's launchers start
    training, so both runners get the same allocator; None (output printed) if it failed."""
    cmd = ["bash", "-c", 'source launch/malloc.sh && exec "$@"', "malloc",
           sys.executable, script, "--one", json.dumps(case)]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True,
                          env={**os.environ, "WANDB_SILENT": "true", "DISTFT_MALLOC": malloc})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        return None
    return json.loads(line[0][len("RESULT "):])


# ----------------------------------------------------------------------------- the matrix
def cases_for(models, quick: bool, bf16: bool = True):
    """(runner, model, strategy, layout, precision, variant) of each run; without `bf16`
    (hardware that emulates it) the bf16 cases are left out."""
    out = []
    for model in models:
        for strategy in ("lora", "full"):
            for precision in ("fp32", "bf16") if bf16 else ("fp32",):
                if strategy == "full" and precision == "bf16" and not quick:
                    continue  # full fine-tuning is there for the memory ratio and MFU
                out.append(("hf", model, strategy, "padded", precision, ""))
                out.append(("distft", model, strategy, "padded", precision, ""))
                if strategy == "lora":
                    out.append(("distft", model, strategy, "packed", precision, ""))
                if precision == "fp32":
                    # Activation checkpointing on both sides for the same-precision memory
                    # ratio, and on full fine-tuning for LoRA / full with both checkpointed.
                    out.append(("distft", model, strategy, "padded", precision, "ac"))
                    if strategy == "lora":
                        out.append(("hf", model, strategy, "padded", precision, "ac"))
                elif strategy == "lora":
                    out.append(("distft", model, strategy, "packed", precision, "ac"))  # the lean setting
                    if not quick:  # the fastest setting: blocks compiled (trainer.compile)
                        out.append(("distft", model, strategy, "packed", precision, "compile"))
    return out


def case_name(runner, model, strategy, layout, precision, variant="") -> str:
    return f"{runner}-{model}-{strategy}-{layout}-{precision}" + (f"-{variant}" if variant else "")


def split_data(out: Path, rows: int) -> tuple[Path, Path]:
    """The first `rows` Alpaca records train, the next 64 are held out (one file each, under
    the results' runs/ folder, never committed)."""
    lines = ALPACA.read_text().splitlines()
    data = out / "runs" / "vs_hf-data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    (data / "heldout.jsonl").write_text("\n".join(lines[rows:rows + HELD_OUT]) + "\n")
    return data / "train.jsonl", data / "heldout.jsonl"


def summarize(results):
    """Mean over repeats per case, and the ratios the issue's targets are stated in."""
    by = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    mean = {}
    for name, rs in by.items():
        m = {k: rs[0][k] for k in ("runner", "model", "strategy", "layout", "precision")}
        m["variant"] = rs[0].get("variant", "")
        for k in ("tokens_per_second", "steps_per_second", "peak_rss_mb", "added_rss_mb", "heldout_loss"):
            m[k] = sum(r[k] for r in rs) / len(rs)
        cuda = [r["peak_cuda_mb"] for r in rs if r.get("peak_cuda_mb") is not None]
        m["peak_cuda_mb"] = sum(cuda) / len(cuda) if cuda else None
        m["padding_share"] = 1 - sum(r["tokens"] for r in rs) / sum(r["padded_tokens"] for r in rs)
        mean[name] = m
    return mean


def ratios(mean, models):
    def get(runner, model, strategy, layout, precision, variant=""):
        return mean.get(case_name(runner, model, strategy, layout, precision, variant))

    mem = "peak_cuda_mb" if any(m["peak_cuda_mb"] for m in mean.values()) else "peak_rss_mb"
    out = []

    def speed_and_loss(what, a, b, target):
        if a and b:
            out.append((f"{what} tokens/s", a["tokens_per_second"] / b["tokens_per_second"], target))
            out.append((f"{what} held-out loss", a["heldout_loss"] / b["heldout_loss"], "within 2%"))

    def memory_and_speed(what, a, b, mem_target, speed_target):
        if a and b:
            out.append((f"{what} peak memory", a[mem] / b[mem], mem_target))
            out.append((f"{what} tokens/s", a["tokens_per_second"] / b["tokens_per_second"], speed_target))

    for model in models:
        for precision in ("fp32", "bf16"):
            hf, d = get("hf", model, "lora", "padded", precision), get("distft", model, "lora", "padded", precision)
            if hf and d:
                out.append((f"{model} LoRA, padded, {precision}: distft / HF tokens/s",
                            d["tokens_per_second"] / hf["tokens_per_second"], ">= 1.0"))
                out.append((f"{model} LoRA, padded, {precision}: distft / HF peak memory",
                            d[mem] / hf[mem], "<= 0.6"))
                if mem == "peak_rss_mb":
                    out.append((f"{model} LoRA, padded, {precision}: distft / HF memory added by training",
                                d["added_rss_mb"] / hf["added_rss_mb"], "(<= 0.6)"))
            speed_and_loss(f"{model} LoRA, {precision}: distft packed / HF padded",
                           get("distft", model, "lora", "packed", precision), hf, ">= 1.6")
        # >= 5.0: issue 13's target on a machine with native bf16 (>= 3.0 before it)
        speed_and_loss(f"{model} LoRA: distft packed bf16 / HF padded fp32",
                       get("distft", model, "lora", "packed", "bf16"), get("hf", model, "lora", "padded", "fp32"), ">= 5.0")
        speed_and_loss(f"{model} LoRA: distft packed bf16, blocks compiled / HF padded fp32",
                       get("distft", model, "lora", "packed", "bf16", "compile"),
                       get("hf", model, "lora", "padded", "fp32"), ">= 5.0")
        full, lora = get("distft", model, "full", "padded", "fp32"), get("distft", model, "lora", "padded", "fp32")
        if full and lora:  # neither checkpointed
            out.append((f"{model}: distft LoRA / full fine-tuning peak memory", lora[mem] / full[mem], "<= 0.6"))
            if mem == "peak_rss_mb":
                out.append((f"{model}: distft LoRA / full fine-tuning memory added by training",
                            lora["added_rss_mb"] / full["added_rss_mb"], "(<= 0.6)"))
        # Activation checkpointing: distft's leanest against the HF Trainer's default and
        # against the HF Trainer checkpointed too (what the chunked loss saves on its own).
        ac = " + activation checkpointing"
        hf = get("hf", model, "lora", "padded", "fp32")
        for label, d in (("padded fp32", get("distft", model, "lora", "padded", "fp32", "ac")),
                         ("packed bf16", get("distft", model, "lora", "packed", "bf16", "ac"))):
            memory_and_speed(f"{model} LoRA: distft {label}{ac} / HF padded fp32", d, hf,
                             "<= 0.6", "(cost of checkpointing)")
        memory_and_speed(f"{model} LoRA, padded, fp32, both{ac}: distft / HF",
                         get("distft", model, "lora", "padded", "fp32", "ac"),
                         get("hf", model, "lora", "padded", "fp32", "ac"), "(<= 0.6)", "(>= 1.0)")
        full_ac, lora_ac = get("distft", model, "full", "padded", "fp32", "ac"), get("distft", model, "lora", "padded", "fp32", "ac")
        if full_ac and lora_ac:
            out.append((f"{model}: distft LoRA / full fine-tuning peak memory, both with activation checkpointing",
                        lora_ac[mem] / full_ac[mem], "<= 0.6"))
        hf_full = get("hf", model, "full", "padded", "fp32")
        if full and hf_full:
            out.append((f"{model} full, padded, fp32: distft / HF tokens/s",
                        full["tokens_per_second"] / hf_full["tokens_per_second"], ">= 1.0"))
    return out, mem


def chart(mean, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(mean, key=lambda n: (mean[n]["model"], mean[n]["strategy"], mean[n]["precision"],
                                        mean[n].get("variant", ""), mean[n]["runner"] != "hf", mean[n]["layout"]))
    labels = [f"{mean[n]['runner']} {mean[n]['model']} {mean[n]['strategy']}\n{mean[n]['layout']} {mean[n]['precision']}"
              + {"ac": " +AC", "compile": " +compile"}.get(mean[n].get("variant", ""), "") for n in names]
    colors = ["#888888" if mean[n]["runner"] == "hf" else "#1f77b4" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names)), 4.5))
    axes[0].bar(range(len(names)), [mean[n]["tokens_per_second"] for n in names], color=colors)
    axes[0].set_ylabel("non-pad tokens/s")
    axes[1].bar(range(len(names)), [mean[n]["peak_rss_mb"] / 1024 for n in names], color=colors)
    axes[1].set_ylabel("peak RSS while training (GiB)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes[0].set_title("grey: transformers.Trainer, blue: distft")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2", help="comma-separated: smollm2, tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads(), help=default_threads.__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model, 3 steps (one timed), 64 rows, every case in this process: a smoke run")
    ap.add_argument("--same-process", action="store_true",
                    help="run the cases in this process instead of a fresh one each (no allocator choice; "
                         "memory figures then carry the earlier cases' leftovers)")
    ap.add_argument("--only", default="",
                    help="comma-separated case names (e.g. hf-smollm2-lora-padded-fp32,distft-smollm2-lora-packed-bf16) "
                         "to run alone, repeated A B A B: a paired check of one ratio without the whole matrix")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    add_malloc_arg(ap, "allocator of every run, both runners alike: system, tcmalloc, jemalloc (launch/malloc.sh)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return 0
    if not ALPACA.is_file():
        print(f"{ALPACA} not found: this benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 1
    if args.quick:
        args.models, args.steps, args.rows, args.max_length = "tiny", WARMUP + 1, 64, 512
        args.same_process = True  # a smoke run: the interpreter start would be most of its time
    if args.same_process and args.malloc != "system":
        ap.error("--same-process runs on this process's allocator: drop --malloc (or DISTFT_MALLOC)")
    models = args.models.split(",")
    out = Path(args.out)
    # bf16 cases only where bf16 matmuls are native: emulated (an AVX2-only CPU) they run
    # hundreds of times slower than fp32 and measure nothing worth a table row.
    from distft.precision import native_bf16_here

    bf16, why = native_bf16_here()
    skipped = None if bf16 else f"bf16 cases skipped: {why}"
    if skipped:
        print(skipped, flush=True)
    matrix = cases_for(models, args.quick, bf16)
    only = [n for n in args.only.split(",") if n]
    if only:
        known = {case_name(*c) for c in matrix}
        unknown = [n for n in only if n not in known]
        if unknown:
            ap.error(f"--only: no case named {', '.join(unknown)} here; the cases are: {', '.join(sorted(known))}")
        matrix = [c for c in matrix if case_name(*c) in only]
        from bench.report import RESULTS

        if out.resolve() == RESULTS.resolve():
            ap.error("--only writes a partial table: give it its own --out, not the committed bench/results")
    train, heldout = split_data(out, args.rows)
    results = []
    for repeat in range(args.repeats):  # A B A B: machine drift hits every case alike
        for runner, model, strategy, layout, precision, variant in matrix:
            name = case_name(runner, model, strategy, layout, precision, variant)
            case = {"name": name, "runner": runner, "model": model, "strategy": strategy, "layout": layout,
                    "precision": precision, "variant": variant, "repeat": repeat, "steps": args.steps, "batch": args.batch,
                    "max_length": args.max_length, "seed": 0, "threads": args.threads, "train": str(train),
                    "heldout": str(heldout), "out": str(out)}
            print(f"[{repeat}] {name}", flush=True)
            r = one(case) if args.same_process else one_in_a_fresh_process(case, args.malloc)
            if r is None:
                return 1
            print(f"    {r['tokens_per_second']:.1f} non-pad tok/s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"held-out loss {r['heldout_loss']:.4f}", flush=True)
            results.append(r)

    import transformers
    import peft

    mean = summarize(results)
    table, mem = ratios(mean, models)
    machine = (f"{machine_line(args.threads)}, transformers {transformers.__version__}, peft {peft.__version__}, "
               f"allocator {args.malloc}")
    command = "python bench/vs_hf_trainer.py " + " ".join(sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_hf_trainer.json").write_text(json.dumps(
        {"machine": machine, "command": command, "args": vars(args), "runs": results, "mean": mean,
         "ratios": [{"what": w, "value": v, "target": t} for w, v, t in table], "memory": mem,
         "skipped": skipped}, indent=2))
    chart(mean, out / "vs_hf_trainer.png")
    from bench.report import write_benchmarks_md

    print(write_benchmarks_md(out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

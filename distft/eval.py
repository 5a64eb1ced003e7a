"""`distft-eval`: the task's metrics of an exported model on a dataset.

    distft-eval RUN_DIR/final                                  # the run's own validation data
    distft-eval RUN_DIR/final data.validation=test.jsonl       # another file, the run's settings
    distft-eval MODEL_DIR task=classification data=files data.train=test.jsonl   # any model
    torchrun --nproc-per-node 2 -m distft.eval RUN_DIR/final   # the examples split over processes
    distft-eval RUN_DIR/final --lm-eval-tasks mytask --lm-eval-include tasks/   # lm-evaluation-harness

MODEL is what a run exported (a full model, distft's pooled-head classifier, a peft
adapter over the base it names) or any transformers model folder. Inside a run folder
(RUN_DIR/final) the run's config.yaml gives the task and data settings, and overrides are
dotted keys over it; elsewhere the config is composed from conf/train.yaml with the same
overrides as distft-train. The evaluated data: `data.validation` when set, else all of
`data.train` (with data.validation_split_name for a hub dataset's split).

Writes eval.json (RUN_DIR/eval.json for a run's export, ./eval.json otherwise, or
--output) and prints a table. With --lm-eval-tasks (a causal LM; `pip install
lm-eval`, the `eval` extra), lm-evaluation-harness runs those tasks on the same loaded
model; --lm-eval-include adds a folder of task YAML files (e.g. a local JSONL task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from distft.errors import ConfigError, DistftError

PREDICTS_OF = {"next_tokens": ("causal_lm", "instruction"), "label": ("classification",),
               "token_labels": ("token_classification",)}


# ------------------------------------------------------------------ config
def run_folder(model_dir: Path) -> Optional[Path]:
    """The run folder an export sits in (RUN_DIR/final), or None."""
    parent = model_dir.resolve().parent
    return parent if (parent / "config.yaml").is_file() and model_dir.name == "final" else None


def parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def eval_config(model_dir: Path, overrides: List[str]):
    """The run's config with dotted overrides, or conf/train.yaml composed with them."""
    from omegaconf import OmegaConf

    from distft import config as schema

    run = run_folder(model_dir)
    if run is None:
        cfg = schema.compose_train(overrides)
    else:
        cfg = OmegaConf.load(run / "config.yaml")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or "." not in key.lstrip("+~"):
                raise ConfigError(f"{item!r}: a run's export is evaluated with its own config "
                                  f"({run / 'config.yaml'}); override dotted keys (data.validation=FILE, "
                                  "data.name=hub, task.labels=...), not whole groups")
            OmegaConf.update(cfg, key.lstrip("+"), parse_value(value), force_add=False)
    schema.validate_schema(cfg)
    if cfg.data.name == "mixture":
        raise ConfigError("a mixture's export: evaluate one task's folder (RUN_DIR/final/<task>) with "
                          "task.name=... data.name=files data.validation=FILE")
    return cfg


# ------------------------------------------------------------------ model
def load_for_eval(model_dir: Path, predicts: str):
    """(model, tokenizer) of an exported folder or a transformers model folder."""
    if not model_dir.is_dir():
        raise DistftError(f"{model_dir}: no such model folder")
    if predicts == "next_tokens":
        from distft.generate import load, not_a_causal_lm

        why = not_a_causal_lm(model_dir)
        if why:
            raise DistftError(f"{model_dir}: {why}; this config's task ({'/'.join(PREDICTS_OF[predicts])}) "
                              "predicts next tokens")
        return load(model_dir)
    from distft.predict import Predictor, not_a_classifier

    why = not_a_classifier(model_dir)
    if why:
        raise DistftError(f"{model_dir}: {why}")
    if (model_dir / "classifier.skops").is_file():
        raise DistftError(f"{model_dir}: a scikit-learn classifier on frozen features (strategy=feature): "
                          "its run's summary.json holds its metrics; distft-predict applies it to new data")
    predictor = Predictor(str(model_dir))
    if predictor.token_task != (predicts == "token_labels"):
        kind = "token-classification" if predictor.token_task else "sequence-classification"
        raise DistftError(f"{model_dir}: a {kind} model, but this config's task is "
                          f"{'/'.join(PREDICTS_OF[predicts])}; set task.name to match the model")
    return predictor.model, predictor.tokenizer


def label_settings(cfg, model) -> None:
    """The label set is the model's, not one inferred from the evaluated data."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_labels", None)
    if cfg.task.name == "classification" and n:
        cfg.task.num_labels = int(n)
    if cfg.task.name == "token_classification" and not cfg.task.labels:
        id2label = getattr(config, "id2label", None) or {}
        cfg.task.labels = [str(id2label.get(i, id2label.get(str(i)))) for i in range(len(id2label))]


# ------------------------------------------------------------------ data
def eval_records(cfg, runs_own: bool = False) -> Tuple[list, str]:
    """The records to evaluate and where they came from. `runs_own`: a run's export with
    its data settings untouched is evaluated on exactly the run's validation examples (a
    held-out share of train included)."""
    from distft.data import load_records
    from distft.data.sources import read_hub, read_records

    data_cfg = cfg.data
    if runs_own:
        _, records, info = load_records(data_cfg, cfg.task.name, cfg.seed, cfg.task.template)
        return records, info.get("validation") or "the run's validation data"
    if data_cfg.name == "hub":
        path = data_cfg.validation or data_cfg.train
        split = data_cfg.validation_split_name or data_cfg.train_split
        records = read_hub(path, data_cfg.hub_config, split)
        path = f"{path}[{split}]"
    elif data_cfg.validation or data_cfg.name == "files":  # a file (also given over a synthetic run's config)
        path = data_cfg.validation or data_cfg.train
        if not path:
            raise ConfigError("data.validation: give the file to evaluate on")
        split = data_cfg.validation_split_name if data_cfg.validation else data_cfg.train_split
        records = read_records(path, data_cfg.format, split)
    else:  # synthetic: the generated validation examples of the run
        _, records, _ = load_records(data_cfg, cfg.task.name, cfg.seed, cfg.task.template)
        path = "synthetic"
    if data_cfg.max_validation_examples:
        records = records[: data_cfg.max_validation_examples]
    return records, str(path)


def prepare_eval(cfg, tokenizer, records, source: str):
    from distft.data.clean import SplitReport, check_clean_config, clean_records, fit_lengths
    from distft.tasks import build_task

    check_clean_config(cfg.data)
    task = build_task(cfg.task, cfg.data, tokenizer)
    report = SplitReport("validation", source)
    records = clean_records(records, cfg.data, task.text_fields(), task.key_fields(), report)
    if not records:
        raise DistftError(f"{source}: no example left to evaluate")
    num_labels, label_report = task.fit_labels(records, records)
    examples = fit_lengths(task.encode(records), records, cfg.data, report)
    full = {"train": report.to_dict(), "validation": report.to_dict(), **(label_report or {})}
    task.prepared(num_labels, full)
    return task, examples, report.to_dict()


# ------------------------------------------------------------------ evaluation
def _distributed() -> Tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


@torch.inference_mode()
def evaluate(model, task, examples, batch_size: int, rank: int, world: int, device) -> Dict[str, float]:
    """The task's metrics, its additive statistics summed over batches and processes (the
    loop's own evaluation, on a model loaded from disk)."""
    model.to(device).eval()
    sums: Dict[str, float] = {}
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.collate(mine[i:i + batch_size]).items()}
        logits = model(**task.model_kwargs(batch)).logits
        for k, v in task.eval_stats(logits, batch).items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(task.eval_stats_keys)
    totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
    if world > 1:
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
    return task.finish_eval(dict(zip(keys, totals.tolist())))


def run_lm_eval(model, tokenizer, tasks: List[str], include: Optional[str], limit: Optional[int],
                batch_size: int, device) -> Dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DistftError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'distft[eval]' "
                          "(or pip install lm-eval)") from None
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else ""
        raise DistftError(f"--lm-eval-tasks: no task named {unknown} in lm-eval{where}")
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {name: {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "alias"}
            for name, res in (out or {}).get("results", {}).items()}


def table(metrics: Dict[str, float], lm: Dict[str, Dict[str, float]]) -> str:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    rows += [(f"{task}/{k}", v) for task, res in lm.items() for k, v in res.items()]
    width = max([len(k) for k, _ in rows] + [6])
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  ------",
                      *[f"{k:<{width}}  {v:.4f}" for k, v in rows]])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="distft-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an exported model or adapter folder (RUN_DIR/final), or any transformers model")
    ap.add_argument("overrides", nargs="*", help="config overrides (data.validation=FILE, task=..., ...)")
    ap.add_argument("--output", help="where to write eval.json (default: RUN_DIR/eval.json or ./eval.json)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: trainer.eval_batch_size")
    ap.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (causal LMs)")
    ap.add_argument("--lm-eval-include", help="a folder of lm-eval task YAML files (local tasks)")
    ap.add_argument("--lm-eval-limit", type=int, help="at most this many examples per lm-eval task")
    ap.add_argument("--no-task-eval", action="store_true", help="only the lm-eval tasks")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = Path(args.model)
    try:
        from distft.tasks import task_class_named

        cfg = eval_config(model_dir, args.overrides)
        predicts = task_class_named(cfg.task.name).predicts
        rank, world, device = _distributed()
        model, tokenizer = load_for_eval(model_dir, predicts)
        label_settings(cfg, model)
        batch_size = args.batch_size or cfg.trainer.eval_batch_size or cfg.trainer.batch_size
        result: Dict = {"model": str(model_dir.resolve()), "task": cfg.task.name, "processes": world}
        metrics: Dict[str, float] = {}
        if not args.no_task_eval:
            runs_own = run_folder(model_dir) is not None and not any(o.lstrip("+~").startswith("data.")
                                                                       for o in args.overrides)
            records, source = eval_records(cfg, runs_own)
            task, examples, report = prepare_eval(cfg, tokenizer, records, source)
            metrics = evaluate(model, task, examples, batch_size, rank, world, device)
            result.update({"data": source, "examples": len(examples), "data_report": report, "metrics": metrics})
        lm: Dict = {}
        if args.lm_eval_tasks:
            if predicts != "next_tokens":
                raise ConfigError("--lm-eval-tasks evaluates causal language models; this model classifies")
            if world > 1:
                raise ConfigError("--lm-eval-tasks runs on one process (lm-eval's own data parallelism is "
                                  "`accelerate launch -m lm_eval`); drop torchrun for it")
            lm = run_lm_eval(model, tokenizer, [t for t in args.lm_eval_tasks.split(",") if t],
                             args.lm_eval_include, args.lm_eval_limit, batch_size, device)
            result["lm_eval"] = lm
    except DistftError as e:
        print(f"distft-eval: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        run = run_folder(model_dir)
        out = Path(args.output) if args.output else (run / "eval.json" if run else Path("eval.json"))
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)
        print(f"{model_dir} on {result.get('data', 'lm-eval tasks')}"
              + (f" ({result['examples']} examples, {world} process(es))" if "examples" in result else ""))
        print(table(metrics, lm))
        print(f"written to {out}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model card (README.md) of every exported folder: YAML front matter the Hugging Face hub
reads (base_model, library_name, tags, datasets, model-index with the final eval) and, in
prose, how the model was made: strategy and trainable parameters, the data report, hardware,
time and throughput, the metrics, the resolved config, and the privacy guarantee when there
is one. huggingface_hub's ModelCard could render a template, but what goes in it is distft's
own; PyYAML writes the front matter."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from omegaconf import OmegaConf

# The hub ids of the models distft ships configs for (model.path points at a local copy).
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PIPELINES = {"classification": "text-classification", "token_classification": "token-classification",
             "causal_lm": "text-generation", "instruction": "text-generation"}


def base_model_id(model_cfg) -> Optional[str]:
    """A hub id for base_model, or None (a model built from a config, a local folder)."""
    if model_cfg.name in HUB_IDS:
        return HUB_IDS[model_cfg.name]
    path = model_cfg.path
    if model_cfg.name == "hf" and path and not path.startswith(("/", ".", "~")) and path.count("/") <= 1:
        return path
    return None


def hardware(device_type: str, processes: int, backend: str, precision: str) -> str:
    if device_type == "cuda":
        import torch

        what = f"{torch.cuda.get_device_name(0)} x {processes}"
    else:
        cpu = platform.processor() or platform.machine()
        what = f"CPU ({cpu}), {processes} process(es)"
    return f"{what}, backend {backend}, precision {precision}"


def render(cfg, *, metrics: Dict[str, float], task_name: str, library: str, trainable: int, total: int,
           data_report: Optional[dict], hardware_line: str, train_seconds: float, tokens_per_second: Optional[float],
           extra: List[str] = (), title: Optional[str] = None, before: Optional[Dict[str, float]] = None) -> str:
    base = base_model_id(cfg.model)
    dataset_id = cfg.data.train if cfg.data.name == "hub" else None
    scalar = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k}
    front = {"library_name": library,
             "tags": list(dict.fromkeys(["distft", cfg.strategy.name, task_name, *(["peft"] if library == "peft" else [])])),
             "pipeline_tag": PIPELINES.get(task_name)}
    if base:
        front["base_model"] = base
    if dataset_id:
        front["datasets"] = [dataset_id]
    if scalar:
        front["model-index"] = [{
            "name": title or Path(str(cfg.run_dir)).name,
            "results": [{
                "task": {"type": PIPELINES.get(task_name, task_name)},
                "dataset": {"name": dataset_id or _data_name(cfg), "type": dataset_id or "local",
                            "split": "validation"},
                "metrics": [{"type": k, "value": round(v, 6), "name": f"validation {k}"} for k, v in scalar.items()],
            }],
        }]
    lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v is not None}, sort_keys=False).rstrip(), "---",
             "", f"# {title or Path(str(cfg.run_dir)).name}", "",
             "Fine-tuned with distft from "
             f"{'`' + base + '`' if base else 'a model ' + ('built from a config' if cfg.model.from_config else 'at `' + str(cfg.model.path) + '`')}"
             f" for {task_name.replace('_', ' ')}.", "",
             "## Training", "",
             f"- Strategy: `{cfg.strategy.name}`; {trainable:,} of {total:,} parameters trained "
             f"({100.0 * trainable / max(total, 1):.2f}%).",
             f"- Hardware: {hardware_line}.",
             f"- Time: {train_seconds:.1f} s of training"
             + (f", {tokens_per_second:,.0f} tokens/s" if tokens_per_second else "") + "."]
    if data_report:
        from distft.data.prepare import summary_line

        try:
            lines += [f"- Data: {summary_line(data_report)} (`data_report.json` in the run folder)."]
        except (KeyError, TypeError):  # a mixture's report: one entry per task
            lines += ["- Data: see `data_report.json` in the run folder."]
    if metrics and before:  # trainer.eval_before_training: the starting weights beside the exported ones
        lines += ["", "## Evaluation (validation split)", "", "| metric | before training | exported weights |",
                  "|---|---|---|"]
        lines += [f"| {k} | " + (f"{before[k]:.4f}" if isinstance(before.get(k), (int, float)) else "") + f" | {v:.4f} |"
                  for k, v in metrics.items() if isinstance(v, (int, float))]
    elif metrics:
        lines += ["", "## Evaluation (validation split, the exported weights)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    for section in extra:
        lines += ["", section.rstrip()]
    resolved = OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else yaml.safe_dump(cfg)
    lines += ["", "## Configuration", "", "The resolved distft config of the run:", "", "```yaml", resolved.rstrip(),
              "```", ""]
    return "\n".join(lines)


def _data_name(cfg) -> str:
    if cfg.data.name == "files" and cfg.data.train:
        return Path(str(cfg.data.train)).name
    return str(cfg.data.name)


def write_cards(trainer, root: Path, written: List[str], metrics: Dict[str, float]) -> None:
    """README.md in the export root and in every folder the task wrote (each task of a
    mixture: its own metrics); the privacy section goes in each."""
    cfg = trainer.cfg
    report_path = trainer.run_dir / "data_report.json"
    data_report = json.loads(report_path.read_text()) if report_path.exists() else None
    secs = trainer.state["train_seconds"]
    common = dict(trainable=trainer.trainable, total=trainer.total, data_report=data_report,
                  hardware_line=hardware(trainer.device.type, trainer.backend.world_size, trainer.backend.name,
                                         trainer.precision.name),
                  train_seconds=secs, tokens_per_second=trainer.state["tokens"] / secs if secs else None,
                  extra=[c for c in [trainer.privacy.card()] if c])
    before = trainer.state.get("before") or {}
    members = {getattr(m, "name", None): m for m in getattr(trainer.task, "members", []) or []}
    folders = {Path(f).resolve() for f in written} | {root.resolve()}
    for folder in sorted(folders):
        name = folder.name if folder != root.resolve() else None
        if name in members:  # one task of a mixture
            own = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{name}/")}
            task_name = (members[name].task_cfg or {}).get("name", cfg.task.name)
            title = f"{Path(str(cfg.run_dir)).name}: {name}"
        else:
            own, task_name, title = metrics, cfg.task.name, None
        own_before = {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith(f"{name}/")} \
            if name in members else before
        library = "peft" if (folder / "adapter_config.json").is_file() else "transformers"
        (folder / "README.md").write_text(render(cfg, metrics=own, task_name=task_name, library=library,
                                                 title=title, before=own_before, **common))


def set_section(folder: Path, title: str, text: str) -> None:
    """Put a `## title` section into every model card under `folder` (replacing one of the
    same title, so a recipe run again writes it once), before the resolved config."""
    for card in sorted(Path(folder).rglob("README.md")):
        lines = card.read_text().split("\n")
        heading = f"## {title}"
        if heading in lines:  # drop the old section: up to the next heading of its level
            start = lines.index(heading)
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            lines = lines[:start] + lines[end:]
        at = lines.index("## Configuration") if "## Configuration" in lines else len(lines)
        lines[at:at] = [heading, "", *text.rstrip().split("\n"), ""]
        tmp = card.with_name(card.name + ".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(card)

"""Sequential (staged) fine-tuning: `experiment=sequential`.

Stage k is an ordinary distft run in RUN_DIR/stages/k-NAME. Its data is a mixture of
every stage so far: its own task trains, the earlier ones are evaluated only (train=false),
so each stage reports every earlier task's validation metric with the current weights.
It starts from the previous stage's exported weights (`init_from`); a new classification
task adds its own head on the shared encoder. The stage-by-task matrix goes to
RUN_DIR/forgetting.json and forgetting.png.

Where a stage's data and starting weights are assembled (`stage_config`) is the one
place a guard against forgetting plugs in: the regularizer's `stage_data` may change the
stage's mixture (replay trains a buffer of each earlier stage); a penalty (L2-SP, EWC)
anchors at the weights the stage starts from (`init_from`) or reads what the previous
stage handed on (`inputs`, e.g. EWC's Fisher).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf, open_dict

from distft import checkpoint as ckpt
from distft import preemption
from distft.errors import ConfigError

log = logging.getLogger(__name__)


def _stage_names(cfg) -> List[str]:
    stages = cfg.experiment.stages
    if not stages:
        raise ConfigError("experiment=sequential: experiment.stages is empty (see conf/experiment/sequential.yaml)")
    names = []
    for i, st in enumerate(stages):
        unknown = set(st) - {"name", "data", "task", "overrides"}
        if unknown:
            raise ConfigError(f"experiment.stages[{i}]: unknown key(s) {sorted(unknown)}; "
                              "use name, data, task, overrides")
        name = st.get("name") or f"stage{i + 1}"
        if "/" in str(name) or str(name) in names:
            raise ConfigError(f"experiment.stages[{i}].name={name!r}: names must be unique and contain no '/'")
        names.append(str(name))
    return names


def stage_config(cfg, k: int, init_from: Optional[str], inputs: Optional[Dict[str, str]] = None):
    """The config of stage k (0-based): a mixture of stages 0..k, only k trained, starting
    from `init_from` with the earlier stage's other artifacts as `inputs`."""
    names = _stage_names(cfg)
    stages = OmegaConf.to_container(cfg.experiment.stages, resolve=True)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        tasks = {}
        for i in range(k + 1):
            tasks[names[i]] = {"data": stages[i].get("data") or {}, "task": stages[i].get("task") or {},
                               "train": i == k}
        from distft.registry import import_plugins
        from distft.regularizers import REGULARIZERS

        import_plugins(cfg.plugins)  # a plugin's regularizer may shape the stage too
        REGULARIZERS.build(cfg.regularizer).stage_data(tasks, k)
        out.data.name = "mixture"
        out.data.tasks = tasks
        out.data.sampler = "proportional"
        out.experiment.name = "single"
        out.experiment.stages = []
        base_metric = cfg.task.metric.split("/")[-1]
        out.task.metric = f"{names[k]}/{base_metric}"  # early stopping/best: this stage's own task
        out.run_dir = str(Path(cfg.run_dir) / "stages" / f"{k + 1}-{names[k]}")
        out.init_from = init_from
        out.inputs = dict(inputs or {})
    for item in stages[k].get("overrides") or []:
        if "=" not in str(item):
            raise ConfigError(f"experiment.stages[{k}].overrides: {item!r} is not key=value")
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([str(item)]))
        except Exception as e:
            raise ConfigError(f"experiment.stages[{k}].overrides: {item!r}: {str(e).splitlines()[0]}") from None
    return out


def run_sequential(cfg, recipe=None) -> Dict:
    """Run the stages; `recipe` (distft.recipes.SequentialRun) holds the live trainer so
    that its cleanup releases the process group after the last one."""
    from distft.trainer import Trainer

    names = _stage_names(cfg)
    metric = cfg.task.metric.split("/")[-1]
    matrix: List[List[Optional[float]]] = []
    init_from = cfg.init_from
    inputs: Dict[str, str] = {}
    summary: Dict = {}
    if _is_main():
        preemption.clear_marker(Path(cfg.run_dir))
    trainer = None
    for k, name in enumerate(names):
        stage = stage_config(cfg, k, init_from, inputs)
        run_dir = Path(stage.run_dir)
        done = run_dir / "summary.json"
        if done.is_file():  # an interrupted experiment goes on from its first unfinished stage
            summary = json.loads(done.read_text())
            log.info("stage %d (%s) already finished: %s", k + 1, name, run_dir)
        else:
            log.info("stage %d/%d: %s%s", k + 1, len(names), name, f" from {init_from}" if init_from else "")
            trainer = Trainer(stage, teardown=False).setup()
            if recipe is not None:
                recipe.trainer = trainer  # the process group stays up for the next stage
            summary = trainer.train()
            if summary.get("preempted"):
                # Stopped by a signal: the stage resumes from its checkpoint when the same
                # command runs again; the marker goes where the launcher looks for it.
                if _is_main():
                    preemption.write_marker(Path(cfg.run_dir), summary["steps"], summary["signal"],
                                            Path(summary["checkpoint"]))
                if recipe is None:
                    trainer.close()
                return {**summary, "stage": name}
        matrix.append([summary.get(f"eval/{names[i]}/{metric}") if i <= k else None for i in range(len(names))])
        # What the stage hands on: its weights, and its regularizer's artifacts (summaries
        # written before artifacts existed name only their run_dir).
        artifacts = dict(summary.get("artifacts") or
                         {"weights": str(ckpt.exported_weights(run_dir, summary["steps"], summary["exported_step"]))})
        init_from = artifacts.pop("weights")
        inputs = artifacts
    if recipe is None and trainer is not None:
        trainer.close()
    result = forgetting_report(names, metric, matrix)
    result["regularizer"] = OmegaConf.to_container(cfg.regularizer, resolve=True)
    root = Path(cfg.run_dir)
    # The experiment's own summary: the last stage's, with what the forgetting matrix says
    # (each earlier task's drop, the new task's metric) and the guard that ran.
    out = {**summary, "forgetting": result, "final_dir": str(Path(summary["final_dir"])),
           "regularizer": result["regularizer"], "drop": result["forgetting"],
           "new_task": names[-1], f"new_task_{metric}": matrix[-1][-1],
           "stage_dirs": {name: str(root / "stages" / f"{k + 1}-{name}") for k, name in enumerate(names)}}
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        (root / "forgetting.json").write_text(json.dumps(result, indent=2))
        _heatmap(result, root / "forgetting.png")
        from distft.card import set_section

        set_section(Path(summary["final_dir"]), "Forgetting (sequential stages)", forgetting_card(result))
        tmp = root / "summary.json.tmp"
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(root / "summary.json")
        log.info("forgetting matrix (%s after each stage):\n%s", metric, format_matrix(result))
    return out


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0


def forgetting_report(names: List[str], metric: str, matrix: List[List[Optional[float]]]) -> Dict:
    """The matrix, and per task how far its metric fell from its best to the end
    (for a metric where lower is better, how far it rose)."""
    lower_better = metric in ("loss", "perplexity")
    forgetting = {}
    for i, name in enumerate(names[:-1]):
        seen = [row[i] for row in matrix[i:] if row[i] is not None]
        best = min(seen) if lower_better else max(seen)
        forgetting[name] = (seen[-1] - best) if lower_better else (best - seen[-1])
    return {"metric": metric, "stages": names, "tasks": names, "matrix": matrix,
            "rows": "after stage", "columns": "evaluated on task", "forgetting": forgetting}


def forgetting_card(result: Dict) -> str:
    """The model card's section: the stage-by-task matrix as a table, and each earlier
    task's drop from its best."""
    names = result["tasks"]
    lines = [f"Trained in {len(result['stages'])} stages, one after another; {result['metric']} on each "
             "task's validation data after each stage:", "",
             "| after stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row) + " |")
    reg = result.get("regularizer") or {}
    drops = ", ".join(f"{k} {v:.4f}" for k, v in result["forgetting"].items())
    lines += ["", f"Forgetting (best minus final, per earlier task): {drops or 'none'}; regularizer: "
              f"`{reg.get('name', 'none')}`."]
    return "\n".join(lines)


def format_matrix(result: Dict) -> str:
    names = result["tasks"]
    lines = ["after \\ on | " + " | ".join(names)]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"{stage} | " + " | ".join("" if v is None else f"{v:.4f}" for v in row))
    return "\n".join(lines)


def _heatmap(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in result["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * m.shape[1], 1.2 + 0.9 * m.shape[0]))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(m.shape[1]), result["tasks"])
    ax.set_yticks(range(m.shape[0]), [f"after {s}" for s in result["stages"]])
    ax.set_xlabel(f"evaluated on ({result['metric']})")
    for (r, c), v in np.ndenumerate(m):
        if not np.isnan(v):
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="w" if v < np.nanmean(m) else "k")
    reg = result.get("regularizer") or {}
    if reg.get("name", "none") != "none":
        ax.set_title("regularizer=" + reg["name"] + "".join(f", {k} {v}" for k, v in reg.items()
                                                          if k in ("strength", "size", "fraction") and v is not None),
                     fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Where metrics go: metrics.jsonl always; metrics.csv, TensorBoard and W&B when configured; plots."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, enabled: bool, config_dict: Dict):
        self.cfg = cfg
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.history: List[Dict] = []
        self._wandb = None
        self._tb = None
        self._config = config_dict

    def start(self, resume_step: Optional[int]) -> None:
        if not self.enabled:
            return
        if self.path.exists():
            # Keep the events up to the checkpoint being resumed; later ones are replayed.
            kept = []
            for line in self.path.read_text().splitlines():
                event = json.loads(line)
                if resume_step is not None and event.get("step", 0) <= resume_step:
                    kept.append(event)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
            os.replace(tmp, self.path)
            self.history = kept
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                from distft.errors import ConfigError

                raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pip install -e '.[tensorboard]')") from e
            # purge_step: a resumed run drops the events after its checkpoint, as metrics.jsonl does.
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)
        wcfg = self.cfg.wandb
        if wcfg.enabled and wcfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wcfg.project,
                entity=wcfg.entity,
                name=wcfg.name or self.run_dir.name,
                tags=list(wcfg.tags),
                mode=wcfg.mode,
                dir=str(self.run_dir),
                config=self._config,
                resume="allow",
                id=_wandb_id(self.run_dir),
            )

    def log(self, event: Dict) -> None:
        if not self.enabled:
            return
        self.history.append(event)
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if self.cfg.csv:
            self._write_csv()
        if self._tb is not None:
            for key, value in event.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=event["step"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in event.items() if k != "step"}, step=event["step"])

    def _write_csv(self) -> None:
        keys = sorted({k for e in self.history for k in e}, key=lambda k: (k != "step", k))
        with (self.run_dir / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)

    def finish(self, summary: Dict) -> None:
        if not self.enabled:
            return
        if self.cfg.plots:
            plot_curves(self.history, self.run_dir / "plots" / "curves.png")
        if self._tb is not None:
            self._tb.add_text("summary", "\n".join(f"    {k}: {v}" for k, v in summary.items()
                                                   if isinstance(v, (int, float, str))))
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    # One stable W&B run id per run_dir, so a resumed run continues the same W&B run.
    f = run_dir / ".wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def plot_curves(history: List[Dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = sorted({k for e in history for k in e if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(11 if evals else 6, 4))
    axes = axes if evals else [axes]
    if train:
        axes[0].plot(*zip(*train), label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    for key in ("eval/loss",):
        pts = [(e["step"], e[key]) for e in history if key in e]
        if pts:
            axes[0].plot(*zip(*pts), "o-", label=key)
    axes[0].legend()
    if evals:
        for key in evals:
            if key == "eval/loss" or key == "eval/perplexity":
                continue
            pts = [(e["step"], e[key]) for e in history if key in e]
            axes[1].plot(*zip(*pts), "o-", label=key)
        axes[1].set_xlabel("step")
        axes[1].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)

"""`distft-train`: fine-tune a model from a Hydra-composed config.

    distft-train                                   # the embedded default (tiny model, CPU)
    distft-train strategy=lora model=minilm task=classification data=files \
        data.train=train.jsonl data.validation=validation.jsonl
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from distft import config as _config  # noqa: F401  (registers the structured configs)
from distft.errors import DistftError
from distft.paths import CONF_DIR

log = logging.getLogger("distft")


def run(cfg: DictConfig) -> dict:
    """Train with a composed config and return the run summary."""
    from distft.recipes import run_recipe

    return run_recipe(cfg)


def _exit_cleanly_if_distributed() -> None:
    """End a launcher-started process once its work is done and flushed. torch's C++
    teardown at interpreter exit sometimes aborts a rank ("terminate called without an
    active exception", seen about once in seven runs here) after the process group was
    destroyed and every output written, and the launcher then reports the run as failed;
    skipping the interpreter's exit sequence avoids that."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # --multirun: each job trains in its own folder, <run_dir>/<job number>
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg)
    except DistftError as e:
        print(f"distft: error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        _exit_cleanly_if_distributed()
        return  # rank 0 reports for everyone
    if summary.get("preempted"):
        # A clean stop, not a failure: exit 0 so launchers do not tear the job down as a
        # crash; preempted.json in run_dir tells schedulers (slurm/*.sbatch) to requeue.
        print(f"stopped by {summary['signal']} after step {summary['steps']} of {summary['max_steps']}"
              + (f" (stage {summary['stage']})" if "stage" in summary else "")
              + f"; checkpoint in {summary['checkpoint']}. Run the same command again to resume.")
        _exit_cleanly_if_distributed()
        return
    metric = summary.get("metric")
    value = summary.get(f"eval/{metric}")
    if "classifier" in summary:  # strategy=feature: a scikit-learn classifier on frozen features
        feats = summary["features"]
        print(f"done: {summary['classifier']} on {feats['train_rows']} x {feats['dim']} features"
              + (" (from the cache)" if feats["cache_hit"] else "") + f", eval/{metric}="
              + (f"{value:.4f}" if value is not None else "n/a")
              + f"; model in {summary['final_dir']} ({summary['exported_as']})")
        _exit_cleanly_if_distributed()
        return
    print(
        f"done: {summary['steps']} steps, eval/{metric}="
        + (f"{value:.4f}" if value is not None else "n/a")
        + f" (best at step {summary['best_step']}); model in {summary['final_dir']}; "
        f"metrics in {os.path.join(summary.get('run_dir', cfg.run_dir), 'metrics.jsonl')}"
    )
    before = (summary.get("before") or {}).get(metric)
    if before is not None and value is not None:
        print(f"eval/{metric}: {before:.4f} before training -> {value:.4f} after")
    if "forgetting" in summary:
        print(f"stage-by-task {summary['forgetting']['metric']} matrix in "
              f"{os.path.join(cfg.run_dir, 'forgetting.json')} and forgetting.png")
    _exit_cleanly_if_distributed()


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N unless given --no_local_rank; Hydra
    would take it for a malformed override. The rank comes from LOCAL_RANK instead."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv = _strip_local_rank(sys.argv)
    _main()


if __name__ == "__main__":
    main()

"""Tasks: how records become batches, and batches a loss and metrics."""
from distft.errors import ConfigError
from distft.tasks.base import IGNORE, Task
from distft.tasks.causal_lm import CausalLMTask, InstructionTask
from distft.tasks.classification import ClassificationTask

TASKS = {t.name: t for t in (CausalLMTask, InstructionTask, ClassificationTask)}


def build_task(cfg, data_cfg, tokenizer) -> Task:
    cls = TASKS.get(cfg.name)
    if cls is None:
        raise ConfigError(f"task={cfg.name!r} is unknown; choose one of {sorted(TASKS)}")
    return cls(cfg, data_cfg, tokenizer)


__all__ = ["IGNORE", "TASKS", "Task", "build_task"]

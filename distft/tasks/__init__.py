"""Tasks: how records become batches, and batches a loss and metrics."""
from distft.errors import ConfigError
from distft.tasks.base import IGNORE, LABEL, NEXT_TOKENS, PREDICTS, TOKEN_LABELS, Task
from distft.tasks.causal_lm import CausalLMTask, InstructionTask
from distft.tasks.classification import ClassificationTask
from distft.tasks.token_classification import TokenClassificationTask

TASKS = {t.name: t for t in (CausalLMTask, InstructionTask, ClassificationTask, TokenClassificationTask)}


def task_class(cfg) -> type:
    """The task class of a run: a mixture of datasets is a task of its own (data=mixture)."""
    if cfg.data.name == "mixture":
        from distft.multitask import MixtureTask

        return MixtureTask
    return task_class_named(cfg.task.name)


def task_class_named(name: str) -> type:
    cls = TASKS.get(name)
    if cls is None:
        raise ConfigError(f"task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return cls


def build_task(cfg, data_cfg, tokenizer) -> Task:
    return task_class_named(cfg.name)(cfg, data_cfg, tokenizer)


def build_run_task(cfg, tokenizer) -> Task:
    """The task the loop trains: one dataset's, or a mixture's."""
    cls = task_class(cfg)
    if cls.name == "mixture":
        return cls(cfg, tokenizer)
    return cls(cfg.task, cfg.data, tokenizer)


__all__ = ["IGNORE", "LABEL", "NEXT_TOKENS", "PREDICTS", "TASKS", "TOKEN_LABELS", "Task", "build_run_task",
           "build_task", "task_class"]

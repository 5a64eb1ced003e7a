"""Multi-task learning: several datasets in one run (`data=mixture`).

Each member of `data.tasks` names its own data (merged over the top-level data settings),
its own task settings (merged over the top-level task) and a weight. Classification
members with different label sets share one encoder and get one head each; language-model
members (causal_lm / instruction) share the model's own LM head. The training order comes
from a mixture sampler (proportional to size, temperature-scaled, uniform, or explicit
weights), a pure function of (seed, epoch), so runs are deterministic and resume
mid-epoch; with several processes each global batch is split across ranks as for a single
dataset. Eval metrics are reported per task (`<task>/accuracy`) and as their mean.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from distft.config import DataConfig, TaskConfig
from distft.errors import ConfigError
from distft.tasks import IGNORE, TASKS, TOKEN_LABELS, Task, build_task

log = logging.getLogger(__name__)

SAMPLERS = ("proportional", "temperature", "uniform", "weights")
_MIXTURE_KEYS = ("tasks", "sampler", "temperature")


class Member:
    def __init__(self, name: str, data_cfg, task_cfg, weight: float):
        self.name, self.data_cfg, self.task_cfg, self.weight = name, data_cfg, task_cfg, weight


def members(cfg) -> List[Member]:
    """The mixture's members with their data and task configs merged over the top level's."""
    if not cfg.data.tasks:
        raise ConfigError("data=mixture: data.tasks is empty; give each task as "
                          "data.tasks.NAME.data.train=... (see conf/data/mixture_example.yaml)")
    top_data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _MIXTURE_KEYS}
    top_task = OmegaConf.to_container(cfg.task, resolve=True)
    out = []
    for name, spec in cfg.data.tasks.items():
        spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else spec
        unknown = set(spec) - {"data", "task", "weight", "train"}
        if unknown:
            raise ConfigError(f"data.tasks.{name}: unknown key(s) {sorted(unknown)}; use data, task, weight, train")
        data = {**top_data, "name": "files", **(spec.get("data") or {})}
        task = {**top_task, **(spec.get("task") or {})}
        try:
            data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), data)
            task_cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), task)
        except Exception as e:
            raise ConfigError(f"data.tasks.{name}: {e}".splitlines()[0]) from None
        if data_cfg.name == "mixture":
            raise ConfigError(f"data.tasks.{name}: a mixture cannot hold another mixture")
        weight = float(spec.get("weight", 1.0))
        if weight <= 0:
            raise ConfigError(f"data.tasks.{name}.weight={weight}: weights must be > 0")
        member = Member(str(name), data_cfg, task_cfg, weight)
        # train=false: the task is evaluated (and keeps its head) but not trained on, as
        # earlier stages are in sequential fine-tuning; a replay stage would set it true.
        member.train = bool(spec.get("train", True))
        out.append(member)
    if not any(m.train for m in out):
        raise ConfigError("data=mixture: every task has train=false; nothing to train on")
    for m in out:
        if m.task_cfg.name not in TASKS:
            raise ConfigError(f"data.tasks.{m.name}.task.name={m.task_cfg.name!r} is unknown")
        if m.data_cfg.packing:
            raise ConfigError(f"data.tasks.{m.name}: packing is not available inside a mixture")
    predicts = {TASKS[m.task_cfg.name].predicts for m in out}
    if len(predicts) > 1 and "next_tokens" in predicts:
        kinds = sorted({m.task_cfg.name for m in out})
        raise ConfigError(f"data=mixture: the tasks {kinds} need different models; a mixture is either "
                          "classification and token_classification tasks (one head each on a shared encoder) "
                          "or causal_lm/instruction tasks (the shared LM head)")
    if cfg.data.sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler={cfg.data.sampler!r}: choose one of {list(SAMPLERS)}")
    if cfg.data.sampler == "temperature" and cfg.data.temperature <= 0:
        raise ConfigError("data.temperature must be > 0")
    return out


def task_probabilities(sizes: Sequence[int], weights: Sequence[float], sampler: str, temperature: float):
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    if sampler == "proportional":
        p = sizes_t
    elif sampler == "temperature":  # T=1 proportional, T->inf uniform
        p = sizes_t ** (1.0 / temperature)
    elif sampler == "uniform":
        p = torch.ones_like(sizes_t)
    else:
        p = torch.tensor(weights, dtype=torch.float64)
    return (p / p.sum()).tolist()


class MixtureOrder:
    """The example order of each epoch: an epoch has as many draws as there are examples in
    all tasks; each draw picks a task with the sampler's probabilities and takes that
    task's next example from its own reshuffled stream (restarting it when used up, so an
    up-weighted small task repeats). Everything is seeded by (seed, epoch)."""

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int], probs: Sequence[float], seed: int):
        self.offsets, self.sizes, self.probs, self.seed = list(offsets), list(sizes), list(probs), seed
        self.total = sum(sizes)

    def __call__(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        picks = torch.multinomial(torch.tensor(self.probs), self.total, replacement=True, generator=g).tolist()
        streams: Dict[int, List[int]] = {}
        used = [0] * len(self.sizes)
        out = []
        for t in picks:
            if used[t] % self.sizes[t] == 0:
                streams[t] = torch.randperm(self.sizes[t], generator=g).tolist()
            out.append(self.offsets[t] + streams[t][used[t] % self.sizes[t]])
            used[t] += 1
        return out


class MixtureTask(Task):
    """Several datasets as one task: batches of examples from every member, each example's
    loss and metrics its own task's. Classification members share an encoder with one head
    each (the model brings its heads); language-model members share the LM head."""

    name = "mixture"
    sampler = "mixture"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg.task, cfg.data, tokenizer)
        self.run_cfg = cfg
        self.members = members(cfg)
        self.tasks: List[Task] = [build_task(m.task_cfg, m.data_cfg, tokenizer) for m in self.members]
        self.kinds = [t.predicts for t in self.tasks]
        self.predicts = mixture_predicts(self.kinds)
        # Any token-level member makes every head write [batch, length, labels] logits
        # (a sequence head at position 0), collated by `collate_mixed`.
        self.mixed = TOKEN_LABELS in self.kinds
        self.num_labels: List[Optional[int]] = [None] * len(self.members)
        self.sizes: List[int] = []
        self._stats_keys()
        self.metrics = self.metric_names(cfg)

    def _stats_keys(self) -> None:
        self.eval_stats_keys = tuple(f"{m.name}/{k}" for m, t in zip(self.members, self.tasks)
                                     for k in t.eval_stats_keys)

    @property
    def has_heads(self) -> bool:
        return self.predicts != "next_tokens"

    @classmethod
    def check(cls, cfg) -> None:
        for m in members(cfg):
            TASKS[m.task_cfg.name].check(cfg)

    @classmethod
    def metric_names(cls, cfg) -> tuple:
        """The metrics every member reports (averaged over members), then each member's own."""
        ms = members(cfg)
        own = [tuple(TASKS[m.task_cfg.name].metrics) for m in ms]
        common = tuple(k for k in own[0] if all(k in o for o in own))
        return common + tuple(f"{m.name}/{k}" for m, o in zip(ms, own) for k in o)

    @classmethod
    def info_for(cls, cfg):
        from distft.strategies.base import TaskInfo

        predicts = mixture_predicts([TASKS[m.task_cfg.name].predicts for m in members(cfg)])
        return TaskInfo(cls.name, None, predicts, own_heads=predicts != "next_tokens")

    def info(self, num_labels=None):
        from distft.strategies.base import TaskInfo

        return TaskInfo(self.name, None, self.predicts, own_heads=self.has_heads)

    def prepare(self, seed):
        return prepare_mixture(self.run_cfg, self, seed)

    def prepared(self, num_labels, report):
        self.num_labels = num_labels
        self.sizes = report["mixture"]["sizes"]
        lines = []
        for m, task, n in zip(self.members, self.tasks, num_labels):
            # each member takes what it needs of its own report (a tag set, ...)
            lines += [line.replace("data:", f"data {m.name}:", 1) for line in task.prepared(n, report[m.name])]
        self._stats_keys()
        return lines

    def build_model(self, model_cfg, tokenizer, num_labels, seed, source=None):
        if self.has_heads:
            return build_classifier(model_cfg, tokenizer, self.num_labels, self.cfg, seed, self.kinds, source)
        return super().build_model(model_cfg, tokenizer, None, seed, source)

    @property
    def exported_by_strategy(self) -> bool:
        return not self.has_heads  # one model per task, each with its own head

    def export(self, model, strategy, out_dir, base_dir):
        if self.has_heads:
            return export_classifier(model, self.members, out_dir, self.tokenizer, self.tokenizer.pad_token_id,
                                     self.tasks)
        return super().export(model, strategy, out_dir, base_dir)

    def order(self, seed):
        return mixture_order(self.run_cfg, self.members, self.sizes, seed)

    @property
    def model_inputs(self):
        return ("input_ids", "attention_mask", "task_ids") if self.has_heads else ("input_ids", "attention_mask")

    def collate(self, examples):
        if self.mixed:
            return collate_mixed(self, examples)
        batch = self.tasks[0].collate(examples)  # same fields for every member of a kind
        batch["task_ids"] = torch.tensor([e["task"] for e in examples], dtype=torch.long)
        return batch

    def _members_of(self, logits, batch):
        """(member index, its task, its rows' logits, its rows' batch) for each member in
        the batch; a mixed batch's fields and logits are cut to what that member's task reads."""
        for i, task in enumerate(self.tasks):
            rows = (batch["task_ids"] == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            sub = {k: v[rows] for k, v in batch.items()}
            own = logits[rows]
            if self.mixed:
                n = self.num_labels[i]
                if self.kinds[i] == TOKEN_LABELS:
                    sub["labels"] = sub.pop("token_labels")
                    own = own[:, :, :n]
                else:
                    own = own[:, 0, :n]
            yield i, task, own, sub

    def count_targets(self, batch):
        if self.mixed:
            return int((batch["labels"] != IGNORE).sum() + (batch["token_labels"] != IGNORE).sum())
        return self.tasks[0].count_targets(batch)

    def loss_sum(self, logits, batch):
        if self.mixed:
            return sum(task.loss_sum(own, sub) for _, task, own, sub in self._members_of(logits, batch))
        return self.tasks[0].loss_sum(logits, batch)

    def example_losses(self, logits, batch):
        if self.mixed:
            out = logits.new_zeros(logits.size(0), dtype=torch.float32)
            for i, task, own, sub in self._members_of(logits, batch):
                out[batch["task_ids"] == i] = task.example_losses(own, sub)
            return out
        return self.tasks[0].example_losses(logits, batch)

    def eval_stats(self, logits, batch):
        out = {}
        for i, task, own, sub in self._members_of(logits, batch):
            for k, v in task.eval_stats(own, sub).items():
                out[f"{self.members[i].name}/{k}"] = v
        return out

    def finish_eval(self, sums):
        metrics: Dict[str, float] = {}
        per_task = []
        for i, m in enumerate(self.members):
            own = {k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith(f"{m.name}/")}
            res = self.tasks[i].finish_eval(own)
            per_task.append(res)
            metrics.update({f"{m.name}/{k}": v for k, v in res.items()})
        for k in per_task[0]:  # the unweighted mean over tasks of what all report: each task counts the same
            if all(k in r for r in per_task):
                metrics[k] = sum(r[k] for r in per_task) / len(per_task)
        return metrics


def mixture_predicts(kinds) -> str:
    """What a mixture predicts as a whole: a language-model mixture next tokens; one of
    classification heads (sequence and/or token) labels, token labels only when all are."""
    if "next_tokens" in kinds:
        return "next_tokens"
    return TOKEN_LABELS if all(k == TOKEN_LABELS for k in kinds) else "label"


def collate_mixed(mixture: "MixtureTask", examples):
    """One batch of sequence and token examples: shared input_ids/attention_mask/task_ids;
    `labels` (one per row, IGNORE on token rows) and `token_labels`, `word_pos`,
    `word_tags` (IGNORE / -1 on sequence rows), each member's collate filling its own rows."""
    from distft.tasks.base import pad

    n = len(examples)
    input_ids = pad([e["input_ids"] for e in examples], mixture.tokenizer.pad_token_id)
    width = input_ids.size(1)
    words = max([len(e.get("word_pos", ())) for e in examples] + [1])
    batch = {"input_ids": input_ids, "attention_mask": torch.zeros_like(input_ids),
             "task_ids": torch.tensor([e["task"] for e in examples], dtype=torch.long),
             "labels": torch.full((n,), IGNORE, dtype=torch.long),
             "token_labels": torch.full((n, width), IGNORE, dtype=torch.long),
             "word_pos": torch.full((n, words), -1, dtype=torch.long),
             "word_tags": torch.full((n, words), IGNORE, dtype=torch.long)}
    for i, e in enumerate(examples):
        batch["attention_mask"][i, : len(e["input_ids"])] = 1
        if mixture.kinds[e["task"]] == TOKEN_LABELS:
            batch["token_labels"][i, : len(e["labels"])] = torch.tensor(e["labels"])
            batch["word_pos"][i, : len(e["word_pos"])] = torch.tensor(e["word_pos"])
            batch["word_tags"][i, : len(e["word_tags"])] = torch.tensor(e["word_tags"])
        else:
            batch["labels"][i] = e["label"]
    return batch


class MultiHeadClassifier(nn.Module):
    """One shared encoder, one head per task (dropout + linear on pooled features). The
    logits of a batch are padded to the largest label set; the classes a task does not
    have get -inf-like logits, so softmax, cross-entropy and argmax see only its own."""

    distft_heads = ("heads",)  # what every strategy trains besides its choice of the backbone

    def __init__(self, backbone: nn.Module, num_labels: Sequence[int], dropout: float, pooling: str,
                 kinds: Optional[Sequence[str]] = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.pooling = pooling
        # label: the head reads pooled features; token_labels: every position's hidden state.
        self.kinds = list(kinds or ["label"] * len(num_labels))
        self.per_token = TOKEN_LABELS in self.kinds
        width = backbone.config.hidden_size
        self.heads = nn.ModuleList([nn.Sequential(nn.Dropout(dropout), nn.Linear(width, n)) for n in num_labels])
        for head in self.heads:
            nn.init.normal_(head[1].weight, std=0.02)
            nn.init.zeros_(head[1].bias)
        self.num_labels = list(num_labels)

    def pool(self, hidden, attention_mask):
        from distft.features import pool

        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, task_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        if self.per_token:  # [batch, length, labels]; a sequence head writes position 0
            logits = hidden.new_full((*hidden.shape[:2], max(self.num_labels)), -1e4)
        else:
            logits = pooled.new_full((pooled.size(0), max(self.num_labels)), -1e4)
        for t, head in enumerate(self.heads):
            # Every head runs, on its rows or on none: a head absent from a batch still
            # joins the graph (with zero gradient), as DDP expects of every parameter.
            rows = (task_ids == t).nonzero().flatten()
            n = self.num_labels[t]
            if self.kinds[t] == TOKEN_LABELS:
                logits[rows, :, :n] = head(hidden[rows]).to(logits.dtype)
            elif self.per_token:
                logits[rows, 0, :n] = head(pooled[rows]).to(logits.dtype)
            else:
                logits[rows, :n] = head(pooled[rows]).to(logits.dtype)
        return SequenceClassifierOutput(logits=logits)


def build_classifier(model_cfg, tokenizer, num_labels: Sequence[int], task_cfg, seed: int, kinds=None,
                     source=None):
    """A shared pretrained encoder (the model's base, without its own head) and new heads;
    the run's strategy then decides what of the encoder trains (the heads always do)."""
    from distft.models.loading import load_model

    base = load_model(model_cfg, "label", tokenizer, num_labels[0], seed=seed, source=source).base_model
    torch.manual_seed(seed + 1)
    return MultiHeadClassifier(base, num_labels, task_cfg.head_dropout, task_cfg.pooling, kinds)


def export_classifier(model: MultiHeadClassifier, members_: List[Member], out_dir, tokenizer, pad_token_id,
                      tasks=None) -> list:
    """One model per task in final/<task>/, each a plain backbone + its head: a sequence
    task's loads with AutoModelForSequenceClassification (trust_remote_code: the head is
    distft's MlpHead), a token task's is a stock AutoModelForTokenClassification."""
    import copy
    import os

    from distft.models.head_model import MlpHeadConfig, MlpHeadForSequenceClassification

    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):  # LoRA: fold the adapters into a copy
        backbone = copy.deepcopy(backbone).merge_and_unload()
    written = []
    for i, (m, head, n) in enumerate(zip(members_, model.heads, model.num_labels)):
        folder = os.path.join(out_dir, m.name)
        if model.kinds[i] == TOKEN_LABELS:
            _export_token_member(backbone, head, n, tasks[i].label_names, folder, tokenizer)
            written.append(folder)
            continue
        config = MlpHeadConfig(backbone=backbone.config, head_hidden=[], head_dropout=head[0].p,
                               pooling=model.pooling, num_labels=n, pad_token_id=pad_token_id)
        single = MlpHeadForSequenceClassification(config, backbone=backbone)
        single.head.load_state_dict(head.state_dict())
        single.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        written.append(folder)
    return written


def _export_token_member(backbone, head, n: int, label_names, folder: str, tokenizer) -> None:
    """The shared encoder + a token task's head as the stock token-classification model of
    the backbone's architecture (its head is dropout + one linear, as here)."""
    from transformers import AutoModelForTokenClassification

    config = copy_config(backbone.config, num_labels=n, id2label=dict(enumerate(label_names)),
                         label2id={t: j for j, t in enumerate(label_names)}, classifier_dropout=head[0].p)
    single = AutoModelForTokenClassification.from_config(config)
    single.base_model.load_state_dict(backbone.state_dict())
    out = getattr(single, "classifier", None) or getattr(single, "score")
    with torch.no_grad():
        out.weight.copy_(head[1].weight)
        out.bias.copy_(head[1].bias)
    single.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def copy_config(config, **changes):
    import copy

    config = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(config, k, v)
    return config


def prepare_mixture(cfg, mixture: MixtureTask, seed: int):
    """Every member prepared as a run of its own would be; examples tagged with their task."""
    from distft.data.prepare import prepare

    train, val, reports = [], [], {}
    sizes = []
    for i, (m, task) in enumerate(zip(mixture.members, mixture.tasks)):
        tr, va, n_labels, report = prepare(m.data_cfg, task, seed)
        for e in tr:
            e["task"] = i
        for e in va:
            e["task"] = i
        mixture.num_labels[i] = n_labels
        sizes.append(len(tr) if m.train else 0)
        if m.train:
            train += tr
        val += va
        reports[m.name] = report
    reports["mixture"] = {"sizes": sizes, "num_labels": mixture.num_labels}
    return train, val, mixture.num_labels, reports


def mixture_order(cfg, members_: List[Member], sizes: Sequence[int], seed: int) -> MixtureOrder:
    """The sampler over the trained members (sizes 0 are evaluation-only members)."""
    trained = [(m, n, sum(sizes[:i])) for i, (m, n) in enumerate(zip(members_, sizes)) if m.train]
    probs = task_probabilities([n for _, n, _ in trained], [m.weight for m, _, _ in trained],
                               cfg.data.sampler, cfg.data.temperature)
    log.info("mixture: %s", ", ".join(f"{m.name} {n} examples, p={p:.3f}" for (m, n, _), p in zip(trained, probs)))
    return MixtureOrder([o for _, _, o in trained], [n for _, n, _ in trained], probs, seed)

"""The training recipe: setup -> train -> export, readable top to bottom.

Everything a run does is in this file's order; the parts it calls (task, strategy,
backend, checkpoint, metrics) are small modules with one interface each.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hydra.utils import instantiate

from distft import checkpoint as ckpt
from distft import chunked_loss
from distft.backends import build_backend
from distft.backends import supports as backend_supports
from distft.card import write_cards
from distft.config import validate_schema
from distft import precision as precisions
from distft import preemption
from distft import schedules
from distft.data.cache import cache_key, prepared_once
from distft.errors import ConfigError, DistftError
from distft.memory import (MMAP_THRESHOLD, allocator_in_use, peak_rss_bytes, release_freed_memory, reset_peak_rss,
                           rss_bytes, trim_freed_memory)
from distft.metrics import MetricsLogger
from distft.models import load_tokenizer
from distft.models import lazy, lean, matmul_attention
from distft.models.loading import parameter_bytes_on_meta, resolve_model_path
from distft.privacy import PRIVACY
from distft.registry import import_plugins
from distft.regularizers import REGULARIZERS
from distft.samplers import SAMPLERS, EpochBatches
from distft.strategies import build_strategy, count_parameters
from distft.strategies.base import find_layer_stack
from distft.tasks import build_run_task, task_class

log = logging.getLogger("distft")



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DivergedError(DistftError):
    """Training stopped: too many steps in a row with a non-finite loss or gradient."""


class Components:
    """The loop's pluggable parts, built from config (distft/registry.py): what samples
    the batches, what is added to the loss, what makes training private. The checkpoint
    holds each one's state under its name."""

    def __init__(self, cfg):
        task_cls = task_class(cfg)
        self.privacy = PRIVACY.build(cfg.privacy)
        self.regularizer = REGULARIZERS.build(cfg.regularizer)
        self.sampler = SAMPLERS.get(self.privacy.sampler(task_cls.sampler))(cfg)

    def items(self):
        return (("sampler", self.sampler), ("regularizer", self.regularizer), ("privacy", self.privacy))

    def check(self, cfg) -> None:
        for _, component in self.items():
            component.check(cfg)

    def setup(self, run) -> None:
        for _, component in self.items():
            component.setup(run)

    def state_dict(self) -> Dict:
        return {name: component.state_dict() for name, component in self.items()}

    def load_state_dict(self, state: Dict) -> None:
        # Privacy first: it refuses a checkpoint of other privacy settings before the
        # sampler reads a position it does not understand.
        for name, component in reversed(self.items()):
            component.load_state_dict(state.get(name, {}))


def check_config(cfg) -> Components:
    """Refuse impossible combinations before any data is read or model is built: the
    trainer's own settings here, the rest by each part (task, strategy, backend,
    components) through its `check`. Returns the components, built."""
    validate_schema(cfg)
    import_plugins(cfg.plugins)
    t = cfg.trainer
    if t.batch_size < 1 or t.grad_accum < 1 or (t.eval_batch_size is not None and t.eval_batch_size < 1):
        raise ConfigError("trainer.batch_size, trainer.grad_accum and trainer.eval_batch_size must be >= 1")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        raise ConfigError("trainer.max_steps must be > 0, or -1 with trainer.epochs > 0")
    schedules.check(cfg.scheduler)
    if t.loss_chunk_size < 0:
        raise ConfigError("trainer.loss_chunk_size must be >= 0 (0 computes all logits at once)")
    if t.max_bad_steps < 1:
        raise ConfigError("trainer.max_bad_steps must be >= 1")
    if t.lean_dropout_rng not in ("fast", "torch"):
        raise ConfigError(f"trainer.lean_dropout_rng={t.lean_dropout_rng!r}: choose fast or torch")
    if t.cpu_attention not in ("matmul", "flash"):
        raise ConfigError(f"trainer.cpu_attention={t.cpu_attention!r}: choose matmul or flash")
    if t.cpu_elementwise not in ("compiled", "eager"):
        raise ConfigError(f"trainer.cpu_elementwise={t.cpu_elementwise!r}: choose compiled or eager")
    if "_target_" not in cfg.optimizer:
        raise ConfigError("optimizer: the node needs _target_ (the optimizer class, e.g. torch.optim.AdamW)")
    precisions.resolve(t.precision)  # an unknown choice, or fp16 without a GPU, is refused here
    if t.compile and not backend_supports(cfg.backend.name, "compile"):
        raise ConfigError(f"trainer.compile=true with backend={cfg.backend.name}: ZeRO-3 gathers "
                          "each block's parameters in hooks that make compiled blocks recompile until torch gives "
                          "up and runs them eager; use backend=fsdp or zero2 with compile, or zero3 without it")
    preemption.parse_signals(list(t.stop_signals))
    if cfg.model.get("sharded_loading", "auto") not in ("auto", "on", "off"):
        raise ConfigError(f"model.sharded_loading={cfg.model.sharded_loading!r}: choose auto, on or off")
    if cfg.logger.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode={cfg.logger.wandb.mode!r}: choose offline, online or disabled")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume}: expected auto, never or a checkpoint folder")
    task_cls = task_class(cfg)
    task_cls.check(cfg)
    metrics = task_cls.metric_names(cfg)
    if cfg.task.metric not in metrics:
        raise ConfigError(f"task.metric={cfg.task.metric!r} is not computed by task={cfg.task.name}; "
                          f"choose one of {list(metrics)}")
    build_strategy(cfg.strategy).check(task_cls.info_for(cfg))
    components = Components(cfg)
    components.check(cfg)
    return components


def _init_from(model, folder: str) -> None:
    """Load an earlier run's trainable weights into `model` by name; parameters the file
    lacks (a new head) keep their fresh init, and anything that does not fit is an error."""
    path = Path(folder) / "weights.safetensors"
    if not path.is_file():
        raise ConfigError(f"init_from={folder}: no weights.safetensors there (give a checkpoint folder or best/)")
    weights = load_file(str(path))
    params = dict(model.named_parameters())
    for name, tensor in weights.items():
        if name not in params:
            raise ConfigError(f"init_from={folder}: {name} is not a parameter of this model "
                              "(another model or strategy?)")
        if params[name].shape != tensor.shape:
            raise ConfigError(f"init_from={folder}: {name} has shape {tuple(tensor.shape)}, "
                              f"this model's is {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    fresh = [n for n, p in params.items() if p.requires_grad and n not in weights]
    log.info("init_from %s: %d tensors loaded; %d trainable tensors start fresh%s", folder, len(weights), len(fresh),
             f" ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})" if fresh else "")


class Trainer:
    def __init__(self, cfg, teardown: bool = True):
        self.cfg = cfg
        self.teardown = teardown  # False: the caller (a recipe) calls close() when done
        # on_eval hooks: (step, metrics) -> True to stop the run. The first keeps the best
        # weights and decides early stopping; a search adds its pruner (add_eval_hook).
        self.eval_hooks = [self._track_best]
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.last_eval: Optional[tuple[int, Dict[str, float]]] = None
        self._held_frozen = 0  # frozen parameters held in bf16 (Precision.hold_frozen)
        self._empty_positions: Optional[torch.Tensor] = None  # logits_to_keep of the chunked loss's forwards
        self.peak_memory_mb = 0.0
        self._agree_calls = None  # the chunked loss's agreement on output-layer calls (sharded parameters)
        self._peak_rss = False  # CPU: the kernel's high-water mark of the resident set is usable
        self.stop_reason: Optional[str] = None  # why the run ended before max_steps, when it did

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg, t = self.cfg, self.cfg.trainer
        self.components = check_config(cfg)
        # From here on SIGUSR1/SIGTERM mean "stop after this step with a checkpoint"
        # (a signal during setup stops the run after its first step).
        self.stop = preemption.StopRequest(preemption.parse_signals(list(t.stop_signals))).install()
        if t.threads:
            torch.set_num_threads(t.threads)
        self.freed_memory_released = bool(t.release_freed_memory) and release_freed_memory()
        # Decided once; the loop's autocast and the backends' mixed precision follow it.
        self.precision = precisions.resolve(t.precision)
        self.backend = build_backend(cfg.backend, t, self.precision)
        self.backend.setup()
        self.device = self.backend.device
        self.backend.scaler = self.backend.grad_scaler()  # fp16 only
        self.main = self.backend.is_main
        if self.main:
            allocator = allocator_in_use()
            log.info("memory allocator: %s%s", allocator,
                     f" (glibc; freed blocks over {MMAP_THRESHOLD // 1024} KiB go back to the OS)"
                     if self.freed_memory_released else "")
            if allocator == "system" and self.device.type == "cpu":
                # bench/ab.py malloc system tcmalloc: 2.6x the tokens/s (README, Speed and memory).
                log.info("on CPU, tcmalloc trained SmolLM2 LoRA 1.6-2.6x faster than glibc's malloc on an Intel "
                         "Xeon with AMX: the launchers (scripts/train.sh, launch/*.sh, slurm/) preload it when it "
                         "is installed (apt-get install libtcmalloc-minimal4; launch/malloc.sh)")
            precisions.report(self.precision, self.device.type)
        # Each rank composed its own config; a default run_dir holds a timestamp that may
        # differ between ranks, so all take rank 0's.
        cfg.run_dir = self.backend.broadcast_object(str(cfg.run_dir))
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"

        # Existing outputs are never overwritten by accident: a finished run is only
        # continued from an explicitly named checkpoint, and resume=never refuses a
        # folder that already holds a run's checkpoints or metrics.
        if cfg.resume in ("auto", "never") and (self.run_dir / "summary.json").exists():
            raise ConfigError(
                f"run_dir={self.run_dir} already holds a finished run; choose another run_dir "
                "(or resume=<one of its checkpoints> to continue it)"
            )
        if cfg.resume == "never" and (ckpt.list_checkpoints(self.ckpt_root) or (self.run_dir / "metrics.jsonl").exists()):
            raise ConfigError(
                f"run_dir={self.run_dir} holds an earlier run; use resume=auto to continue it or another run_dir"
            )
        resume_from = ckpt.find_resume_checkpoint(cfg.resume, self.ckpt_root)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backend.barrier()  # every rank has looked for run_dir's state before it changes
        if self.main:
            preemption.clear_marker(self.run_dir)
        seed_everything(cfg.seed)

        # Data first: a bad file stops the run before minutes of model loading.
        self.tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
        self.task = build_run_task(cfg, self.tokenizer)
        folder = None
        if cfg.data.cache_dir:
            folder = Path(cfg.data.cache_dir).expanduser() / cache_key(cfg.data, cfg.task, self.tokenizer, cfg.seed)
        (self.train_examples, self.val_examples, num_labels, report), hit = prepared_once(
            folder, lambda: self.task.prepare(cfg.seed), self.backend)
        self.num_labels = num_labels
        cached = f" (cached in {folder})" if hit else ""
        for line in self.task.prepared(num_labels, report):
            log.info("%s%s", line, cached)
        if self.main:
            (self.run_dir / "data_report.json").write_text(json.dumps(report, indent=2))

        # Model, then the strategy decides what trains.
        self.strategy = build_strategy(cfg.strategy)
        source = self._weights_source(num_labels)
        model = self.task.build_model(cfg.model, self.tokenizer, num_labels, cfg.seed, source=source)
        if source is not None and source.temporary:
            self.backend.barrier()  # every process has mapped the child's files: they can go
            if self.main:
                shutil.rmtree(source.folder, ignore_errors=True)
        self.base_dir = self._save_base_if_needed(model)
        model = self.strategy.apply(model, self.task.info(num_labels))
        if cfg.init_from:
            _init_from(model, cfg.init_from)
        lean_applies = t.lean_activations and not self.components.privacy.per_example
        if t.frozen_in_bf16 and self.backend.supports("low_precision_frozen"):
            # With lean activations (whose norms keep bf16 inputs) the frozen norms and
            # embeddings too: a bf16 residual stream.
            n = self._held_frozen = self.precision.hold_frozen(model, stream=t.bf16_stream and lean_applies)
            if n:
                log.info("frozen weights held in bf16: %s parameters (trainable ones stay fp32)", f"{n:,}")
        bf16_stream = any(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Embedding))
        if bf16_stream:
            log.info("the residual stream between layers is bf16 (its embeddings are)")
        # The CPU paths measured to pay in bf16 training only: compiled element-wise kernels
        # (not inside blocks that trainer.compile compiles whole) and the matmul attention.
        bf16_on_cpu = self.device.type == "cpu" and self.precision.name == "bf16"
        if t.lean_activations and self.components.privacy.per_example:
            log.info("lean activations off: privacy=%s takes per-example gradients from each layer's input",
                     cfg.privacy.name)
        elif lean_applies:
            compiled = t.cpu_elementwise == "compiled" and bf16_on_cpu and not t.compile
            for line in lean.apply(model, t.lean_dropout_rng, norms=bf16_stream, compiled=compiled):
                log.info("lean activations: %s", line)
        if t.cpu_attention == "matmul" and bf16_on_cpu and (n := matmul_attention.mark(model)):
            log.info("attention: bf16 training on CPU by matmuls, probabilities kept, up to %d keys "
                     "(%d attention modules; trainer.cpu_attention=flash for SDPA's flash kernel)",
                     matmul_attention.MAX_KEYS, n)
        if t.activation_checkpointing:
            _enable_activation_checkpointing(model)
        if t.compile:
            _compile_blocks(model)
        self.trainable, self.total = count_parameters(model)
        log.info(
            "strategy %s: %s of %s parameters trainable (%.2f%%)",
            self.strategy.name, f"{self.trainable:,}", f"{self.total:,}", 100 * self.trainable / self.total,
        )
        model.to(self.device)

        # The sampler, the regularizer and privacy see the data, the model and the backend;
        # privacy then decorates the model and the optimizer before the backend wraps them.
        self.sampler = self.components.sampler
        self.regularizer = self.components.regularizer
        self.privacy = self.components.privacy
        self.model = model  # unwrapped until the backend wraps it below
        self.components.setup(self)
        model = self.privacy.wrap_model(model)
        self.trainable = count_parameters(self.model)[0]  # privacy freezes weights the loss never reads
        self.max_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * self.sampler.steps_per_epoch))
        if resume_from is not None:
            # Before wrapping: a backend may need to convert the checkpoint's sharded state
            # for another process count, and configure itself to load it.
            written_by = ckpt.check_resumable(resume_from, ckpt.read_state(resume_from),
                                              world_size=self.backend.world_size, batch_size=t.batch_size,
                                              grad_accum=t.grad_accum, state_format=self.backend.state_format)
            self.backend.prepare_resume(resume_from, written_by, self.ckpt_root / f".resharded-{resume_from.name}")
        self.model, self.optimizer = self.backend.wrap(
            model, self.privacy.optimizer_factory(lambda m: build_optimizer(cfg.optimizer, m, t.weight_decay,
                                                                             t.head_lr)))
        self.scheduler = schedules.build_scheduler(cfg.scheduler, self.backend.scheduled_optimizer(self.optimizer),
                                                  self.max_steps)
        self.tap = self._chunked_loss_tap()

        # Where we are: a fresh start or a checkpoint.
        self.state = {"best_metric": None, "best_step": None, "bad_evals": 0, "tokens": 0, "train_seconds": 0.0,
                      "bad_steps": 0, "skipped_steps": 0}
        self.step = 0
        if resume_from is not None:
            weights, optim, sched, state = ckpt.read_checkpoint(resume_from, self.backend.rank, cfg.seed)
            self.backend.load_sharded_state(self.model, resume_from)
            self.backend.load_trainable_state(self.model, weights, str(resume_from))
            if optim is not None:
                self.backend.load_optimizer_state(self.model, self.optimizer, optim)
            self.scheduler.load_state_dict(sched)
            scaler_state = state.pop("grad_scaler", None)
            if scaler_state and self.backend.scaler is not None:
                self.backend.scaler.load_state_dict(scaler_state)
            components = state.pop("components", None)
            if components is None:  # written before components: the data position was the trainer's
                components = {"sampler": {"epoch": state.pop("epoch"), "batch": state.pop("batch")}}
            self.components.load_state_dict(components)
            self.state.update(state)
            self.step = self.state.pop("step")
            log.info("resumed from %s (step %d%s)", resume_from, self.step,
                     "" if written_by == self.backend.world_size
                     else f", written by {written_by} process(es), continued on {self.backend.world_size}")
        self.metrics = MetricsLogger(
            cfg.logger, self.run_dir, self.main, OmegaConf.to_container(cfg, resolve=True)
        )
        if self.main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.metrics.start(self.step if resume_from is not None else None)
        return self

    def _chunked_loss_tap(self):
        """The hidden-state tap of the chunked language-model loss, or None for full logits."""
        if not self.cfg.trainer.loss_chunk_size or not hasattr(self.task, "loss_sum_hidden"):
            return None
        if self.privacy.per_example:
            log.info("loss from full logits: per-example losses (privacy=%s)", self.cfg.privacy.name)
            return None
        reason = chunked_loss.why_not(self.model, self.backend.name)
        if reason:
            log.info("loss from full logits: %s", reason)
            return None
        log.info("loss in chunks of %d target tokens, without full logits", self.cfg.trainer.loss_chunk_size)
        tap = chunked_loss.HiddenStateTap(self.model)
        self.backend.call_outside_forward(self.model, tap.head)
        # Where parameters are sharded, each call of the output layer is a collective: the
        # ranks agree on how many calls each makes (the largest of their counts).
        if self.backend.supports("sharded_params"):
            self._agree_calls = lambda calls: int(self.backend.all_reduce_max([calls])[0])
        return tap

    def _weights_source(self, num_labels):
        """Sharded loading (distft.models.lazy) under a backend that shards parameters:
        where each process maps the weights from, or None to load whole as usual."""
        cfg = self.cfg
        if not self.backend.supports("sharded_params"):
            return None
        mixture = isinstance(num_labels, (list, tuple))  # a head per task, built around the backbone here
        size = None
        if cfg.model.from_config is not None:  # (the backbone's size; a mixture's heads are small beside it)
            size = parameter_bytes_on_meta(cfg.model, self.task.predicts, self.tokenizer,
                                           None if mixture else num_labels)
        how = lazy.plan_source(cfg.model, size)
        if how == "whole" or (how == "child" and (mixture or self.task.predicts not in lazy.BUILT_IN_CHILD)):
            return None
        if how == "file":
            log.info("sharded loading: each process maps %s and keeps its shard", resolve_model_path(cfg.model))
            return lazy.WeightsSource(resolve_model_path(cfg.model))
        folder = self.run_dir / ".sharded_load"
        if self.main:
            log.info("sharded loading: building the model once in a child process (written to %s)", folder)
            lazy.build_in_child(folder, cfg.model, self.task.predicts, num_labels, cfg.seed,
                                getattr(self.task, "label_names", None))
        self.backend.barrier()
        return lazy.source_in(folder, temporary=True)

    def _save_base_if_needed(self, model) -> Optional[str]:
        """Adapters need their base weights on disk to load without distft. A model built
        from a config or converted from GGUF has none, so keep a copy in the run dir."""
        cfg = self.cfg
        if not (self.strategy.exports_adapter and self.task.exported_by_strategy):
            return None
        if cfg.model.from_config is None and not cfg.model.gguf_file:
            return resolve_model_path(cfg.model)
        base = self.run_dir / "base_model"
        if self.main and not (base / "config.json").exists():
            tmp = ckpt.atomic_dir(base)
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            ckpt.commit_dir(tmp, base)
        return str(base)

    # ------------------------------------------------------------------ train
    def _to_device(self, batch):
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        return self.precision.autocast(self.device.type)

    def _forward(self, batch):
        inputs = self.task.model_kwargs(batch)
        with self._autocast():
            return self.model(**inputs).logits

    def _loss_sum(self, batch) -> torch.Tensor:
        if self.tap is None:
            return self.task.loss_sum(self._forward(batch), batch)
        with self._autocast():
            # The model computes no logits (it keeps an empty list of positions); the loss
            # comes from the hidden states, a chunk of target rows at a time.
            self.model(**self.task.model_kwargs(batch), logits_to_keep=self._no_positions())
            return self.task.loss_sum_hidden(self.tap.take(), self.tap.head, batch, self.cfg.trainer.loss_chunk_size,
                                             self._agree_calls)

    def _no_positions(self) -> torch.Tensor:
        """`logits_to_keep` for a forward whose loss the chunked loss computes: no position.
        With 1 (the last one) the output layer still ran on 8 rows, and on a non-contiguous
        slice of them that made torch's matmul copy its weight once per row (a bf16 tied
        embedding: 8 x 49,152 x 576 values, 0.27 s a SmolLM2 step on 2 CPU cores)."""
        if self._empty_positions is None:  # made once, not at every forward
            self._empty_positions = torch.empty(0, dtype=torch.long, device=self.device)
        return self._empty_positions

    def _eval_stats(self, batch) -> Dict[str, float]:
        if self.tap is None:
            return self.task.eval_stats(self._forward(batch), batch)
        with self._autocast():
            self.model(**self.task.model_kwargs(batch), logits_to_keep=self._no_positions())
            return self.task.eval_stats_hidden(self.tap.take(), self.tap.head, batch, self.cfg.trainer.loss_chunk_size,
                                               self._agree_calls)

    def train(self) -> Dict:
        cfg, t = self.cfg, self.cfg.trainer
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (self.main and cfg.logger.progress_bar),
                   desc="train", dynamic_ncols=True)
        stopped_early = False
        if t.eval_before_training and self.step == 0 and self.val_examples:
            # The starting point, for a "before" number beside the "after" ones.
            metrics = self.evaluate()
            self.state["before"] = metrics  # checkpointed: a resumed run still reports it
            self.metrics.log({"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}})
            if self.main:
                bar.write("step 0: " + self._console(metrics))
        # Training's peak, not loading's.
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak_rss = reset_peak_rss()
        self.model.train()
        while self.step < self.max_steps and not stopped_early:
            reason = self.privacy.stop_reason()
            if reason:  # e.g. a spent privacy budget: end here, with a checkpoint
                if self.main:
                    bar.write(f"step {self.step}: stopping: {reason}")
                    log.warning("stopping at step %d: %s", self.step, reason)
                self.stop_reason = reason
                stopped_early = True
                if self.step and not (t.save_every and self.step % t.save_every == 0):
                    self.save_checkpoint()  # (unless this step's was just written)
                break
            started = time.perf_counter()
            micro = [self.task.collate([self.train_examples[i] for i in idx]) for idx in self.sampler.next_step()]
            # Normalise by the targets of the whole optimizer step over all processes, not
            # per micro-batch, so accumulation and N processes give the gradient of one
            # large batch.
            # Under DP the unit is the example: the objective sums per-example losses.
            per_example = self.privacy.per_example
            local_rows = sum(len(mb["input_ids"]) for mb in micro)
            local_targets = local_rows if per_example else sum(self.task.count_targets(mb) for mb in micro)
            local_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
            local_padded = sum(mb["input_ids"].numel() for mb in micro)
            n_targets, tokens, padded, rows = self.backend.all_reduce_sum(
                [local_targets, local_tokens, local_padded, local_rows])
            n_targets = max(n_targets, 1.0)
            loss_sum = torch.zeros((), device=self.device)
            penalty = None
            for i, mb in enumerate(micro):
                mb = self._to_device(mb)
                last_micro = i == len(micro) - 1
                if per_example:
                    # Privacy clips each example's gradient in its own backward (no
                    # regularizer under it: refused at config time).
                    losses = self.task.example_losses(self._forward(mb), mb)
                    loss_sum += losses.detach().sum()
                    self.privacy.backward(losses, self.optimizer, last_micro)
                    continue
                loss = self._loss_sum(mb)
                loss_sum += loss.detach()
                objective = loss / n_targets
                if last_micro:
                    # Once per step, with the last micro-batch: each rank adds R / N, and the
                    # backend's exchange (which sums the ranks' normalised losses) makes it R.
                    penalty = self.regularizer.penalty(self.model, self.backend.unwrap(self.model))
                    if penalty is not None:
                        objective = objective + penalty / self.backend.world_size
                self.backend.backward(objective, sync=last_micro)
            self._sample_memory()  # gradients are held now
            # The stop request rides on the loss all-reduce: every rank learns of a signal
            # any rank received at the same step, and of a non-finite loss on any rank.
            loss_total, stop_votes = self.backend.all_reduce_sum([float(loss_sum), float(self.stop.received is not None)])
            loss_value = loss_total / n_targets
            grad_norm, stepped = self.backend.step(self.model, self.optimizer, t.max_grad_norm,
                                                   skip=not math.isfinite(loss_value))
            self._sample_memory()  # optimizer state now exists
            if self.freed_memory_released and self.device.type == "cpu":
                trim_freed_memory()  # the step's small freed blocks: their pages back to the OS
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.step += 1
            step_seconds = time.perf_counter() - started
            self.state["tokens"] += int(tokens)
            self.state["train_seconds"] += step_seconds
            # fp16's scaler skips overflowing steps while it calibrates: skipped, not bad.
            bad = not math.isfinite(loss_value) or (not stepped and not self.backend.scales_loss)
            self.state["bad_steps"] = self.state["bad_steps"] + 1 if bad else 0
            self.state["skipped_steps"] += 0 if stepped else 1

            event = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "step_seconds": step_seconds,
                     "tokens": int(tokens), "padded_tokens": int(padded), "rows": int(rows),
                     "epoch": self.sampler.epoch_progress(),
                     "skipped_steps": self.state["skipped_steps"]}
            if per_example:  # the unclipped gradient's norm is not private: not logged
                del event["grad_norm"]
            if penalty is not None:
                event["penalty"] = float(penalty.detach())
            if self.backend.scaler is not None:
                event["loss_scale"] = float(self.backend.scaler.get_scale())
            if self.step % cfg.logger.log_every == 0 or self.step == self.max_steps or bad:
                self.metrics.log(event)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if bad:
                self._bad_step(bar, loss_value, grad_norm)

            last = self.step == self.max_steps
            if (t.eval_every and self.step % t.eval_every == 0) or last:
                stopped_early = self._eval_and_track(bar)
            preempted = stop_votes > 0 and not last and not stopped_early
            if (t.save_every and self.step % t.save_every == 0) or last or stopped_early or preempted:
                self.save_checkpoint()
            if preempted:
                bar.close()
                return self.preempted()
        bar.close()
        return self.finish(stopped_early)

    def _bad_step(self, bar, loss: float, grad_norm: float) -> None:
        """A step with a non-finite loss or gradient norm was skipped (weights and optimizer
        state untouched). A run of them means the run diverged: stop, pointing at the
        newest checkpoint, which holds weights of before the run of bad steps."""
        n, limit = self.state["bad_steps"], self.cfg.trainer.max_bad_steps
        if self.main:
            bar.write(f"step {self.step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite, optimizer "
                      f"step skipped ({n} in a row; the run stops at trainer.max_bad_steps={limit})")
        if n < limit:
            return
        bar.close()
        found = ckpt.list_checkpoints(self.ckpt_root)
        newest = f"the newest checkpoint, {found[max(found)]}, holds finite weights" if found else "no checkpoint was written"
        self.metrics.finish({"stopped_at_step": self.step, "reason": "non-finite loss or gradient"})
        self.stop.restore()
        raise DivergedError(
            f"steps {self.step - n + 1}..{self.step}: {n} optimizer steps in a row had a non-finite loss or "
            f"gradient norm (trainer.max_bad_steps={limit}); stopped without saving. {newest}; lower trainer.lr, "
            "check the data, or use trainer.precision=fp32/bf16 instead of fp16")

    def preempted(self) -> Dict:
        """Leave after a stop signal: the checkpoint of this step is written; say so in
        preempted.json (the sbatch scripts requeue on it) and hand the process back."""
        received = [name for name in self.backend.gather_object(self.stop.received) if name]  # every rank
        signal_name = received[0] if received else "a stop signal"
        checkpoint = ckpt.checkpoint_dir(self.ckpt_root, self.step)
        summary = {"preempted": True, "signal": signal_name, "steps": self.step, "max_steps": self.max_steps,
                   "checkpoint": str(checkpoint), "run_dir": str(self.run_dir)}
        if self.main:
            preemption.write_marker(self.run_dir, self.step, signal_name, checkpoint)
            log.warning("stopped by %s after step %d of %d; checkpoint %s. Run the same command again "
                        "(resume=auto) to continue.", signal_name, self.step, self.max_steps, checkpoint)
        self.metrics.finish({"preempted_at_step": self.step})
        self.stop.restore()
        if self.teardown:
            self.close()
        return summary

    def _sample_memory(self) -> None:
        """Peak memory of this process during training: on GPU the allocator's peak, on CPU
        the resident set's high-water mark since training began (activations and the
        optimizer's temporaries included), or where the kernel cannot reset that mark the
        resident set sampled after backward and after the optimizer step."""
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            now = max(rss_bytes(), peak_rss_bytes() if self._peak_rss else 0) / 2**20
        self.peak_memory_mb = max(self.peak_memory_mb, now)

    def add_eval_hook(self, hook) -> None:
        """`hook(step, metrics)` runs after every evaluation; returning True stops the run
        (as early stopping does), raising stops it with that error."""
        self.eval_hooks.append(hook)

    def _eval_and_track(self, bar) -> bool:
        """Evaluate, log, and run the on_eval hooks; True when one of them stops the run."""
        metrics = self.evaluate()
        self.metrics.log({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}, **self.privacy.metrics()})
        self.last_eval = (self.step, metrics)
        if self.main:
            bar.write(f"step {self.step}: " + self._console(metrics))
        stop = False
        for hook in self.eval_hooks:
            stop = bool(hook(self.step, metrics)) or stop
        return stop

    def _track_best(self, step: int, metrics: Dict[str, float]) -> bool:
        """Keep the best weights; say whether early stopping fires."""
        t = self.cfg.trainer
        name = self.cfg.task.metric
        value = metrics[name]
        best = self.state["best_metric"]
        sign = 1.0 if self.cfg.task.greater_is_better else -1.0
        if best is None or sign * (value - best) > t.early_stopping.min_delta:
            self.state.update(best_metric=value, best_step=step, bad_evals=0)
            self._save_best()
            return False
        self.state["bad_evals"] += 1
        patience = t.early_stopping.patience
        if patience and self.state["bad_evals"] >= patience:
            self.stop_reason = f"early stopping: eval/{name} has not improved for {patience} evals"
            if self.main:
                log.info("early stopping at step %d: eval/%s has not improved for %d evals (best %.4f at step %s)",
                         step, name, patience, best, self.state["best_step"])
            return True
        return False

    def _console(self, metrics: Dict[str, float]) -> str:
        """The eval line: the task's named metrics (per-type breakdowns stay in the metrics file)."""
        shown = {k: v for k, v in metrics.items() if k in self.task.metrics} or metrics
        return "  ".join(f"eval/{k}={v:.4f}" for k, v in shown.items())

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.model.eval()
        sums: Dict[str, float] = {}
        bs = self.cfg.trainer.eval_batch_size or self.cfg.trainer.batch_size
        mine = self.val_examples[self.backend.rank :: self.backend.world_size]
        for i in range(0, len(mine), bs):
            batch = self._to_device(self.task.collate(mine[i : i + bs]))
            for k, v in self._eval_stats(batch).items():
                sums[k] = sums.get(k, 0.0) + v
        self.backend.after_eval(self.model)
        self.model.train()
        keys = sorted(self.task.eval_stats_keys)
        totals = self.backend.all_reduce_sum([sums.get(k, 0.0) for k in keys])
        return self.task.finish_eval(dict(zip(keys, totals)))

    def _save_best(self) -> None:
        weights = self.backend.trainable_state(self.model)  # every rank: may gather shards
        if self.main:
            best = self.run_dir / "best"
            tmp = ckpt.atomic_dir(best)
            save_file(weights, str(tmp / "weights.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "metric": self.state["best_metric"]}))
            ckpt.commit_dir(tmp, best)

    def _unsharded_replica(self, full_state: Dict[str, torch.Tensor]):
        """A plain copy of the trained model, for exporting from a sharding backend: the
        same loader and strategy (deterministic), then the gathered weights."""
        cfg = self.cfg
        replica = self.task.build_model(cfg.model, self.tokenizer, self.num_labels, cfg.seed)
        replica = build_strategy(cfg.strategy).apply(replica, self.task.info(self.num_labels))
        replica.load_state_dict(full_state)
        return replica

    def save_checkpoint(self) -> None:
        """Every rank takes part (gathering is collective, a sharding backend adds its own
        files); rank 0 writes the rest and renames the folder into place."""
        final = ckpt.checkpoint_dir(self.ckpt_root, self.step)
        if self.main:
            ckpt.atomic_dir(final)
        self.backend.barrier()
        rng = self.backend.gather_object(ckpt.rng_state())
        weights = self.backend.trainable_state(self.model)
        optim = self.backend.optimizer_state(self.model, self.optimizer)
        self.backend.save_sharded_state(self.model, ckpt.tmp_dir_of(final))
        self.backend.barrier()
        if self.main:
            ckpt.write_checkpoint(final, self.step, weights, optim, self.scheduler.state_dict(),
                                  {**self.state, "components": self.components.state_dict(),
                                   "grad_scaler": self.backend.scaler.state_dict() if self.backend.scaler else None,
                                   "world_size": self.backend.world_size,
                                   "global_micro_batch": self.cfg.trainer.batch_size * self.backend.world_size,
                                   "grad_accum": self.cfg.trainer.grad_accum,
                                   "state_format": self.backend.state_format}, rng,
                                  self.cfg.trainer.keep_checkpoints)
        self.backend.barrier()

    # ------------------------------------------------------------------ finish
    def finish(self, stopped_early: bool) -> Dict:
        cfg = self.cfg
        model = self.backend.unwrap(self.model)
        if self.last_eval and self.last_eval[0] == self.step:
            final_metrics = self.last_eval[1]  # the last step was just evaluated
        else:
            final_metrics = self.evaluate() if self.val_examples else {}
        exported_step = self.step
        if cfg.trainer.export_best and (self.run_dir / "best").is_dir() and self.state["best_step"] != self.step:
            best = self.run_dir / "best" / "weights.safetensors"
            self.backend.load_trainable_state(self.model, load_file(str(best)), str(best))
            exported_step = self.state["best_step"]
            final_metrics = self.evaluate()
        out = self.run_dir / "final"
        # The last step's checkpoint holds the optimizer's state; the export may gather a
        # whole copy of a sharded model on rank 0 beside the rest.
        self.backend.release_optimizer_state(self.optimizer)
        full_state = self.backend.export_state_dict(self.model)  # every rank: may gather shards
        if self.main:
            if full_state is not None:
                model = self._unsharded_replica(full_state)
            if self._held_frozen:  # the export has the model's own dtype (fp32) throughout
                for p in model.parameters():
                    if p.dtype == torch.bfloat16:
                        p.data = p.data.float()
            tmp = ckpt.atomic_dir(out)
            model.eval()
            written = self.task.export(model, self.strategy, str(tmp), self.base_dir) or []
            write_cards(self, tmp, written, final_metrics)  # README.md: the model card, in each folder
            ckpt.commit_dir(tmp, out)
        peaks = self.backend.gather_object(round(self.peak_memory_mb, 1))
        # The folder of the exported weights, what a next stage starts from (a regularizer's
        # artifacts anchor to it).
        self.exported_weights = ckpt.exported_weights(self.run_dir, self.step, exported_step)
        secs = self.state["train_seconds"]
        summary = {
            "steps": self.step,
            "exported_step": exported_step,
            "stopped_early": stopped_early,
            "stop_reason": self.stop_reason,
            "best_step": self.state["best_step"],
            "best_metric": self.state["best_metric"],
            "metric": cfg.task.metric,
            **{f"eval/{k}": v for k, v in final_metrics.items()},
            # trainer.eval_before_training: the starting weights' metrics, for before/after
            **({"before": self.state["before"]} if self.state.get("before") else {}),
            "trainable_params": self.trainable,
            "total_params": self.total,
            "tokens_per_second": self.state["tokens"] / secs if secs else None,
            "precision": self.precision.name,
            **self.privacy.metrics(),
            "train_seconds": secs,
            "peak_memory_mb_per_process": peaks,
            "memory_kind": ("cuda_max_allocated" if self.device.type == "cuda"
                            else "cpu_peak_rss" if self._peak_rss else "cpu_rss_sampled"),
            "backend": self.backend.name,
            "processes": self.backend.world_size,
            "final_dir": str(out),
            "run_dir": str(self.run_dir),
            # What a search optimises and a recipe compares: task.metric of the exported
            # weights, and which way is better.
            "objective": final_metrics.get(cfg.task.metric),
            "objective_direction": "maximize" if cfg.task.greater_is_better else "minimize",
            # What a next stage starts from (sequential recipes): the exported weights'
            # folder, and whatever the regularizer leaves for it.
            "artifacts": {"weights": str(self.exported_weights), **self.regularizer.artifacts(self)},
        }
        if self.main:
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")
        self.metrics.finish(summary)
        self.stop.restore()
        if self.teardown:
            self.close()
        return summary

    def close(self) -> None:
        """Release the process group (a recipe does it in cleanup, after its last run)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.backend.teardown(keep=(self.model, self.optimizer))


def _enable_activation_checkpointing(model) -> None:
    # transformers' own per-block checkpointing, non-reentrant so frozen inputs (LoRA,
    # partial) still get gradients; parameter names stay unchanged for every backend.
    target = getattr(model, "backbone", model)
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ConfigError(f"trainer.activation_checkpointing: {type(target).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _compile_blocks(model) -> None:
    # Regional compilation (torch's recommended way for transformer stacks): each block is
    # compiled in place with nn.Module.compile, so every block reuses one compiled graph,
    # compile time does not grow with depth, and state_dict names are unchanged for
    # checkpoints, export and every backend's wrapping.
    blocks = find_layer_stack(getattr(model, "backbone", model))
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d blocks compiled in place", len(blocks))


def build_optimizer(node, model, weight_decay: float, head_lr: Optional[float] = None):
    """The config's optimizer over the model's trainable parameters, in two groups (four
    with trainer.head_lr: the task heads at their own rate)."""
    try:
        return instantiate(node, _param_groups(model, weight_decay, head_lr), _convert_="all")
    except Exception as e:  # a bad class path or argument: one line naming the node
        raise ConfigError(f"optimizer: cannot build {node.get('_target_')}: {str(e).splitlines()[0]}") from None


def _param_groups(model, weight_decay: float, head_lr: Optional[float] = None):
    # Weight decay on matrices only: biases and norm scales are left undecayed.
    heads = set()
    if head_lr is not None:
        from distft.strategies.base import declared_heads

        inner = model
        while hasattr(inner, "_module") or hasattr(inner, "module"):  # Opacus' / DDP's wrappers
            inner = getattr(inner, "_module", None) or inner.module
        heads = {id(p) for p in declared_heads(inner)}
        if not heads:
            raise ConfigError("trainer.head_lr: this model declares no task head (a classification task's "
                              "head, task.head=pooled, a mixture's heads); drop trainer.head_lr")
    groups = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(id(p) in heads, p.ndim >= 2)].append(p)
    out = []
    for (head, decay), params in groups.items():
        if params or not head:  # the two plain groups always exist (checkpoints hold two)
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                        **({"lr": head_lr} if head else {})})
    return out


__all__ = ["DistftError", "EpochBatches", "Trainer", "check_config"]

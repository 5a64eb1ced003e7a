import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict

import torch

from distft.backends.base import check_names
from distft.backends.ddp import DDPBackend
from distft.errors import ConfigError

log = logging.getLogger(__name__)

_TAG = "zero"  # DeepSpeed's sub-folder inside a distft checkpoint
_UNIVERSAL = "universal"  # the converted copy's sub-folder when resuming on another process count


def sub_group_elements(hidden: int) -> int:
    """Stage 3's optimizer sub-group: the fp32 partition is stepped in pieces of this many
    elements (about two blocks, 20 hidden^2) instead of DeepSpeed's 1e9. torch's AdamW makes
    two temporaries the size of the tensor it steps; on one flat partition of a 1B model on
    2 processes that is 3.9 GB a process at the step."""
    return 20 * hidden * hidden


def size_buffers_to_model(zero: dict, hidden: int) -> None:
    """ZeRO's gradient-reduction bucket, and under stage 3 its prefetch window and
    small-parameter threshold, sized to the model as transformers' "auto" values do
    (hidden^2, 0.9 hidden^2, 10 hidden elements), unless the config file sets them.
    DeepSpeed's fixed defaults (5e8 elements a bucket) are meant for billion-parameter
    models; on SmolLM2 under zero3 they made a step 3.3x DDP's, sized 1.04x.
    Stage 3 also keeps gathered what the backward uses again, up to 1e9 elements live
    (DeepSpeed's and transformers' defaults): below a billion parameters the forward ends
    with the whole model gathered on every rank. About two blocks live (20 hidden^2) and a
    reuse distance under one block (hidden^2) release each block after its forward, as
    FSDP does, and the backward gathers it again: SmolLM2 on 2 processes, peak 3339 ->
    2867 MB a process, the same losses."""
    zero.setdefault("reduce_bucket_size", hidden * hidden)
    if zero.get("stage") == 3:
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)
        zero.setdefault("stage3_max_live_parameters", 20 * hidden * hidden)
        zero.setdefault("stage3_max_reuse_distance", hidden * hidden)
        zero.setdefault("sub_group_size", sub_group_elements(hidden))


def share_fp32_master(optimizer) -> int:
    """Under ZeRO-3, make DeepSpeed's fp32 master partition the module's partition itself
    when the module is already fp32 on the device that steps it; returns the bytes no
    longer copied.

    Written here because DeepSpeed does not: stage 3's own no-copy branch compares a
    torch.device with the string from current_device_name(), which is never equal (torch
    2.13), so an fp32 model keeps two copies of its partition (SmolLM2 on 2 processes: 257 MB
    a process). The values are equal at this point, and after each step DeepSpeed copies the
    master partition into the module's (a copy onto itself here). Left alone under optimizer
    offload (the master then lives on the host) and wherever the two differ in dtype, device
    or size. Stages 1 and 2 are left alone too: they keep views of their master partition
    for each parameter (DeepSpeed's hp mapping), which would hold the copy in memory and go
    stale."""
    if (getattr(optimizer, "offload_optimizer", False) or not hasattr(optimizer, "fp32_partitioned_groups_flat")
            or getattr(optimizer, "optimizer_swapper", None) is not None):
        return 0
    pairs = list(zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat))
    shared = 0
    for module_part, master in pairs:
        if (module_part is None or master.dtype != module_part.dtype or master.device != module_part.device
                or master.shape != module_part.shape or not torch.equal(master, module_part)):
            continue
        if master.untyped_storage().data_ptr() != module_part.untyped_storage().data_ptr():
            master.data = module_part.data
            shared += master.numel() * master.element_size()
    return shared


_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_muon_import() -> bool:
    """Stand in for DeepSpeed's Muon optimizer module so that its engine does not import it;
    True when the stand-in was put in place.

    Every ZeRO engine (stages 1-3, DeepSpeed 0.19.8) imports that module to ask whether the
    optimizer it was given is a Muon, and the module compiles its kernels with torch.compile
    at import, which loads torch's inductor and networkx: about 450 modules, 0.9 s and 42 MB
    a process (SmolLM2 under zero3 on 2 processes: peak 2052 -> 2024 MB a process). A distft
    run always hands DeepSpeed its own optimizer (never a Muon), so the answer is known: the
    stand-in's class is one no optimizer is an instance of. Any other name asked of the
    module imports the real one, so code that does use Muon in the same process still gets
    it. Nothing is done when the module is already imported or DeepSpeed has none."""
    package, _, leaf = _MUON.rpartition(".")
    if _MUON in sys.modules or importlib.util.find_spec(package) is None:
        return False
    stand_in = types.ModuleType(_MUON, "distft's stand-in: no optimizer distft builds is a Muon")

    class MuonWithAuxAdam:
        """No instance is ever made: a distft optimizer is never a Muon."""

    def __getattr__(name):
        if name.startswith("__"):  # the import system asks for __path__ and the like
            raise AttributeError(name)
        if sys.modules.get(_MUON) is stand_in:
            del sys.modules[_MUON]
        return getattr(importlib.import_module(_MUON), name)

    stand_in.MuonWithAuxAdam = MuonWithAuxAdam
    stand_in.__getattr__ = __getattr__
    sys.modules[_MUON] = stand_in
    setattr(importlib.import_module(package), leaf, stand_in)  # as an import would
    return True


class ZeroBackend(DDPBackend):
    """DeepSpeed ZeRO stage 1/2/3 (optimizer state / + gradients / + parameters
    partitioned), with optional CPU offload. The DeepSpeed config is generated from the
    distft config (micro-batch, accumulation, clipping, bf16), or read from
    backend.config_file with those keys filled in. On CPU DeepSpeed runs with its CPU
    accelerator over gloo and our torch AdamW (its fused optimizers need CUDA)."""

    @classmethod
    def capabilities(cls, name):
        # ZeRO-3 gathers each block's parameters in hooks: compiled blocks recompile until
        # torch gives up. Its hooks gather the output layer for a call outside the forward
        # too (the chunked loss calls it as a module).
        return frozenset({"chunked_loss", "sharded_export", "sharded_params"} if name == "zero3"
                         else {"chunked_loss", "compile", "sharded_export"})

    def __init__(self, cfg, trainer_cfg, precision=None):
        super().__init__(cfg, trainer_cfg, precision)
        if cfg.stage not in (1, 2, 3):
            raise ConfigError(f"backend.stage={cfg.stage}: ZeRO stages are 1, 2 and 3")
        if cfg.offload_param and cfg.stage != 3:
            raise ConfigError("backend.offload_param needs ZeRO stage 3 (backend=zero3)")
        self.name = f"zero{cfg.stage}"
        self.state_format = self.name
        self._load_from = None  # (folder, tag) of the DeepSpeed state to resume from

    def setup(self):
        import deepspeed

        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=timedelta(minutes=self.cfg.timeout_minutes))

    def ds_config(self) -> dict:
        t = self.trainer_cfg
        config = {}
        if self.cfg.config_file:
            path = Path(self.cfg.config_file)
            if not path.is_file():
                raise ConfigError(f"backend.config_file={path}: file not found")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        # The batch geometry and clipping come from the distft config, so the loop and
        # DeepSpeed agree on where an optimizer step ends.
        for key, value in (("train_micro_batch_size_per_gpu", t.batch_size),
                           ("gradient_accumulation_steps", t.grad_accum)):
            if key in config and config[key] not in (value, "auto"):
                raise ConfigError(f"{path}: {key}={config[key]} disagrees with the distft config ({value}); "
                                  "drop it from the JSON or set it to \"auto\"")
            config[key] = value
        config.pop("train_batch_size", None)
        config["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm > 0 else 0.0
        zero = config.setdefault("zero_optimization", {})
        zero["stage"] = self.cfg.stage
        if self.cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
            # The run's own optimizer (its parameter groups, betas and eps) steps the
            # offloaded fp32 partitions, not an AdamW DeepSpeed would build from lr and
            # weight decay alone; DeepSpeedCPUAdam is faster but needs its C++ op built.
            config["zero_force_ds_cpu_optimizer"] = False
        if self.cfg.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        for key, section in self.precision.deepspeed_sections().items():
            config.setdefault(key, {}).update(section)
        config["zero_allow_untested_optimizer"] = True  # our torch AdamW
        config.setdefault("steps_per_print", 1 << 30)
        if self._load_from is not None and self._load_from[1] == _UNIVERSAL:
            config.setdefault("checkpoint", {})["load_universal"] = True
        return config

    def prepare_resume(self, folder, written_by, scratch):
        """Same process count: DeepSpeed reads its partitions back as written. Another
        count: rank 0 converts them to a DeepSpeed universal checkpoint (one file per
        parameter, re-partitioned on load) in `scratch`, with DeepSpeed's own converter."""
        if not (Path(folder) / _TAG).is_dir():
            raise ConfigError(f"{folder}: no DeepSpeed state in this checkpoint (was it written by another backend?)")
        if written_by == self.world_size:
            self._load_from = (Path(folder), _TAG)
            return
        scratch = Path(scratch)
        error = None
        if self.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            proc = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(folder) / _TAG),
                 "--output_folder", str(scratch / _UNIVERSAL), "--inject_missing_state",
                 "--num_extract_workers", "1", "--num_merge_workers", "1"],
                capture_output=True, text=True)  # inherits DS_ACCELERATOR=cpu from setup on CPU
            if proc.returncode != 0:
                error = (f"{folder}: converting the ZeRO state of {written_by} process(es) for {self.world_size} "
                         f"failed:\n{proc.stderr[-2000:]}")
        error = self.broadcast_object(error)
        if error:
            raise ConfigError(error)
        self._load_from = (scratch, _UNIVERSAL)

    def wrap(self, model, make_optimizer):
        import deepspeed

        config = self.ds_config()
        hidden = getattr(getattr(getattr(model, "backbone", model), "config", None), "hidden_size", None)
        if hidden:
            size_buffers_to_model(config["zero_optimization"], int(hidden))
        optimizer = make_optimizer(model)
        if skip_muon_import():
            log.info("ZeRO: DeepSpeed's Muon module not imported (its import compiles kernels; this run's "
                     "optimizer is %s)", type(optimizer).__name__)
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False)
        shared = share_fp32_master(ds_optimizer)
        if shared:
            log.info("ZeRO: the fp32 master partition is the module's own fp32 partition (%.0f MB a process "
                     "not copied)", shared / 2**20)
        return self.engine, ds_optimizer

    def grad_scaler(self):
        return None  # fp16 loss scaling is DeepSpeed's own (its fp16 config block)

    @property
    def scales_loss(self):
        return self.precision.name == "fp16"

    def scheduled_optimizer(self, optimizer):
        # A ZeRO optimizer wraps the torch optimizer and shares its param_groups.
        return optimizer.optimizer

    def backward(self, loss, sync=True):
        # The loss is normalised by the global target count: no further division by the
        # accumulation steps, and DeepSpeed's average over ranks is undone.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if not sync:
            # DeepSpeed counts micro-batches through engine.step(); before the accumulation
            # boundary it only advances that count (no optimizer step, no gradient exchange).
            self.engine.step()

    def step(self, model, optimizer, max_grad_norm, skip=False):
        # At the accumulation boundary DeepSpeed clips, steps and zeroes; its own check skips
        # the update when the gradient norm is not finite (a non-finite loss gives one),
        # which keeps its micro-step count and loss scale in order.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, bool(self.engine.was_step_applied()) and math.isfinite(norm)

    def unwrap(self, model):
        return self.engine.module

    def call_outside_forward(self, model, module):
        # Registered and marked as external parameters of the whole model (what DeepSpeed
        # itself does with a parameter a module hands out), the layer's weights are gathered
        # by its first call and released with all the others when the step partitions them
        # (or after an evaluation), not after each call: a call recomputed in the backward
        # (the chunked loss checkpoints its chunks) then finds them whole.
        if self.cfg.stage == 3:
            import deepspeed

            for param in module.parameters():
                deepspeed.zero.register_external_parameter(self.engine.module, param)
                param.is_external_param = True

    def after_eval(self, model):
        # Stage 3 prefetches the blocks the training step's trace says come next; an
        # evaluation ends without them, and gathering a parameter still in flight (the best
        # weights' copy) fails: wait for those fetches and release every gathered parameter.
        if self.cfg.stage == 3:
            self.engine.empty_partition_cache()

    def _trainable(self):
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _gathered_on_main(self, named) -> Dict[str, torch.Tensor]:
        """Stage 3 keeps a shard of each parameter per rank (an adapter saved from shards
        would be empty or one rank's part): gather one tensor at a time and let rank 0 keep
        a CPU copy, the other ranks nothing, as FSDP's full state dict does. Gathering the
        whole model at once put a complete copy, then its clone, on every rank: a 1B-parameter
        checkpoint ran 2 processes out of 24 GB. Tied tensors are gathered once."""
        import deepspeed

        out, first = {}, {}
        for name, tensor in named:
            if id(tensor) in first:
                if self.is_main:
                    out[name] = out[first[id(tensor)]]
                continue
            first[id(tensor)] = name
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=hasattr(tensor, "ds_id")):
                if self.is_main:
                    out[name] = tensor.detach().cpu().clone().contiguous()
        return out

    def trainable_state(self, model):
        named = self._trainable()
        if self.cfg.stage == 3:
            return self._gathered_on_main(named)
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}

    def load_trainable_state(self, model, state, source):
        import deepspeed

        named = dict(self._trainable())
        check_names(dict(self.engine.module.named_parameters()), state, source)
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0,
                                               enabled=self.cfg.stage == 3):
            if self.is_main or self.cfg.stage != 3:
                with torch.no_grad():
                    for name, tensor in state.items():
                        named[name].copy_(tensor)

    def optimizer_state(self, model, optimizer):
        return None  # partitioned: written by save_sharded_state

    def save_sharded_state(self, model, folder):
        self.engine.save_checkpoint(str(folder), tag=_TAG, save_latest=False)

    def load_sharded_state(self, model, folder):
        where, tag = self._load_from
        self.engine.load_checkpoint(str(where), tag=tag, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if tag == _UNIVERSAL:
            self.barrier()
            if self.is_main:
                shutil.rmtree(where, ignore_errors=True)

    def export_state_dict(self, model):
        module = self.engine.module
        if self.cfg.stage == 3:  # rank 0 gets the tensors, the other ranks an empty dict
            return self._gathered_on_main(module.state_dict(keep_vars=True).items())
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

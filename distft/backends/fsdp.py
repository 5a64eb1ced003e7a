import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from distft.backends.base import check_names
from distft.backends.ddp import DDPBackend
from distft.errors import ConfigError
from distft.strategies.base import find_layer_stack

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_DCP = "dcp"  # the optimizer's sub-folder inside a distft checkpoint
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


class FSDPBackend(DDPBackend):
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across
    ranks, one shard group per transformer block plus the root. bf16 compute with fp32
    gradient reduction on GPU when trainer.precision=bf16. The trainable weights are
    gathered whole to rank 0 for checkpoints and export, so an adapter is always saved
    complete; the optimizer state is checkpointed sharded with torch.distributed.checkpoint."""

    name = "fsdp"
    state_format = "fsdp"
    features = frozenset({"compile", "sharded_export", "sharded_params"})

    def wrap(self, model, make_optimizer):
        mp = self.precision.fsdp_policy(self.device.type)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        try:
            blocks = list(find_layer_stack(getattr(model, "backbone", model)))
        except ConfigError:
            blocks = []  # no block list found: the root alone is one shard group
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self._model = model
        self._optimizer = make_optimizer(model)
        return model, self._optimizer

    def backward(self, loss, sync=True):
        # FSDP averages the reduce-scattered gradients; the loss is normalised by the global
        # target count, so undo the average as DDP does.
        self._model.set_requires_gradient_sync(sync)
        self._scaled(loss * self.world_size).backward()

    def grad_scaler(self):
        return self.precision.grad_scaler(self.device.type, sharded=True)

    def step(self, model, optimizer, max_grad_norm, skip=False):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        total = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # the same on every rank
        stepped = not skip and math.isfinite(total)
        if stepped and max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
        if self.scaler is not None:
            if not skip:
                self.scaler.step(optimizer)
            self.scaler.update()
        elif stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, stepped

    def unwrap(self, model):
        return model  # fully_shard changes the model in place; names stay the same

    def _trainable_names(self, model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def trainable_state(self, model):
        names = self._trainable_names(model)
        full = get_model_state_dict(model, options=_GATHER)  # rank 0 gets the tensors
        return {k: v.contiguous() for k, v in full.items() if k in names}

    def load_trainable_state(self, model, state, source):
        check_names(dict(model.named_parameters()), state, source)
        model.reshard()  # a full state cannot be scattered onto unsharded (post-forward) params
        set_model_state_dict(model, state if self.is_main else {}, options=_SCATTER)

    def optimizer_state(self, model, optimizer):
        return None  # sharded: written by save_sharded_state

    # The optimizer state (twice the trainable parameters) stays sharded in a
    # torch.distributed.checkpoint folder: no rank ever holds all of it, and DCP reshards
    # on load, so a run can continue on another number of processes.
    def save_sharded_state(self, model, folder):
        state = {"optimizer": get_optimizer_state_dict(model, self._optimizer)}
        dcp.save(state, checkpoint_id=str(Path(folder) / _DCP))

    def load_sharded_state(self, model, folder):
        path = Path(folder) / _DCP
        if not (path / ".metadata").is_file():
            raise ConfigError(f"{folder}: no FSDP optimizer state (dcp/) in this checkpoint")
        state = {"optimizer": get_optimizer_state_dict(model, self._optimizer)}  # the layout to fill
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(model, self._optimizer, optim_state_dict=state["optimizer"])

    def export_state_dict(self, model):
        return get_model_state_dict(model, options=_GATHER)

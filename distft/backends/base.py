"""How work is spread over processes. The loop talks only to this interface."""
from __future__ import annotations

import math
from typing import Callable, Dict, FrozenSet, Optional

import torch

from distft.errors import ConfigError
from distft.precision import FP32, Precision


def check_names(params: Dict, state: Dict, source: str) -> None:
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ConfigError(
            f"{source}: the checkpoint does not match this run's trainable parameters "
            f"(missing {missing}, unexpected {extra}); was it written with another model or strategy?"
        )


# What a backend may declare it supports; components and the loop ask, never the name.
FEATURES = (
    "chunked_loss",  # the output layer works when called outside the model's forward (whole, or gathered by the call)
    "compile",  # compiled blocks keep working under its parameter handling
    "sharded_export",  # parameters are gathered for export (a plain replica is rebuilt)
    "dp",  # per-sample gradients and a private gradient exchange (Opacus) fit on it
    "low_precision_frozen",  # frozen weights may be held in bf16 beside fp32 trainable ones
    "sharded_params",  # each process keeps a shard of the parameters (sharded loading pays off)
)


class Backend:
    name = "base"
    rank = 0
    world_size = 1
    # What a checkpoint's optimizer state looks like; a checkpoint is resumed only by a
    # backend that keeps the same (single and ddp share a plain torch state dict).
    state_format = "torch"
    features: FrozenSet[str] = frozenset()
    # fp16's loss scaler (distft.precision.Precision.grad_scaler), when the loop uses one;
    # a backend with its own loss scaling (DeepSpeed) never gets one.
    scaler = None
    # True once a privacy component took over the gradient exchange (DP-SGD: its optimizer
    # clips per example, adds noise and sums across processes; see use_private_exchange).
    private_exchange = False

    def __init__(self, cfg, trainer_cfg=None, precision: Optional[Precision] = None):
        self.cfg = cfg
        self.trainer_cfg = trainer_cfg
        self.precision = precision or FP32

    def grad_scaler(self):
        """The loss scaler this backend needs for its precision (None: none, or its own)."""
        return self.precision.grad_scaler(self.device.type)

    @property
    def scales_loss(self) -> bool:
        """True when fp16 loss scaling runs: a skipped step is then the scaler calibrating,
        not a sign of divergence."""
        return self.scaler is not None

    @classmethod
    def capabilities(cls, name: str) -> FrozenSet[str]:
        """The FEATURES this backend supports, under the config name `name`."""
        return cls.features

    def supports(self, feature: str) -> bool:
        return feature in self.capabilities(self.name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Start process groups etc. Called before any model is built."""

    def wrap(self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]):
        """Prepare the model for this backend, then build its optimizer (after wrapping:
        a sharding backend replaces the parameters the optimizer must hold)."""
        return model, make_optimizer(model)

    def use_private_exchange(self) -> None:
        """DP-SGD's optimizer exchanges the clipped, noised gradients itself: backward then
        neither scales the loss by the process count nor averages gradients across
        processes, and `step` leaves clipping to the optimizer (per example)."""
        if not self.supports("dp"):
            raise ConfigError(f"backend={self.name} cannot run differentially private training")
        self.private_exchange = True

    def scheduled_optimizer(self, optimizer):
        """The torch optimizer whose learning rate the schedule sets."""
        return optimizer

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """`sync=False` on all but the last micro-batch of a step (no gradient exchange)."""
        self._scaled(loss).backward()

    def _scaled(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, model, optimizer, max_grad_norm: float, skip: bool = False) -> tuple[float, bool]:
        """Clip (when max_grad_norm > 0), step and zero the grads; the only place the
        optimizer steps. A non-finite gradient norm, or `skip` (the loop saw a non-finite
        loss), zeroes the grads without stepping, leaving weights and optimizer state as
        they were. Returns (grad norm, whether the optimizer stepped); every rank gets the
        same answer (the norm is over the exchanged gradients)."""
        if self.private_exchange:
            # The gradients here are this process's unclipped ones: neither clipped nor
            # reported (their norm is not private). The loop's loss check, agreed by
            # every rank, decides; the DP optimizer steps every rank or none.
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return math.nan, not skip
        params = [p for p in model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip and report the true gradient
        norm = float(_grad_norm(params, max_grad_norm))
        stepped = not skip and math.isfinite(norm)
        if self.scaler is not None:
            # An overflow (inf/nan in the fp16 gradient) is the scaler's business: it skips
            # the step and lowers the scale, as it is meant to while it calibrates.
            if not skip:
                self.scaler.step(optimizer)  # skips by itself when unscale_ found infs
            self.scaler.update()
        elif stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def unwrap(self, model):
        return peel(model)

    def call_outside_forward(self, model, module) -> None:
        """The loop will call `module`, a part of `model`, after the model's forward (the
        chunked loss calls the output layer): a backend that gathers parameters around
        module calls keeps this one's gathered until the optimizer step."""

    def after_eval(self, model) -> None:
        """After forward passes with no backward (an evaluation): release what the backend
        gathered or prefetched for a backward that does not come."""

    # State, gathered whole. Every rank calls these (a sharding backend gathers with
    # collectives); the results are complete CPU tensors with the model's own names.
    def trainable_state(self, model) -> Dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def load_trainable_state(self, model, state: Dict[str, torch.Tensor], source: str) -> None:
        params = dict(self.unwrap(model).named_parameters())
        check_names(params, state, source)
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def release_optimizer_state(self, optimizer) -> None:
        """Free the optimizer's state (Adam's moments: twice the trainable weights in fp32)
        once training is over and the last checkpoint holds it, before the export gathers
        a whole copy of a sharded model."""
        self.scheduled_optimizer(optimizer).state.clear()

    def optimizer_state(self, model, optimizer) -> Dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, state: Dict) -> None:
        optimizer.load_state_dict(state)

    def prepare_resume(self, folder, written_by: int, scratch) -> None:
        """Called before `wrap` when resuming from `folder`, written by `written_by`
        processes (maybe another count than this run's); `scratch` is a folder of this run
        it may use for a converted copy."""

    def save_sharded_state(self, model, folder) -> None:
        """Write this rank's own share of the state into the checkpoint folder (a backend
        whose optimizer state is partitioned keeps it this way; `optimizer_state` is then None)."""

    def load_sharded_state(self, model, folder) -> None:
        """Read back what `save_sharded_state` wrote."""

    def export_state_dict(self, model) -> Optional[Dict[str, torch.Tensor]]:
        """The full state dict to export from, or None when the model's own is complete."""
        return None

    # Collectives; with one process they are the identity.
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_reduce_max(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, obj):
        return obj

    def gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def teardown(self, keep=()) -> None:
        """Release process groups. `keep`: objects that still refer to them (the wrapped
        model, the optimizer), to be held until the process exits."""


# Wrappers around the model that are not the backend's own: (class, attribute holding the
# wrapped module). Privacy adds Opacus' GradSampleModule and its DP-DDP here.
WRAPPERS: list = []


def peel(model):
    """The model inside the wrappers registered in WRAPPERS."""
    changed = True
    while changed:
        changed = False
        for cls, attr in WRAPPERS:
            if isinstance(model, cls):
                model, changed = getattr(model, attr), True
    return model


def _grad_norm(params, max_grad_norm: float):
    # Clip only with a finite norm: clip_grad_norm_ would multiply every gradient by a NaN
    # scale. A non-finite norm is returned and the caller skips the step.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_grad_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    return norm

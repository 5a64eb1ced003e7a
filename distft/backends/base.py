"""How work is spread over processes. The loop talks only to this interface."""
from __future__ import annotations

import torch


class Backend:
    name = "base"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Start process groups etc. Called before any model is built."""

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """`sync=False` on all but the last micro-batch of a step (no gradient exchange)."""
        loss.backward()

    def step(self, model, optimizer, max_grad_norm: float) -> float:
        """Clip (when max_grad_norm > 0), step and zero the grads; returns the grad norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def unwrap(self, model):
        return model

    # Collectives; with one process they are the identity.
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, obj):
        return obj

    def gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def teardown(self) -> None:
        """Release process groups."""

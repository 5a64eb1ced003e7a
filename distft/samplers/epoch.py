from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional

import torch

from distft.errors import ConfigError
from distft.samplers.base import Sampler


class EpochBatches:
    """Micro-batches of example indices, reshuffled each epoch from (seed, epoch), so the
    order is a pure function of the position (epoch, batch) and a resumed run can jump
    straight to where it stopped.

    With several processes each global micro-batch (batch_size x world_size examples) is
    split across ranks, so N processes see exactly the examples one process would with
    the same global batch. A last global batch too small to give every rank an example
    is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 order_fn: Optional[Callable[[int], List[int]]] = None):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        # order_fn(epoch) -> the epoch's example indices (a mixture's order); default a
        # seeded permutation
        self.order_fn = order_fn or (
            lambda epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())
        self.global_size = batch_size * world_size
        full, rest = divmod(n, self.global_size)
        self.per_epoch = full + (1 if rest >= world_size else 0)
        if self.per_epoch == 0:
            raise ConfigError(f"{n} training examples cannot fill one batch on {world_size} processes")

    def from_position(self, epoch: int, batch: int) -> Iterator[tuple[int, int, List[int]]]:
        while True:
            order = self.order_fn(epoch)
            for b in range(batch, self.per_epoch):
                chunk = order[b * self.global_size : (b + 1) * self.global_size]
                yield epoch, b, chunk[self.rank :: self.world]
            epoch, batch = epoch + 1, 0


from distft.samplers import SAMPLERS  # noqa: E402  (after EpochBatches: the package imports it)


@SAMPLERS.register("epoch")
class EpochSampler(Sampler):
    """Epochs of the training set, each in a fresh seeded order; a step is grad_accum
    micro-batches of trainer.batch_size examples per process."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.epoch, self.batch = 0, 0
        self._stream = None

    def order_fn(self, run) -> Optional[Callable[[int], List[int]]]:
        return None  # a seeded permutation per epoch

    def setup(self, run):
        t = run.cfg.trainer
        self.grad_accum = t.grad_accum
        self.batches = EpochBatches(len(run.train_examples), t.batch_size, run.cfg.seed,
                                    run.backend.rank, run.backend.world_size, self.order_fn(run))
        self.steps_per_epoch = math.ceil(self.batches.per_epoch / t.grad_accum)

    def next_step(self):
        if self._stream is None:
            self._stream = self.batches.from_position(self.epoch, self.batch)
        out = []
        for _ in range(self.grad_accum):
            epoch, b, idx = next(self._stream)
            out.append(idx)
            self.epoch, self.batch = epoch, b + 1
        return out

    def epoch_progress(self):
        return self.epoch + self.batch / self.batches.per_epoch

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._stream = None

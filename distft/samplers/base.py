from __future__ import annotations

from typing import List

from distft.registry import Component


class Sampler(Component):
    """Yields, step by step, this rank's micro-batches (lists of training-example indices)
    of each optimizer step. Its state is its position in the data, so a resumed run
    continues with the very examples the interrupted one would have seen next.

    `setup(run)` reads the run's training examples, batch geometry and rank; after it,
    `steps_per_epoch` is known (the schedule's length may derive from it)."""

    steps_per_epoch: int = 1
    # False: every step has trainer.grad_accum micro-batches of trainer.batch_size examples
    # (the last of an epoch may be short). True: the examples of a step vary by design.
    variable_batch = False

    def next_step(self) -> List[List[int]]:
        """The micro-batches of the next optimizer step on this rank."""
        raise NotImplementedError

    def epoch_progress(self) -> float:
        """Epochs done so far, fractional (for the metrics)."""
        raise NotImplementedError

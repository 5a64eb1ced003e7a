from __future__ import annotations

import base64

import torch

from distft.errors import ConfigError
from distft.samplers import SAMPLERS
from distft.samplers.base import Sampler


def generator_state(g: torch.Generator) -> str:
    """A torch generator's state as text (checkpoint state.json is JSON)."""
    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(g: torch.Generator, text: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))


def expected_batch_size(cfg, world_size: int) -> int:
    """The expected examples of one logical (noisy) step: privacy.logical_batch_size when
    set, else trainer.batch_size x trainer.grad_accum x processes."""
    t = cfg.trainer
    logical = cfg.privacy.get("logical_batch_size") if "privacy" in cfg else None
    return int(logical) if logical else t.batch_size * t.grad_accum * world_size


@SAMPLERS.register("poisson")
class PoissonSampler(Sampler):
    """Poisson sampling, as DP-SGD's accounting assumes: each step includes every training
    example independently with probability q = expected batch / N, so a step's batch
    size varies (it may even be empty). Opacus' UniformWithReplacementSampler draws the
    masks; every rank draws the same global batch from the same seeded generator and
    keeps its share, so N processes train on exactly the examples one process would.
    This rank's share is cut into physical micro-batches of at most trainer.batch_size
    (a logical batch larger than memory still makes one noisy step), shortest examples
    first: each example's gradient is clipped on its own, so how the logical batch is cut
    changes nothing but the padding (SST-2 micro-batches in draw order held 3.3 padded
    tokens per real one)."""

    variable_batch = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.steps_done = 0
        self.generator = None

    def setup(self, run):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        n = len(run.train_examples)
        self.expected_batch = expected_batch_size(run.cfg, run.backend.world_size)
        if self.expected_batch > n:
            raise ConfigError(f"the expected logical batch ({self.expected_batch} examples) is larger than the "
                              f"{n} training examples; lower privacy.logical_batch_size or trainer.batch_size")
        self.sample_rate = self.expected_batch / n
        self.physical = run.cfg.trainer.batch_size
        self.rank, self.world = run.backend.rank, run.backend.world_size
        tokenized = isinstance(run.train_examples[0], dict) and "input_ids" in run.train_examples[0]
        self.lengths = [len(e["input_ids"]) for e in run.train_examples] if tokenized else None
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(run.cfg.seed + 7919)
        self.masks = UniformWithReplacementSampler(num_samples=n, sample_rate=self.sample_rate,
                                                   generator=self.generator)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        self._stream = None

    def next_step(self):
        if self._stream is None:
            self._stream = iter(self.masks)
        try:
            chosen = next(self._stream)
        except StopIteration:  # the sampler's "epoch" of 1/q draws is over: the masks go on
            self._stream = iter(self.masks)
            chosen = next(self._stream)
        self.steps_done += 1
        if self.lengths is not None:  # every rank sorts the same draw: shares of like lengths
            chosen = sorted(chosen, key=lambda i: (self.lengths[i], i))
        mine = chosen[self.rank :: self.world]
        return [mine[i : i + self.physical] for i in range(0, len(mine), self.physical)]

    def epoch_progress(self):
        return self.steps_done / self.steps_per_epoch

    def state_dict(self):
        return {"steps": self.steps_done, "generator": generator_state(self.generator)}

    def load_state_dict(self, state):
        if not state:
            return
        if "generator" not in state:
            raise ConfigError("the checkpoint was written without Poisson sampling (another privacy setting?); "
                              "resume it with the settings it was written with")
        self.steps_done = int(state["steps"])
        self.generator = self.generator or torch.Generator()
        set_generator_state(self.generator, state["generator"])
        self._stream = None


__all__ = ["PoissonSampler", "expected_batch_size", "generator_state", "set_generator_state"]

from __future__ import annotations

from distft.errors import ConfigError
from distft.regularizers import REGULARIZERS
from distft.regularizers.base import Regularizer


@REGULARIZERS.register("replay")
class Replay(Regularizer):
    """Rehearsal: each sequential stage also trains on a buffer of every earlier stage's
    training examples (regularizer.size of each, or regularizer.fraction of it, a seeded
    random choice among the examples that stage trained on), mixed into the stage's
    batches by the mixture sampler in proportion to size, each with its own task's loss
    and head. No penalty on the loss: the guard is in the data."""

    def check(self, cfg) -> None:
        if (self.cfg.size is None) == (self.cfg.fraction is None):
            raise ConfigError("regularizer=replay: give regularizer.size (examples kept of each earlier stage) or "
                              "regularizer.fraction, one of them (set the other to null)")
        if self.cfg.size is not None and self.cfg.size < 1:
            raise ConfigError(f"regularizer.size={self.cfg.size}: must be >= 1")
        if self.cfg.fraction is not None and not 0 < self.cfg.fraction <= 1:
            raise ConfigError(f"regularizer.fraction={self.cfg.fraction}: must be in (0, 1]")
        if cfg.experiment.name != "sequential" and cfg.data.name != "mixture":
            raise ConfigError("regularizer=replay rehearses earlier stages' examples: it needs "
                              "experiment=sequential (a single run has no earlier stage)")

    def stage_data(self, tasks, k: int) -> None:
        for i, spec in enumerate(list(tasks.values())[:k]):
            spec["train"] = True
            data = spec["data"] = dict(spec.get("data") or {})
            if self.cfg.fraction is not None:
                data["sample_train_fraction"] = float(self.cfg.fraction)
            else:
                data["sample_train_examples"] = int(self.cfg.size)

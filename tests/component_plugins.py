"""Components registered from outside distft, as a user's plugin module would
(`plugins=[component_plugins]`, with this folder on PYTHONPATH). The tests use them to
show that a new regularizer is one file plus its registration, and to inject failures."""

from distft.regularizers import REGULARIZERS
from distft.regularizers.base import Regularizer


def _trainable_sum(module):
    return sum(p.sum() for p in module.parameters() if p.requires_grad)


@REGULARIZERS.register("zero_penalty")
class ZeroPenalty(Regularizer):
    """A penalty that is always exactly zero but sits in the autograd graph: the losses
    and the gradients must come out bit-identical to no regularizer at all."""

    def setup(self, run):
        self.calls = 0

    def penalty(self, model, module):
        self.calls += 1
        return _trainable_sum(module) * 0.0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state.get("calls", 0))


@REGULARIZERS.register("nan_at")
class NaNAt(Regularizer):
    """Makes the loss NaN at the steps in `steps` and at every step from `from_step` on
    (1-based), on rank `rank` only (null: every rank): a diverging run, injected."""

    def setup(self, run):
        self.run = run

    def penalty(self, model, module):
        step = self.run.step + 1  # the step being computed
        rank_ok = self.cfg.get("rank") is None or self.run.backend.rank == self.cfg.rank
        bad = step in list(self.cfg.get("steps") or []) or (self.cfg.get("from_step") and step >= self.cfg.from_step)
        return _trainable_sum(module) * float("nan") if bad and rank_ok else None


@REGULARIZERS.register("leaves_note")
class LeavesNote(Regularizer):
    """No penalty; at the end of a run it leaves a file for the next stage (as EWC leaves
    its Fisher estimate), and it records what an earlier stage handed it."""

    def setup(self, run):
        self.received = dict(run.cfg.inputs)

    def artifacts(self, run):
        path = run.run_dir / "note.json"
        if run.main:
            import json

            path.write_text(json.dumps({"step": run.step, "received": self.received}))
        return {"note": str(path)}

from distft.samplers import SAMPLERS
from distft.samplers.epoch import EpochSampler


@SAMPLERS.register("mixture")
class MixtureSampler(EpochSampler):
    """Several datasets (data=mixture): each epoch's order draws tasks with the mixture's
    probabilities (distft/multitask.py: MixtureOrder); batches split across ranks as for
    one dataset."""

    def check(self, cfg):
        from distft import multitask

        multitask.members(cfg)  # the mixture's own refusals (sampler name, weights, ...)

    def order_fn(self, run):
        return run.task.order(run.cfg.seed)

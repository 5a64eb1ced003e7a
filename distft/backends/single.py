import torch

from distft.backends.base import Backend


class SingleBackend(Backend):
    """One process on one device: the first GPU when there is one, else the CPU."""

    name = "single"
    features = frozenset({"chunked_loss", "compile", "dp", "low_precision_frozen"})

    def __init__(self, cfg, trainer_cfg=None, precision=None):
        super().__init__(cfg, trainer_cfg, precision)
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

import torch

from distft.backends.base import Backend


class SingleBackend(Backend):
    """One process on one device: the first GPU when there is one, else the CPU."""

    name = "single"

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

"""Backends: one file each; `build_backend` picks by name."""
import importlib

from distft.backends.base import Backend
from distft.errors import ConfigError

# name -> (module, class), imported when chosen: FSDP's module pulls in
# torch.distributed.checkpoint, seconds a run on another backend need not spend at every
# start (DeepSpeed itself is imported by the ZeRO backend only when it sets up).
BACKENDS = {"single": ("distft.backends.single", "SingleBackend"), "ddp": ("distft.backends.ddp", "DDPBackend"),
            "fsdp": ("distft.backends.fsdp", "FSDPBackend"), "zero1": ("distft.backends.zero", "ZeroBackend"),
            "zero2": ("distft.backends.zero", "ZeroBackend"), "zero3": ("distft.backends.zero", "ZeroBackend")}


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is unknown; available: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def supports(name: str, feature: str) -> bool:
    """Whether backend `name` supports `feature` (Backend.FEATURES), without starting it."""
    return feature in backend_class(name).capabilities(name)


def build_backend(cfg, trainer_cfg, precision=None) -> Backend:
    """`precision`: the run's distft.precision.Precision (`auto` resolved already; fp32
    when None). The backend asks it for FSDP's policy, DeepSpeed's blocks, the scaler."""
    return backend_class(cfg.name)(cfg, trainer_cfg, precision)


__all__ = ["BACKENDS", "Backend", "backend_class", "build_backend", "supports"]

"""Backends: one file each; `build_backend` picks by name."""
import importlib

from distft.backends.base import Backend
from distft.errors import ConfigError

# name -> (module, class), imported when chosen: FSDP's module pulls in
# torch.distributed.checkpoint (and ZeRO's DeepSpeed), seconds a run on another backend
# need not spend at every start.
BACKENDS = {"single": ("distft.backends.single", "SingleBackend"), "ddp": ("distft.backends.ddp", "DDPBackend"),
            "fsdp": ("distft.backends.fsdp", "FSDPBackend")}


def build_backend(cfg, trainer_cfg, precision: str = "fp32") -> Backend:
    """`precision` is what runs (distft.precision resolved `auto` already)."""
    if cfg.name in ("zero1", "zero2", "zero3"):
        from distft.backends.zero import ZeroBackend  # deepspeed is an optional extra

        return ZeroBackend(cfg, trainer_cfg, precision)
    if cfg.name not in BACKENDS:
        raise ConfigError(f"backend={cfg.name!r} is unknown; available: {sorted(BACKENDS) + ['zero1', 'zero2', 'zero3']}")
    module, name = BACKENDS[cfg.name]
    cls = getattr(importlib.import_module(module), name)
    return cls(cfg, precision) if cfg.name == "fsdp" else cls(cfg)


__all__ = ["BACKENDS", "Backend", "build_backend"]

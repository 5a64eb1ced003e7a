"""Backends: one file each; `build_backend` picks by name."""
from distft.backends.base import Backend
from distft.backends.ddp import DDPBackend
from distft.backends.fsdp import FSDPBackend
from distft.backends.single import SingleBackend
from distft.errors import ConfigError

BACKENDS = {"single": SingleBackend, "ddp": DDPBackend, "fsdp": FSDPBackend}


def build_backend(cfg, precision: str = "fp32") -> Backend:
    cls = BACKENDS.get(cfg.name)
    if cls is None:
        raise ConfigError(f"backend={cfg.name!r} is unknown; available: {sorted(BACKENDS)}")
    return cls(cfg, precision) if cls is FSDPBackend else cls(cfg)


__all__ = ["BACKENDS", "Backend", "build_backend"]

"""Backends: one file each; `build_backend` picks by name."""
from distft.backends.base import Backend
from distft.backends.ddp import DDPBackend
from distft.backends.fsdp import FSDPBackend
from distft.backends.single import SingleBackend
from distft.errors import ConfigError

BACKENDS = {"single": SingleBackend, "ddp": DDPBackend, "fsdp": FSDPBackend}


def build_backend(cfg, trainer_cfg) -> Backend:
    if cfg.name in ("zero1", "zero2", "zero3"):
        from distft.backends.zero import ZeroBackend  # deepspeed is an optional extra

        return ZeroBackend(cfg, trainer_cfg)
    cls = BACKENDS.get(cfg.name)
    if cls is None:
        raise ConfigError(f"backend={cfg.name!r} is unknown; available: {sorted(BACKENDS) + ['zero1', 'zero2', 'zero3']}")
    return cls(cfg, trainer_cfg.precision) if cls is FSDPBackend else cls(cfg)


__all__ = ["BACKENDS", "Backend", "build_backend"]

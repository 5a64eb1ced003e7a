"""Registries by name, and the life cycle of the loop's components.

Every axis a run chooses by name (strategy, sampler, regularizer, privacy, ...) keeps a
`Registry`: `@REGISTRY.register("name")` on a class in its own file is all a new choice
needs, and the shared tests (tests/test_components.py) are parametrized over what is
registered, so the new one is tested like the others without new test code.

Components (sampler, regularizer, privacy) have one life cycle each, which the loop in
`distft/trainer.py` drives at fixed points and never branches on which one it holds:

    cls(cfg)                      built from its config node
    check(cfg)                    config time: refuse what it cannot do, with the reason
    setup(run)                    after the model and data exist (run: the Trainer)
    ... its own hooks ...         (see each axis's base class)
    state_dict() / load_state_dict(state)
                                  what a checkpoint must hold to continue exactly
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, List, Type, TypeVar

from distft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one axis by name, e.g. `REGULARIZERS = Registry("regularizer")`."""

    def __init__(self, axis: str):
        self.axis = axis
        self._classes: Dict[str, Type[T]] = {}

    def register(self, name: str) -> Callable[[Type[T]], Type[T]]:
        def wrap(cls: Type[T]) -> Type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.axis} {name!r} is registered twice "
                                 f"({self._classes[name].__module__} and {cls.__module__})")
            self._classes[name] = cls
            cls.name = name
            return cls

        return wrap

    def get(self, name: str) -> Type[T]:
        cls = self._classes.get(name)
        if cls is None:
            raise ConfigError(f"{self.axis}={name!r} is unknown; registered: {self.names()}")
        return cls

    def build(self, cfg, *args, **kwargs) -> T:
        """An instance for the config node `cfg` (its `name` picks the class)."""
        return self.get(cfg.name)(cfg, *args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes


class Component:
    """The life cycle the loop drives; every method has a do-nothing default."""

    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self, cfg) -> None:
        """Config time, before any data or model: raise ConfigError for a combination with
        the rest of the run's config (`cfg`, the whole composed config) that cannot work."""

    def setup(self, run) -> None:
        """Once the data, the model and the backend exist (`run` is the Trainer)."""

    def state_dict(self) -> Dict:
        """JSON-serialisable state a resumed run needs (numbers, lists, strings)."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


def import_plugins(modules) -> None:
    """Import the user's modules named in the config (`plugins=[my_pkg.my_regularizer]`):
    their `@register(...)` decorators add choices without a change to distft."""
    for module in modules or ():
        try:
            importlib.import_module(str(module))
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {module!r} ({e}); is it on PYTHONPATH?") from None

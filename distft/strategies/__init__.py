"""Fine-tuning strategies, one file each, registered by name."""
from distft.strategies import bitfit, feature, full, lora, partial  # noqa: F401  (registers them)
from distft.strategies.base import (
    Strategy,
    TaskInfo,
    build_strategy,
    count_parameters,
    register_strategy,
    registered_strategies,
)

__all__ = [
    "Strategy",
    "TaskInfo",
    "build_strategy",
    "count_parameters",
    "register_strategy",
    "registered_strategies",
]

"""Regularizers: a penalty added to each optimizer step's loss (guards against forgetting:
L2-SP, EWC; replay guards through the data instead), one file each; `none` adds nothing."""
from distft.registry import Registry
from distft.regularizers.base import Regularizer

REGULARIZERS: Registry[Regularizer] = Registry("regularizer")

from distft.regularizers import ewc, l2sp, none, replay  # noqa: E402,F401  (registers them)

__all__ = ["REGULARIZERS", "Regularizer"]

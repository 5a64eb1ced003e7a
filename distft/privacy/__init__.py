"""Privacy: differentially private training decorates the optimizer, the sampler and the
gradient exchange; `none` leaves them as they are."""
from distft.privacy.base import Privacy
from distft.registry import Registry

PRIVACY: Registry[Privacy] = Registry("privacy")

from distft.privacy import dp, none  # noqa: E402,F401  (registers them)

__all__ = ["PRIVACY", "Privacy"]

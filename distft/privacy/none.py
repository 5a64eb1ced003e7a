from distft.privacy import PRIVACY
from distft.privacy.base import Privacy


@PRIVACY.register("none")
class NoPrivacy(Privacy):
    """Ordinary training: no noise, no per-sample clipping."""

"""The one error type a user sees: a clear message, no traceback."""


class DistftError(Exception):
    """Bad input or an impossible combination; the message names the file, line or key."""


class ConfigError(DistftError):
    """A config value or combination that cannot work, refused before any work starts."""


class DataError(DistftError):
    """A data file that cannot be used; the message names the file and line."""

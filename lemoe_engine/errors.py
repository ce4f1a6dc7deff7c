"""Exception types raised at the library boundary.

Every error a user can cause derives from :class:`LEMoEError`, so a caller (or the CLI)
can catch one type and print its message, which always says what to change.
"""


class LEMoEError(Exception):
    """Base class of every error lemoe-engine raises on purpose."""


class ConfigError(LEMoEError, ValueError):
    """A configuration value or function argument is invalid."""


class UnsupportedModelError(LEMoEError, ValueError):
    """The model architecture or layer index cannot be patched."""


class AdaptorError(LEMoEError, ValueError):
    """An adaptor folder is missing, corrupt, of an unknown version, or made for another model."""


class EditDataError(LEMoEError, ValueError):
    """An edit file cannot be read or one of its records is malformed."""

"""Errors lamina raises on purpose.

Every message names *what* is wrong, *where* (file, row, column, section, store) and *how to fix it*; the CLI
prints the message and exits non-zero. Anything that is not a ``LaminaError`` is a bug in lamina.
"""


class LaminaError(Exception):
    """Base class of errors caused by input, configuration or environment (not by a lamina bug)."""


class InputError(LaminaError, ValueError):
    """Bad input data: missing/misnamed columns, NaN coordinates, empty sections, corrupt files, ..."""


class ConfigError(LaminaError, ValueError):
    """A configuration file or argument that does not validate."""


class StoreError(LaminaError):
    """A store that is missing, incomplete, or not a lamina store."""


class FormatVersionError(StoreError):
    """A store written by a newer lamina format than this installation understands."""


class ClusterError(LaminaError, RuntimeError):
    """A Dask cluster that was asked for but cannot be started or reached."""


class TooLargeError(LaminaError, MemoryError):
    """An operation that would load more into memory than allowed."""

"""Errors lamina raises on purpose.

Every message names *what* is wrong, *where* (file, row, column, section, store) and *how to fix it*; the CLI
prints the message and exits with status 2. Anything that is not a ``LaminaError`` is a bug in lamina
(:class:`InternalError` says so in its message).
"""


class LaminaError(Exception):
    """Base class of errors caused by input, configuration or environment (not by a lamina bug)."""


class InputError(LaminaError, ValueError):
    """Bad input data: missing/misnamed columns, NaN coordinates, empty sections, corrupt files, ..."""


class UnknownSectionError(InputError, KeyError):
    """A section id or position that the atlas does not have (also a ``KeyError``, as for a mapping)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownGeneError(InputError, KeyError):
    """A gene name that the atlas does not have (also a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(LaminaError, ValueError):
    """A configuration file or argument that does not validate."""


class UnknownOptionError(ConfigError, TypeError):
    """An option a stage does not declare (also a ``TypeError``, as Python gives for an unknown keyword)."""


class StoreError(LaminaError):
    """A store that is missing, incomplete, or not a lamina store."""


class MissingInputError(StoreError):
    """A stage whose inputs (earlier stages, or data such as /X) are not in the store."""


class FormatVersionError(StoreError):
    """A store (or one of its elements) written by another lamina format than this installation writes."""


class StoreLockedError(StoreError):
    """A store that another process is writing."""


class ClusterError(LaminaError, RuntimeError):
    """A Dask cluster that was asked for but cannot be started or reached."""


class TooLargeError(LaminaError, MemoryError):
    """An operation that would load more into memory than allowed."""


class InternalError(RuntimeError):
    """An invariant of lamina itself does not hold: a bug, never the user's input."""

    def __init__(self, message: str):
        super().__init__(
            f"{message} (an internal check failed: this is a bug in lamina, please report it with "
            f"the command that led here)"
        )


def ensure(condition: bool, message: str) -> None:
    """Raise :class:`InternalError` with ``message`` unless ``condition`` (an invariant, not an input check;
    unlike ``assert`` it also holds under ``python -O``)."""
    if not condition:
        raise InternalError(message)

"""The on-disk format of an atlas store and its version check."""
from __future__ import annotations

from ..errors import FormatVersionError, StoreError

FORMAT_NAME = "lamina.atlas"
#: Bumped whenever a store written by this version cannot be read correctly by an older lamina.
FORMAT_VERSION = 1
UNITS = "um"


def check_format(attrs: dict, where: str) -> int:
    """Return the store's format version, or raise if it is not a lamina store / is too new."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not a lamina atlas store (no 'format: {FORMAT_NAME}' in its root attrs); "
                         f"create one with lamina.Atlas.create() or `lamina build`.")
    version = attrs.get("format_version")
    if not isinstance(version, int):
        raise StoreError(f"{where}: root attr 'format_version' is missing or not an integer ({version!r}); "
                         f"the store is damaged: rebuild it.")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where} was written with lamina format version {version}, newer than this installation's "
            f"{FORMAT_VERSION}; upgrade lamina (pip install -U lamina) to read it.")
    return version

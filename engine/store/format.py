"""The on-disk format of an atlas store, its version check and the upgrade of older stores.

Format 2 (this lamina): every element carries ``encoding-type`` / ``encoding-version``
(:mod:`lamina.store.elements`) and every stage record its algorithm version. Format 1 stores (lamina 0.1
before the stage contract) have neither: they open for reading, their elements recognised by their place;
writing into one needs ``lamina upgrade STORE`` first (metadata only: it stamps the elements and the root).
"""

from __future__ import annotations

from ..errors import FormatVersionError, StoreError

FORMAT_NAME = "lamina.atlas"
#: Bumped whenever a store written by this version cannot be read correctly by an older lamina.
FORMAT_VERSION = 2
#: the oldest format this lamina opens (for reading; :func:`upgrade` brings it to FORMAT_VERSION)
OLDEST_READABLE = 1
UNITS = "um"


def check_format(attrs: dict, where: str) -> int:
    """Return the store's format version, or raise if it is not a lamina store / is too new or too old."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{where} is not a lamina atlas store (no 'format: {FORMAT_NAME}' in its root attrs); "
            f"create one with lamina.Atlas.create() or `lamina build`."
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(
            f"{where}: root attr 'format_version' is missing or not an integer ({version!r}); "
            f"the store is damaged: rebuild it."
        )
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where} was written with lamina format version {version}, newer than this installation's "
            f"{FORMAT_VERSION}; upgrade lamina (pip install -U lamina) to read it."
        )
    if version < OLDEST_READABLE:
        raise FormatVersionError(
            f"{where} has lamina format version {version}, older than any this lamina reads "
            f"({OLDEST_READABLE}..{FORMAT_VERSION}); rebuild it with `lamina build`."
        )
    return version


def require_current(attrs: dict, where: str) -> None:
    """Refuse to write into a store of an older format, naming the command that upgrades it."""
    version = check_format(attrs, where)
    if version < FORMAT_VERSION:
        raise FormatVersionError(
            f"{where} was written with lamina format {version}; this lamina writes format {FORMAT_VERSION}. "
            f"Run `lamina upgrade {where}` once (it rewrites metadata only, in seconds), then try again."
        )


def upgrade(root, where: str) -> list[str]:
    """Bring a format-1 store to the current format in place; returns what was stamped.

    Each element found at its format-1 place gets its encoding attrs, each stage record the algorithm version
    1 (every stage was at version 1 in format 1) and the root the current format version; no data is
    rewritten. Format 2 hashes a stage's options after converting them through their declared types (and
    its algorithm version), so the format-1 hashes do not match: each stage re-runs once, on the next build
    or call that asks for it; results read before that (``info``, exports, ``obs``) are the old ones."""
    from .elements import CURRENT, LEGACY_PATHS, TYPE

    version = check_format(dict(root.attrs), where)
    if version == FORMAT_VERSION:
        return []
    done = []
    for path, kind in LEGACY_PATHS.items():
        if path in root and TYPE not in root[path].attrs:
            CURRENT[kind].stamp(root[path])
            done.append(f"/{path}: {kind}")
    stages = {}
    for name, rec in dict(root.attrs.get("stages", {})).items():
        stages[name] = {**rec, "algorithm_version": rec.get("algorithm_version", 1)}
    root.attrs.update({"stages": stages, "format_version": FORMAT_VERSION, "upgraded_from": version})
    done.append(f"root: format {version} -> {FORMAT_VERSION}")
    return done

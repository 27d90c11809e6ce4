"""One writer per store: a lock file beside the store (``NAME.lamina.zarr.lock``).

Beside, not inside: ingest builds a new store next to the old one and renames it into place, which would
carry a lock inside along with it. The file holds who writes (host, pid, command, since when). A second
writer gets :class:`StoreLockedError` naming that process, or waits for it (``wait`` seconds, or the
``LAMINA_LOCK_WAIT`` environment variable; the CLI's ``--wait``). A lock left by a process that no longer
runs on this host is stale and is taken over. Readers never look at the lock. The lock is re-entrant within a
process, so ``lamina build`` holds it over ingest and every stage, and no other writer slips in between.
Object stores (URLs) have no exclusive file creation; they are not locked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import StoreLockedError

log = logging.getLogger("lamina")
_HELD: dict[str, int] = {}  # lock path -> depth, for this process
_GUARD = threading.Lock()
POLL_S = 0.5


def lock_path(store) -> Path:
    return Path(os.path.abspath(str(store).rstrip("/") + ".lock"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's contents, {} when it is unreadable (being written), None when it is gone."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(info: dict, path: Path) -> bool:
    if not info:  # half-written by a process that died between create and write, or being written now
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:300],
    }
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    return True


def _describe(info: dict) -> str:
    if not info:
        return "another process (its lock file is being written)"
    return f"process {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')!r})"


@contextlib.contextmanager
def writer(store, wait: float | None = None):
    """Hold the store's writer lock for the ``with`` block (see the module docstring).

    ``wait``: seconds to wait for another writer to finish (0: fail at once; None: ``LAMINA_LOCK_WAIT`` or 0).
    Raises :class:`StoreLockedError` naming the writing process when the lock stays taken.
    """
    if "://" in str(store):
        yield
        return
    path = lock_path(store)
    key = str(path)
    with _GUARD:
        if _HELD.get(key):
            _HELD[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _GUARD:
                _HELD[key] -= 1
        return
    limit = float(os.environ.get("LAMINA_LOCK_WAIT", "0") or 0) if wait is None else float(wait)
    deadline = time.monotonic() + limit
    path.parent.mkdir(parents=True, exist_ok=True)
    while not _try_create(path):
        info = _holder(path)
        if info is None:
            continue  # released just now
        if _stale(info, path):
            log.warning("store lock %s: %s is gone; taking over its stale lock", path, _describe(info))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if time.monotonic() >= deadline:
            raise StoreLockedError(
                f"{store} is being written by {_describe(info)}. Wait for it to finish (CLI: --wait SECONDS; "
                f"Python: LAMINA_LOCK_WAIT=SECONDS), or, if that process no longer runs, delete {path}. "
                f"Reading the store is not blocked."
            )
        time.sleep(POLL_S)
    with _GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _GUARD:
            _HELD.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

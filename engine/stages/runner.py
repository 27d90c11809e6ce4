"""Resumable, atomic stages.

A stage writes its whole output into a scratch group ``_tmp/<stage>-<token>``; only when everything is
written is the scratch group moved to its final name and marked ``complete`` with a hash of the stage's
parameters and of its inputs' hashes. A crash leaves at most a scratch group (removed on the next run) and
never a group that looks complete; the previous result stays in place until the new one is ready. A re-run
with the same hash is skipped.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zarr

from .._version import __version__
from ..errors import StoreError
from ..store.atlas import Atlas, _is_url, now_iso

SCRATCH = "_tmp"


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def params_hash(*parts) -> str:
    """SHA-256 of the canonical JSON of ``parts`` (dict keys sorted, paths and numpy values stringified)."""
    blob = json.dumps(jsonable(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageResult:
    name: str
    group: str
    ran: bool
    hash: str
    seconds: float


def stage_options(stage: str, defaults: dict, options: dict) -> dict:
    """``defaults`` updated by ``options``; an unknown option is a ``TypeError`` naming the known ones."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{stage}() got unknown options {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **options}


def _set_record(atlas: Atlas, name: str, record: dict) -> None:
    stages = dict(atlas.root.attrs.get("stages", {}))
    stages[name] = jsonable(record)
    atlas.root.attrs["stages"] = stages


def clear_scratch(atlas: Atlas, prefix: str = "") -> None:
    """Remove scratch groups left behind by interrupted runs (of one stage when ``prefix`` is given)."""
    if SCRATCH not in atlas.root:
        return
    scratch = atlas.root[SCRATCH]
    for key in list(scratch.group_keys()):
        if key.startswith(prefix):
            del scratch[key]


def _move_group(atlas: Atlas, src: str, dst: str) -> None:
    """Rename group ``src`` to ``dst`` on a local store (a directory rename: atomic on POSIX)."""
    Path(atlas.path, dst).parent.mkdir(parents=True, exist_ok=True)
    Path(atlas.path, src).rename(Path(atlas.path, dst))


def run_stage(atlas: Atlas, name: str, output: str, params: dict, build: Callable[[zarr.Group], dict | None],
              inputs: tuple[str, ...] = (), version: int = 1, force: bool = False) -> StageResult:
    """Run ``build`` into a scratch group and commit it as ``output``, or skip if already done.

    ``params`` must hold everything that changes the result; ``inputs`` names the stages whose outputs
    ``build`` reads (their hashes enter this stage's hash, so a changed input re-runs dependants).
    ``build(group)`` writes into ``group`` and may return extra provenance (a small dict).
    """
    atlas.writable()
    records = atlas.stage_records()
    missing = [i for i in inputs if not records.get(i, {}).get("complete")]
    if missing:
        raise StoreError(f"stage '{name}' needs the output of {missing} in {atlas.path}; run "
                         f"{' and '.join(missing)} first")
    digest = params_hash(name, version, params, [records[i]["hash"] for i in inputs])
    old = records.get(name, {})
    if not force and old.get("complete") and old.get("hash") == digest and atlas.group_is_complete(output):
        return StageResult(name, output, False, digest, 0.0)

    clear_scratch(atlas, f"{name}-")
    started, t0 = now_iso(), time.perf_counter()
    in_place = _is_url(atlas.path)  # object stores have no rename: write in place, marked incomplete
    target = output if in_place else f"{SCRATCH}/{name}-{uuid.uuid4().hex[:8]}"
    if in_place and output in atlas.root:
        del atlas.root[output]
    group = atlas.root.create_group(target, overwrite=True)
    group.attrs.update({"complete": False, "stage": name})
    _set_record(atlas, name, {"complete": False, "hash": digest, "params": params, "group": output,
                              "started": started, "version": __version__})
    try:
        extra = build(group) or {}
    except BaseException:
        if not in_place and target in atlas.root:
            del atlas.root[target]
        raise
    group.attrs.update({"complete": True, "hash": digest})
    if not in_place:
        if output in atlas.root:
            trash = f"{SCRATCH}/{name}-old-{uuid.uuid4().hex[:8]}"
            _move_group(atlas, output, trash)
            _move_group(atlas, target, output)
            shutil.rmtree(Path(atlas.path, trash), ignore_errors=False)
        else:
            _move_group(atlas, target, output)
        if SCRATCH in atlas.root and not list(atlas.root[SCRATCH].keys()):
            del atlas.root[SCRATCH]
    seconds = time.perf_counter() - t0
    _set_record(atlas, name, {"complete": True, "hash": digest, "params": params, "group": output,
                              "started": started, "finished": now_iso(), "seconds": round(seconds, 3),
                              "version": __version__, **extra})
    return StageResult(name, output, True, digest, seconds)

"""Resumable, atomic stages.

A stage writes its whole output into a scratch group ``_tmp/<stage>-<token>``; only when everything is
written (and the output validates as the element the stage declares) is the scratch group moved to its final
name and marked ``complete`` with a hash of the stage's name, algorithm version, options (converted through
their declared types), what ``prepare`` resolved, and its inputs' hashes. A crash leaves at most a scratch
group (removed on the next run) and never a group that looks complete; the previous result stays in place
until the new one is ready. A re-run with the same hash is skipped; a new algorithm version re-runs.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..errors import MissingInputError
from ..hashing import jsonable, params_hash
from ..store.arrays import consolidate
from ..store.atlas import Atlas, _is_url, now_iso
from .contract import PlanContext, Stage, StageContext

SCRATCH = "_tmp"
log = logging.getLogger("lamina")


@dataclass
class StageResult:
    name: str
    group: str
    ran: bool
    hash: str
    seconds: float


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


def missing_inputs(atlas: Atlas, inputs) -> list[str]:
    records = atlas.stage_records()
    return [i for i in inputs if not records.get(i, {}).get("complete")]


def require_inputs(atlas: Atlas, stage: Stage, inputs) -> None:
    missing = missing_inputs(atlas, inputs)
    if missing:
        raise MissingInputError(
            f"stage '{stage.name}' needs the output of {', '.join(missing)} in {atlas.path}; "
            f"run {' and '.join(f'lamina.{m}()' for m in missing)} first (lamina.align / "
            f"lamina.reconstruct / `lamina build` run the stages in order)"
        )


def digest_of(atlas: Atlas, stage: Stage, params: dict, inputs) -> str:
    records = atlas.stage_records()
    return params_hash(stage.name, stage.version, params, [records[i]["hash"] for i in inputs])


def run(
    stage: Stage,
    atlas: Atlas,
    client=None,
    force: bool = False,
    options: dict | None = None,
    context: PlanContext | None = None,
    parsed=None,
) -> StageResult:
    """Run ``stage`` on ``atlas`` with ``options`` (see :mod:`lamina.stages.contract` for the order of the
    hooks); ``parsed`` passes options already parsed and resolved by a plan. Holds the store's writer lock."""
    from ..store.lock import writer

    with writer(atlas.path):
        return _run(stage, atlas, client, force, options, context, parsed)


def _run(stage: Stage, atlas: Atlas, client, force: bool, options, context, parsed) -> StageResult:
    atlas.writable()
    opts = parsed if parsed is not None else stage.options.parse(options, where=f"lamina.{stage.name}()")
    if parsed is None:  # a plan has resolved and checked its steps already
        if stage.resolve:
            opts = stage.resolve(atlas, opts, context or PlanContext())
        if stage.check:
            stage.check(atlas, opts)
    inputs = stage.inputs_for(atlas, opts)
    require_inputs(atlas, stage, inputs)
    prepared = stage.prepare(atlas, opts) if stage.prepare else {}
    params = {**opts.to_dict(), **prepared}
    digest = digest_of(atlas, stage, params, inputs)
    old = atlas.stage_records().get(stage.name, {})
    if not force and old.get("complete") and old.get("hash") == digest and atlas.group_is_complete(stage.output):
        log.info("%s: up to date, skipped", stage.name)
        return StageResult(stage.name, stage.output, False, digest, 0.0)
    return _commit(stage, atlas, opts, prepared, params, inputs, digest, client)


def _commit(stage: Stage, atlas: Atlas, opts, prepared: dict, params: dict, inputs, digest: str, client) -> StageResult:
    from ..store.elements import CURRENT

    name, output = stage.name, stage.output
    records = atlas.stage_records()
    clear_scratch(atlas, f"{name}-")
    started, t0 = now_iso(), time.perf_counter()
    log.info("%s: started -> /%s", name, output)
    in_place = _is_url(atlas.path)  # object stores have no rename: write in place, marked incomplete
    target = output if in_place else f"{SCRATCH}/{name}-{uuid.uuid4().hex[:8]}"
    if in_place and output in atlas.root:
        del atlas.root[output]
    group = atlas.root.create_group(target, overwrite=True)
    group.attrs.update({"complete": False, "stage": name})
    base = {
        "hash": digest,
        "params": params,
        "group": output,
        "started": started,
        "version": __version__,
        "algorithm_version": stage.version,
        "inputs": {i: records[i]["hash"] for i in inputs},
    }
    _set_record(atlas, name, {"complete": False, **base})
    ctx = StageContext(stage, atlas, opts, group, client, prepared)
    try:
        extra = stage.build(ctx) or {}
        element = stage.element if isinstance(stage.element, type) else CURRENT[stage.element]
        element.stamp(group)
        element.validate(group, f"{atlas.path}/{output} (stage {name})")
    except BaseException:
        if not in_place and target in atlas.root:
            del atlas.root[target]
        log.info("%s: failed after %.1f s; the previous result (if any) is kept", name, time.perf_counter() - t0)
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
    _set_record(atlas, name, {"complete": True, **base, "finished": now_iso(), "seconds": round(seconds, 3), **extra})
    for hook in ctx.after_commit:
        hook()
    consolidate(atlas.path)
    summary = ", ".join(f"{k} {_short(v)}" for k, v in jsonable(extra).items() if k not in ("flagged", "n_flagged"))
    log.info(
        "%s: done in %.1f s -> /%s (%s%s)",
        name,
        seconds,
        output,
        _size(atlas, output),
        f"; {summary}" if summary else "",
    )
    flagged = list(extra.get("flagged", []))
    if flagged:
        count = extra.get("n_flagged", len(flagged))
        log.info("%s: %d flagged (the QC table has all): %s", name, count, "; ".join(flagged[:3]))
    for flag in flagged[3:]:
        log.debug("%s: flagged %s", name, flag)
    return StageResult(name, output, True, digest, seconds)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _size(atlas: Atlas, group: str) -> str:
    if _is_url(atlas.path):
        return "remote"
    files = [f for f in Path(atlas.path, group).rglob("*") if f.is_file()]
    return f"{len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"


def stage_state(atlas: Atlas, stage: Stage, _seen: frozenset = frozenset()) -> str:
    """``complete``, ``not run``, ``INCOMPLETE``, or ``stale (...)`` with the reason: an older algorithm
    version, an input that changed since, or an input that is itself stale (its re-run will re-run this)."""
    from .registry import all_stages

    records = atlas.stage_records()
    rec = records.get(stage.name)
    if not rec:
        return "not run"
    if not rec.get("complete") or not atlas.group_is_complete(stage.output):
        return "INCOMPLETE"
    version = rec.get("algorithm_version", 1)
    if version != stage.version:
        return f"stale (algorithm version {version} -> {stage.version})"
    inputs = dict(rec.get("inputs", {}))
    changed = [i for i, h in inputs.items() if records.get(i, {}).get("hash") != h]
    if changed:
        return f"stale (input {', '.join(changed)} changed)"
    stages = all_stages()
    for i in inputs:
        if i in stages and i not in _seen and stage_state(atlas, stages[i], _seen | {stage.name}) != "complete":
            return f"stale (input {i} is stale)"
    return "complete"

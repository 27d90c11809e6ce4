"""Stage ``warp``: apply each section's transform to its cells, one task per cell chunk -> ``/aligned``.

The transform is the refined one (``/deformation``: affine, then a displacement sampled bilinearly on the
atlas canvas) when the ``refine`` stage has run, else the affine of ``/transforms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import dask
import numpy as np

from ..errors import ensure
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from ..transforms import STAGES, apply_by_section
from .contract import PlanContext, Stage, StageContext
from .options import Options, option

#: transform source -> (group it reads, stage that wrote it)
SOURCES = {
    "refined": (STAGES["refined"], "refine"),
    "affine": (STAGES["affine"], "register"),
    "identity": (None, "ingest"),
}


@dataclass(frozen=True)
class WarpOptions(Options):
    source: Literal["auto", "refined", "affine", "identity"] = option(
        "auto",
        "transform applied: refined (affine + displacement), affine, or identity (cells already "
        "registered, e.g. imported); auto: refined when refine runs or has run, else affine",
    )


def _warp_chunk(store: str, target: str, a: int, b: int, source: str, z: np.ndarray) -> int:
    root = open_root(store, "r+")
    sec = np.asarray(root["cells/section"][a:b])
    xy = np.stack([root["cells/x"][a:b], root["cells/y"][a:b]], 1).astype(np.float64)
    out = apply_by_section(root[source], sec, xy)
    ensure(bool(np.all(np.isfinite(out))), f"non-finite aligned coordinates in rows [{a}, {b})")
    root[f"{target}/x"][a:b] = out[:, 0].astype(np.float32)
    root[f"{target}/y"][a:b] = out[:, 1].astype(np.float32)
    root[f"{target}/z"][a:b] = z[sec].astype(np.float32)
    return b - a


def _resolve(atlas: Atlas, opts: WarpOptions, context: PlanContext) -> WarpOptions:
    if opts.source != "auto":
        return opts
    if "refine" in context.disabled:
        return opts.replace(source="affine")
    done = atlas.stage_records().get("refine", {}).get("complete", False) and atlas.group_is_complete("deformation")
    return opts.replace(source="refined" if "refine" in context.planned or done else "affine")


def _needs(atlas: Atlas, opts: WarpOptions) -> tuple[str, ...]:
    return (SOURCES[opts.source][1],)  # resolved: "auto" is already refined or affine


def _build(ctx: StageContext) -> dict:
    """Aligned (x, y, z) of every cell in the atlas frame (um), one task per cell chunk, chunk-aligned with
    ``/cells``."""
    source = ctx.options.source
    task = _identity_chunk if source == "identity" else _warp_chunk
    return _write_aligned(ctx, task, SOURCES[source][0] or "identity")


def _write_aligned(ctx: StageContext, chunk_task, source: str) -> dict:
    """``/aligned`` x, y, z: one ``chunk_task(store, target, a, b, source, z)`` per cell chunk."""
    atlas, group = ctx.atlas, ctx.group
    n, chunk = atlas.n_cells, atlas.cell_chunk
    for k in ("x", "y", "z"):
        arrays.create(group, k, (n,), np.float32, (chunk,), ("cell",), {"units": "um"})
    z = atlas.sections.z.to_numpy(np.float64)
    tasks = [
        dask.delayed(chunk_task, pure=False)(atlas.path, group.path, a, min(a + chunk, n), source, z)
        for a in range(0, n, chunk)
    ]
    written = sum(ctx.compute(*tasks))
    ensure(written == n, f"warp wrote {written} rows of {n}")
    return {"n_cells": n, "transform": source}


def _identity_chunk(store: str, target: str, a: int, b: int, source: str, z: np.ndarray) -> int:
    root = open_root(store, "r+")
    for k in ("x", "y"):
        root[f"{target}/{k}"][a:b] = np.asarray(root[f"cells/{k}"][a:b], np.float32)
    root[f"{target}/z"][a:b] = z[np.asarray(root["cells/section"][a:b])].astype(np.float32)
    return b - a


STAGE = Stage(
    name="warp",
    output="aligned",
    inputs=("register", "refine"),  # the one its source names (_needs)
    options=WarpOptions,
    version=1,
    summary="Each section's transform applied to its cells: aligned x, y, z (um) in ``/aligned``.",
    build=_build,
    element="lamina.aligned",
    pipeline="align",
    needs=_needs,
    resolve=_resolve,
)
warp = STAGE.function


def mark_aligned(atlas: Atlas, client=None, force: bool = False):
    """Record cells that are already registered (e.g. imported from another tool): ``/aligned`` = raw x, y and
    the section's z, as a completed ``warp`` stage, so the downstream stages can run without registration."""
    return warp(atlas, client=client, force=force, source="identity")

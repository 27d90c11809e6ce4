"""Stage ``warp``: apply each section's transform to its cells, one task per cell chunk -> ``/aligned``.

The transform is the refined one (``/deformation``: affine, then a displacement sampled bilinearly on the
atlas canvas) when the ``refine`` stage has run, else the affine of ``/transforms``.
"""
from __future__ import annotations

import dask
import numpy as np
import zarr

from ..cluster import compute
from ..store import arrays
from ..store.atlas import Atlas
from ..transforms import apply_stored
from .runner import StageResult, run_stage


def _warp_chunk(store: str, target: str, a: int, b: int, source: str, z: np.ndarray) -> int:
    root = zarr.open_group(store, mode="r+")
    src = root[source]
    affine = np.asarray(src["affine"][...])
    sec = np.asarray(root["cells/section"][a:b])
    xy = np.stack([root["cells/x"][a:b], root["cells/y"][a:b]], 1).astype(np.float64)
    out = np.empty_like(xy)
    for s in np.unique(sec):  # a chunk spans few sections: one vectorised call each
        m = sec == s
        out[m] = apply_stored(src, int(s), xy[m], affine[s])
    if not np.all(np.isfinite(out)):
        raise AssertionError(f"non-finite aligned coordinates in rows [{a}, {b})")
    root[f"{target}/x"][a:b] = out[:, 0].astype(np.float32)
    root[f"{target}/y"][a:b] = out[:, 1].astype(np.float32)
    root[f"{target}/z"][a:b] = z[sec].astype(np.float32)
    return b - a


def warp(atlas: Atlas, client=None, force: bool = False, refined: bool | None = None) -> StageResult:
    """Aligned (x, y, z) of every cell in the atlas frame (um), chunk-aligned with ``/cells``.

    ``refined``: use ``/deformation`` (True), the affine ``/transforms`` (False), or whichever is newest
    complete (None: ``/deformation`` when ``refine`` has run).
    """
    atlas.writable()
    if refined is None:
        refined = atlas.stage_records().get("refine", {}).get("complete", False) and atlas.group_is_complete("deformation")
    source, inputs = ("deformation", ("refine",)) if refined else ("transforms", ("register",))

    def build(group):
        return _write_aligned(atlas, group, client, _warp_chunk, source)

    return run_stage(atlas, "warp", "aligned", {"source": source}, build, inputs=inputs, force=force)


def _write_aligned(atlas: Atlas, group, client, chunk_task, source: str) -> dict:
    """``/aligned`` x, y, z: one ``chunk_task(store, target, a, b, source, z)`` per cell chunk."""
    n, chunk = atlas.n_cells, atlas.cell_chunk
    for k in ("x", "y", "z"):
        arrays.create(group, k, (n,), np.float32, (chunk,), ("cell",), {"units": "um"})
    z = atlas.sections.z.to_numpy(np.float64)
    tasks = [dask.delayed(chunk_task, pure=False)(atlas.path, group.path, a, min(a + chunk, n), source, z)
             for a in range(0, n, chunk)]
    assert sum(compute(*tasks, client=client)) == n
    return {"n_cells": n, "transform": source}


def _identity_chunk(store: str, target: str, a: int, b: int, source: str, z: np.ndarray) -> int:
    root = zarr.open_group(store, mode="r+")
    for k in ("x", "y"):
        root[f"{target}/{k}"][a:b] = np.asarray(root[f"cells/{k}"][a:b], np.float32)
    root[f"{target}/z"][a:b] = z[np.asarray(root["cells/section"][a:b])].astype(np.float32)
    return b - a


def mark_aligned(atlas: Atlas, client=None, force: bool = False) -> StageResult:
    """Record cells that are already registered (e.g. imported from another tool): ``/aligned`` = raw x, y and
    the section's z, as a completed ``warp`` stage, so the downstream stages can run without registration."""
    atlas.writable()

    def build(group):
        return _write_aligned(atlas, group, client, _identity_chunk, "identity")

    return run_stage(atlas, "warp", "aligned", {"source": "identity"}, build, inputs=("ingest",), force=force)

"""Stage ``warp``: apply each section's transform to its cells, one task per cell chunk -> ``/aligned``."""
from __future__ import annotations

import dask
import numpy as np
import zarr

from ..cluster import compute
from ..store import arrays
from ..store.atlas import Atlas
from .runner import StageResult, run_stage


def _warp_chunk(store: str, target: str, a: int, b: int, affine: np.ndarray, z: np.ndarray) -> int:
    root = zarr.open_group(store, mode="r+")
    sec = np.asarray(root["cells/section"][a:b])
    xy = np.stack([root["cells/x"][a:b], root["cells/y"][a:b]], 1).astype(np.float64)
    A = affine[sec]                                                    # [n, 3, 3] gathered per cell
    out = np.einsum("nij,nj->ni", A[:, :2, :2], xy) + A[:, :2, 2]
    if not np.all(np.isfinite(out)):
        raise AssertionError(f"non-finite aligned coordinates in rows [{a}, {b})")
    root[f"{target}/x"][a:b] = out[:, 0].astype(np.float32)
    root[f"{target}/y"][a:b] = out[:, 1].astype(np.float32)
    root[f"{target}/z"][a:b] = z[sec].astype(np.float32)
    return b - a


def warp(atlas: Atlas, client=None, force: bool = False) -> StageResult:
    """Aligned (x, y, z) of every cell in the atlas frame (um), chunk-aligned with ``/cells``."""
    atlas.writable()

    def build(group):
        n, chunk = atlas.n_cells, atlas.cell_chunk
        for k in ("x", "y", "z"):
            arrays.create(group, k, (n,), np.float32, (chunk,), ("cell",), {"units": "um"})
        affine = np.asarray(atlas.root["transforms/affine"][...])
        z = atlas.sections.z.to_numpy(np.float64)
        tasks = [dask.delayed(_warp_chunk, pure=False)(atlas.path, group.path, a, min(a + chunk, n), affine, z)
                 for a in range(0, n, chunk)]
        assert sum(compute(*tasks, client=client)) == n
        return {"n_cells": n}

    return run_stage(atlas, "warp", "aligned", {}, build, inputs=("register",), force=force)

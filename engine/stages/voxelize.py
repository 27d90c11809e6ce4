"""Stage ``voxelize``: cells (observed + interpolated) -> ``/volume``, mean PC and cell count per voxel.

The observed cells (``/aligned`` + ``/pca/pcs``) and, when present, the interpolated layers
(``/interpolated``) are put on an isotropic grid over the atlas frame. The unit of work is one chunk of the
volume (a z-slab x y-tile): the task reads only the sections and gaps whose depths fall in the slab, a row
chunk at a time, and scatter-adds them (``kernels.voxel.accumulate``) into the chunk it then writes, so no
task ever holds more than one volume chunk and one row chunk. A grid whose uncompressed size would not fit
on the store's disk is refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import zarr

from ..kernels.voxel import accumulate, mean_or_nan, voxel_index
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import PlanContext, Stage, StageContext
from .options import Options, option

CHUNK_BYTES = 32 * 2**20
DEFAULT_VOXEL_UM = 10.0


@dataclass(frozen=True)
class VoxelizeOptions(Options):
    voxel_um: float | None = option(None, "voxel edge (um); null: the interpolation's dz_um, else 10", gt=0)
    use_interpolated: bool | None = option(
        None, "include the interpolated layers; null: when interpolate runs or has run"
    )
    sections: tuple[str | int, ...] | None = option(
        None, "observed sections put in the volume (ids or positions; e.g. the flow's, to hold one out); null: all"
    )


def volume_chunks(P: int, shape: tuple[int, int, int], budget: int = CHUNK_BYTES) -> tuple[int, int]:
    """``(cz, ty)``: z-slab depth and y-tile height so one ``[P, cz, ty, X]`` float32 chunk is ~``budget``."""
    Z, Y, X = shape
    plane_row = 4 * max(P, 1) * X
    ty = int(np.clip(budget // plane_row, 1, Y))
    cz = int(np.clip(budget // (plane_row * ty), 1, Z)) if ty == Y else 1
    return cz, ty


def grid(atlas: Atlas, voxel_um: float, interpolated: bool = True) -> dict:
    """Origin (corner, um), shape ``(Z, Y, X)`` and voxel size covering every aligned (and interpolated) cell."""
    lazy = [atlas._lazy(f"aligned/{k}") for k in ("x", "y")]
    if interpolated and atlas.group_is_complete("interpolated") and atlas.root["interpolated/x"].shape[0]:
        lazy = [da.concatenate([lz, atlas._lazy(f"interpolated/{k}")]) for lz, k in zip(lazy, ("x", "y"))]
    xmin, xmax, ymin, ymax = (
        float(v) for v in dask.compute(lazy[0].min(), lazy[0].max(), lazy[1].min(), lazy[1].max())
    )
    z = atlas.sections.z.to_numpy(np.float64)
    lo = np.array([xmin, ymin, z.min()]) - voxel_um / 2  # the extreme cells sit at voxel centres
    hi = np.array([xmax, ymax, z.max()])
    n = np.floor((hi - lo) / voxel_um).astype(np.int64) + 1
    return {"origin": lo.tolist(), "voxel_um": float(voxel_um), "shape": (int(n[2]), int(n[1]), int(n[0]))}


def _row_ranges(
    root: zarr.Group, z0: float, z1: float, interpolated: bool, observed: list[int] | None = None
) -> list[tuple[str, str, int, int]]:
    """(coordinates group, PCs array, start, stop) of every block of rows that may hold depths in [z0, z1);
    ``observed``: the sections whose own cells count (positions; None: all)."""
    sec = root["sections"]
    z = np.asarray(sec["z"][...], np.float64)
    starts, stops = np.asarray(sec["cell_start"][...]), np.asarray(sec["cell_stop"][...])
    inside = (z >= z0) & (z < z1)
    if observed is not None:
        inside &= np.isin(np.arange(len(z)), observed)
    out = [("aligned", "pca/pcs", int(starts[s]), int(stops[s])) for s in np.flatnonzero(inside)]
    if interpolated and "interpolated" in root and root["interpolated"].attrs.get("complete"):
        g = root["interpolated"]
        lo = np.asarray(g["gap_section"][...])
        gs, ge = np.asarray(g["gap_start"][...]), np.asarray(g["gap_stop"][...])
        nxt = {int(s): float(z[np.flatnonzero(z > z[s])].min()) if np.any(z > z[s]) else float(z[s]) for s in lo}
        for i, s in enumerate(lo):
            if z[s] < z1 and nxt[int(s)] > z0:
                out.append(("interpolated", "interpolated/pcs", int(gs[i]), int(ge[i])))
    return out


def _voxelize_chunk(
    store: str,
    target: str,
    geom: dict,
    zc: int,
    yc: int,
    cz: int,
    ty: int,
    read_rows: int,
    interpolated: bool,
    observed: list[int] | None = None,
) -> int:
    root = open_root(store, "r+")
    Z, Y, X = geom["shape"]
    v, (ox, oy, oz) = geom["voxel_um"], geom["origin"]
    z_lo, z_hi = zc * cz, min(Z, (zc + 1) * cz)
    y_lo, y_hi = yc * ty, min(Y, (yc + 1) * ty)
    shape = (z_hi - z_lo, y_hi - y_lo, X)
    P = int(root["pca/pcs"].shape[1])
    sums = np.zeros((P,) + shape)
    counts = np.zeros(shape)
    n = 0
    section_z = np.asarray(root["sections/z"][...], np.float64)
    for group, pcs_name, a0, b0 in _row_ranges(root, oz + z_lo * v, oz + z_hi * v, interpolated, observed):
        for a in range(a0, b0, read_rows):
            b = min(b0, a + read_rows)
            if group == "aligned":
                sec = np.asarray(root["cells/section"][a:b])
                zz = section_z[sec]
                w = None
            else:
                zz = np.asarray(root[f"{group}/z"][a:b], np.float64)
                w = np.asarray(root[f"{group}/weight"][a:b])
            iz = voxel_index(zz, oz, v) - z_lo
            iy = voxel_index(root[f"{group}/y"][a:b], oy, v) - y_lo
            ix = voxel_index(root[f"{group}/x"][a:b], ox, v)
            m = (iz >= 0) & (iz < shape[0]) & (iy >= 0) & (iy < shape[1]) & (ix >= 0) & (ix < X)
            if not m.any():
                continue
            s, c = accumulate(
                iz[m], iy[m], ix[m], np.asarray(root[pcs_name][a:b])[m], shape, None if w is None else w[m]
            )
            sums += s
            counts += c
            n += int(m.sum())
    out = root[target]
    out["pcs"][:, z_lo:z_hi, y_lo:y_hi, :] = mean_or_nan(sums, counts)
    out["density"][z_lo:z_hi, y_lo:y_hi, :] = counts.astype(np.float32)
    return n


def _interpolated_done(atlas: Atlas) -> bool:
    return bool(atlas.stage_records().get("interpolate", {}).get("complete")) and atlas.group_is_complete(
        "interpolated"
    )


def _resolve(atlas: Atlas, opts: VoxelizeOptions, context: PlanContext) -> VoxelizeOptions:
    if opts.use_interpolated is not None:
        return opts
    if "interpolate" in context.disabled:
        return opts.replace(use_interpolated=False)
    return opts.replace(use_interpolated="interpolate" in context.planned or _interpolated_done(atlas))


def _needs(atlas: Atlas, opts: VoxelizeOptions) -> tuple[str, ...]:
    return ("warp", "pca") + (("interpolate",) if opts.use_interpolated else ())  # resolved: never null here


def _prepare(atlas: Atlas, opts: VoxelizeOptions) -> dict:
    use = bool(opts.use_interpolated)
    voxel = opts.voxel_um
    if voxel is None:
        voxel = atlas.stage_records()["interpolate"]["params"]["layer_dz_um"] if use else DEFAULT_VOXEL_UM
    observed = None if opts.sections is None else sorted({atlas.section_index(s) for s in opts.sections})
    return {"grid_voxel_um": float(voxel), "interpolated": use, "observed_sections": observed}


def _build(ctx: StageContext) -> dict:
    """Weighted mean PCs ``[pc, z, y, x]`` and cell counts ``[z, y, x]`` on an isotropic grid -> ``/volume``."""
    atlas, group = ctx.atlas, ctx.group
    voxel_um, interpolated = ctx.prepared["grid_voxel_um"], ctx.prepared["interpolated"]
    observed = ctx.prepared["observed_sections"]
    geom = grid(atlas, voxel_um, interpolated)
    Z, Y, X = geom["shape"]
    P = int(atlas.root["pca/pcs"].shape[1])
    atlas.check_disk(
        Z * Y * X * (P + 1) * 4, f"a {Z}x{Y}x{X} voxel grid of {voxel_um:g} um with {P} PCs", "choose a larger voxel_um"
    )
    cz, ty = volume_chunks(P, geom["shape"])
    attrs = {"voxel_um": voxel_um, "origin": geom["origin"], "units": "um"}
    arrays.create(
        group, "pcs", (P, Z, Y, X), np.float32, (P, cz, ty, X), ("pc", "z", "y", "x"), attrs, fill_value=np.nan
    )
    arrays.create(
        group,
        "density",
        (Z, Y, X),
        np.float32,
        (cz, ty, X),
        ("z", "y", "x"),
        {**attrs, "description": "cells per voxel (interpolated cells count with their weight)"},
    )
    group.attrs.update({**attrs, "shape": [Z, Y, X], "chunks": [cz, ty], "interpolated": interpolated})
    tasks = [
        dask.delayed(_voxelize_chunk, pure=False)(
            atlas.path, group.path, geom, zc, yc, cz, ty, atlas.cell_chunk, interpolated, observed
        )
        for zc in range(-(-Z // cz))
        for yc in range(-(-Y // ty))
    ]
    n = sum(ctx.compute(*tasks))
    return {"shape": [Z, Y, X], "voxel_um": voxel_um, "cells": int(n), "observed_sections": observed}


STAGE = Stage(
    name="voxelize",
    output="volume",
    inputs=("warp", "pca", "interpolate"),
    options=VoxelizeOptions,
    version=1,
    summary="Observed and interpolated cells on an isotropic grid: mean PCs and cells per voxel.",
    build=_build,
    element="lamina.volume",
    pipeline="reconstruct",
    needs=_needs,
    resolve=_resolve,
    prepare=_prepare,
)
voxelize = STAGE.function

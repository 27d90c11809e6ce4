"""Stages ``voxelize`` (cells -> ``/volume``) and ``invert`` (``/volume`` -> ``/expression``), plus the
streaming Parquet export of the expression volume.

``voxelize`` puts the observed cells (``/aligned`` + ``/pca/pcs``) and, when present, the interpolated
layers (``/interpolated``) on an isotropic grid over the atlas frame: mean PC and cell count per voxel.
Its unit of work is one chunk of the volume (a z-slab x y-tile): the task reads only the sections and gaps
whose depths fall in the slab, a row chunk at a time, and scatter-adds them (``kernels.voxel.accumulate``)
into the chunk it then writes, so no task ever holds more than one volume chunk and one row chunk.
``invert`` maps each volume chunk back to genes, one block matmul per gene chunk (``kernels.pca``).
Both refuse, before writing, a grid whose uncompressed size would not fit on the store's disk.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from ..cluster import compute
from ..errors import InputError, StoreError, TooLargeError
from ..kernels.pca import invert_volume
from ..kernels.voxel import accumulate, mean_or_nan, voxel_index
from ..store import arrays
from ..store.arrays import as_text
from ..store.atlas import Atlas, _is_url
from .pca import read_pca
from .runner import StageResult, run_stage

CHUNK_BYTES = 32 * 2**20


def _check_disk(atlas: Atlas, need: int, what: str, hint: str) -> None:
    if _is_url(atlas.path):
        return
    free = shutil.disk_usage(Path(atlas.path).resolve().parent).free
    if need > free:
        raise TooLargeError(f"{what} would take up to {need / 2**30:.1f} GiB uncompressed but only "
                            f"{free / 2**30:.1f} GiB are free next to {atlas.path}; {hint}")


def volume_chunks(P: int, shape: tuple[int, int, int], budget: int = CHUNK_BYTES) -> tuple[int, int]:
    """``(cz, ty)``: z-slab depth and y-tile height so one ``[P, cz, ty, X]`` float32 chunk is ~``budget``."""
    Z, Y, X = shape
    plane_row = 4 * max(P, 1) * X
    ty = int(np.clip(budget // plane_row, 1, Y))
    cz = int(np.clip(budget // (plane_row * ty), 1, Z)) if ty == Y else 1
    return cz, ty


def grid(atlas: Atlas, voxel_um: float) -> dict:
    """Origin (corner, um), shape ``(Z, Y, X)`` and voxel size covering every aligned and interpolated cell."""
    lazy = [atlas._lazy(f"aligned/{k}") for k in ("x", "y")]
    if atlas.group_is_complete("interpolated") and atlas.root["interpolated/x"].shape[0]:
        lazy = [da.concatenate([lz, atlas._lazy(f"interpolated/{k}")]) for lz, k in zip(lazy, ("x", "y"))]
    xmin, xmax, ymin, ymax = (float(v) for v in dask.compute(lazy[0].min(), lazy[0].max(), lazy[1].min(), lazy[1].max()))
    z = atlas.sections.z.to_numpy(np.float64)
    lo = np.array([xmin, ymin, z.min()]) - voxel_um / 2   # the extreme cells sit at voxel centres
    hi = np.array([xmax, ymax, z.max()])
    n = np.floor((hi - lo) / voxel_um).astype(np.int64) + 1
    return {"origin": lo.tolist(), "voxel_um": float(voxel_um), "shape": (int(n[2]), int(n[1]), int(n[0]))}


def _row_ranges(root: zarr.Group, z0: float, z1: float) -> list[tuple[str, str, int, int]]:
    """(coordinates group, PCs array, start, stop) of every block of rows that may hold depths in [z0, z1)."""
    sec = root["sections"]
    z = np.asarray(sec["z"][...], np.float64)
    starts, stops = np.asarray(sec["cell_start"][...]), np.asarray(sec["cell_stop"][...])
    out = [("aligned", "pca/pcs", int(starts[s]), int(stops[s])) for s in np.flatnonzero((z >= z0) & (z < z1))]
    if "interpolated" in root and root["interpolated"].attrs.get("complete"):
        g = root["interpolated"]
        lo = np.asarray(g["gap_section"][...])
        gs, ge = np.asarray(g["gap_start"][...]), np.asarray(g["gap_stop"][...])
        nxt = {int(s): float(z[np.flatnonzero(z > z[s])].min()) if np.any(z > z[s]) else float(z[s]) for s in lo}
        for i, s in enumerate(lo):
            if z[s] < z1 and nxt[int(s)] > z0:
                out.append(("interpolated", "interpolated/pcs", int(gs[i]), int(ge[i])))
    return out


def _voxelize_chunk(store: str, target: str, geom: dict, zc: int, yc: int, cz: int, ty: int, read_rows: int) -> int:
    root = zarr.open_group(store, mode="r+")
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
    for group, pcs_name, a0, b0 in _row_ranges(root, oz + z_lo * v, oz + z_hi * v):
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
            s, c = accumulate(iz[m], iy[m], ix[m], np.asarray(root[pcs_name][a:b])[m], shape,
                              None if w is None else w[m])
            sums += s
            counts += c
            n += int(m.sum())
    out = root[target]
    out["pcs"][:, z_lo:z_hi, y_lo:y_hi, :] = mean_or_nan(sums, counts)
    out["density"][z_lo:z_hi, y_lo:y_hi, :] = counts.astype(np.float32)
    return n


def voxelize(atlas: Atlas, voxel_um: float | None = None, client=None, force: bool = False) -> StageResult:
    """Weighted mean PCs ``[pc, z, y, x]`` and cell counts ``[z, y, x]`` on an isotropic grid -> ``/volume``.

    ``voxel_um`` defaults to the interpolation's ``dz_um`` (10 um when there is none). Uses the
    interpolated layers when the ``interpolate`` stage has run.
    """
    atlas.writable()
    records = atlas.stage_records()
    for need in ("warp", "pca"):
        if not records.get(need, {}).get("complete"):
            raise StoreError(f"voxelize needs the '{need}' stage of {atlas.path}; run lamina.align() and lamina.pca() first")
    interpolated = bool(records.get("interpolate", {}).get("complete")) and atlas.group_is_complete("interpolated")
    if voxel_um is None:
        voxel_um = records["interpolate"]["params"]["dz_um"] if interpolated else 10.0
    voxel_um = float(voxel_um)
    if not (np.isfinite(voxel_um) and voxel_um > 0):
        raise InputError(f"voxelize: voxel_um must be a positive number of um, got {voxel_um}")
    inputs = ("warp", "pca") + (("interpolate",) if interpolated else ())

    def build(group):
        geom = grid(atlas, voxel_um)
        Z, Y, X = geom["shape"]
        P = int(atlas.root["pca/pcs"].shape[1])
        _check_disk(atlas, Z * Y * X * (P + 1) * 4, f"a {Z}x{Y}x{X} voxel grid of {voxel_um:g} um with {P} PCs",
                    "choose a larger voxel_um")
        cz, ty = volume_chunks(P, geom["shape"])
        attrs = {"voxel_um": voxel_um, "origin": geom["origin"], "units": "um"}
        arrays.create(group, "pcs", (P, Z, Y, X), np.float32, (P, cz, ty, X), ("pc", "z", "y", "x"), attrs,
                      fill_value=np.nan)
        arrays.create(group, "density", (Z, Y, X), np.float32, (cz, ty, X), ("z", "y", "x"),
                      {**attrs, "description": "cells per voxel (interpolated cells count with their weight)"})
        group.attrs.update({**attrs, "shape": [Z, Y, X], "chunks": [cz, ty], "interpolated": interpolated})
        tasks = [dask.delayed(_voxelize_chunk, pure=False)(atlas.path, group.path, geom, zc, yc, cz, ty, atlas.cell_chunk)
                 for zc in range(-(-Z // cz)) for yc in range(-(-Y // ty))]
        n = sum(compute(*tasks, client=client))
        return {"shape": [Z, Y, X], "voxel_um": voxel_um, "cells": int(n)}

    return run_stage(atlas, "voxelize", "volume", {"voxel_um": voxel_um, "interpolated": interpolated}, build,
                     inputs=inputs, force=force)


def _invert_chunk(store: str, target: str, zc: int, yc: int, cz: int, ty: int, gene_chunk: int) -> int:
    root = zarr.open_group(store, mode="r+")
    vol = root["volume/pcs"]
    Z, Y = vol.shape[1:3]
    zs, ys = slice(zc * cz, min(Z, (zc + 1) * cz)), slice(yc * ty, min(Y, (yc + 1) * ty))
    block = np.asarray(vol[:, zs, ys, :])
    pca = read_pca(root)
    out = root[f"{target}/values"]
    G = out.shape[0]
    for g0 in range(0, G, gene_chunk):
        gs = slice(g0, min(G, g0 + gene_chunk))
        out[gs, zs, ys, :] = invert_volume(block, pca["mean"][gs], pca["scale"][gs], pca["components"][:, gs])
    return int(block[0].size) if len(block) else 0


def invert(atlas: Atlas, client=None, force: bool = False) -> StageResult:
    """Gene expression per voxel ``[gene, z, y, x]`` from ``/volume`` -> ``/expression`` (NaN in empty voxels)."""
    atlas.writable()
    if not atlas.group_is_complete("volume"):
        raise StoreError(f"{atlas.path} has no complete /volume; run lamina.voxelize(atlas) first")
    vol = atlas.root["volume"]
    P, Z, Y, X = vol["pcs"].shape
    G = atlas.n_genes
    cz, ty = (int(c) for c in vol.attrs["chunks"])
    gene_chunk = int(np.clip(CHUNK_BYTES // (4 * cz * ty * X), 1, G))

    def build(group):
        _check_disk(atlas, G * Z * Y * X * 4, f"the expression volume ({G} genes x {Z}x{Y}x{X} voxels)",
                    "invert fewer genes, or voxelize with a larger voxel_um")
        attrs = {k: vol.attrs[k] for k in ("voxel_um", "origin", "units")}
        arrays.create(group, "values", (G, Z, Y, X), np.float32, (gene_chunk, cz, ty, X), ("gene", "z", "y", "x"),
                      attrs, fill_value=np.nan)
        arrays.write_small(group, "gene", atlas.genes.to_numpy().astype(str), ("gene",))
        group.attrs.update(attrs)
        tasks = [dask.delayed(_invert_chunk, pure=False)(atlas.path, group.path, zc, yc, cz, ty, gene_chunk)
                 for zc in range(-(-Z // cz)) for yc in range(-(-Y // ty))]
        voxels = sum(compute(*tasks, client=client))
        return {"genes": G, "voxels": int(voxels), "gene_chunk": gene_chunk}

    return run_stage(atlas, "invert", "expression", {"genes": G}, build, inputs=("voxelize",), force=force)


def export_expression_parquet(atlas: Atlas, path, genes=None, row_group_rows: int = 65_536) -> int:
    """Stream ``/expression`` to Parquet: one row per occupied voxel (x, y, z voxel centres in um, the
    cell count, one column per gene), written a volume chunk at a time in row groups of ``row_group_rows``.
    Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not atlas.group_is_complete("expression"):
        raise StoreError(f"{atlas.path} has no complete /expression; run lamina.invert(atlas) first")
    expr = atlas.root["expression"]
    values, dens = expr["values"], atlas.root["volume/density"]
    names = [str(g) for g in as_text(expr["gene"][...])]
    idx = np.arange(len(names))
    if genes is not None:
        missing = [g for g in genes if g not in names]
        if missing:
            raise InputError(f"genes not in the expression volume of {atlas.path}: {missing[:10]}")
        idx = np.array([names.index(g) for g in genes])
    v, (ox, oy, oz) = float(expr.attrs["voxel_um"]), expr.attrs["origin"]
    _, Z, Y, X = values.shape
    cz, ty = values.chunks[1:3]
    schema = pa.schema([(k, pa.float32()) for k in ("x", "y", "z")] + [("cells", pa.float32())]
                       + [(names[i], pa.float32()) for i in idx])
    rows = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        buffer: list[pa.Table] = []
        buffered = 0
        for z0 in range(0, Z, cz):
            for y0 in range(0, Y, ty):
                zs, ys = slice(z0, min(Z, z0 + cz)), slice(y0, min(Y, y0 + ty))
                count = np.asarray(dens[zs, ys, :])
                k, j, i = np.nonzero(count > 0)
                if not len(k):
                    continue
                block = np.asarray(values.oindex[idx, zs, ys, :])[:, k, j, i]
                cols = {"x": ox + (i + 0.5) * v, "y": oy + (y0 + j + 0.5) * v, "z": oz + (z0 + k + 0.5) * v}
                data = [pa.array(cols[c].astype(np.float32)) for c in ("x", "y", "z")] + [pa.array(count[k, j, i].astype(np.float32))]
                data += [pa.array(block[g]) for g in range(len(idx))]
                buffer.append(pa.Table.from_arrays(data, schema=schema))
                buffered += len(k)
                if buffered >= row_group_rows:
                    writer.write_table(pa.concat_tables(buffer), row_group_size=row_group_rows)
                    rows += buffered
                    buffer, buffered = [], 0
        if buffer:
            writer.write_table(pa.concat_tables(buffer), row_group_size=row_group_rows)
            rows += buffered
    return rows

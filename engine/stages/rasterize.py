"""Stage ``rasterize``: every section -> a smoothed density image per cell type on one shared canvas.

Each section is drawn in its own centred frame (raw coordinates minus the section's centroid from
``/qc``), so all sections overlap on one canvas whatever their raw offsets; one Dask task per section
streams the section's cells chunk by chunk through ``kernels.raster.splat`` and writes its own
``[1, C, H, W]`` chunk of ``/raster/cells``.
"""
from __future__ import annotations

import dask
import numpy as np
import zarr

from ..cluster import compute
from ..kernels.raster import smooth, splat
from ..store import arrays
from ..store.atlas import Atlas
from .runner import StageResult, run_stage

MAX_CANVAS_PX = 256


def canvas_geometry(atlas: Atlas, pixel_um: float | None, max_px: int = MAX_CANVAS_PX) -> dict:
    """Centroids, canvas half-width and pixel size (um) from the ``/qc`` table (small)."""
    qc = atlas.root["qc"]
    cx, cy = np.asarray(qc["centroid_x"][...]), np.asarray(qc["centroid_y"][...])
    corners = np.stack([np.asarray(qc[k][...]) for k in ("xmin", "xmax", "ymin", "ymax")], 1)
    dx = np.maximum(np.abs(corners[:, 0] - cx), np.abs(corners[:, 1] - cx))
    dy = np.maximum(np.abs(corners[:, 2] - cy), np.abs(corners[:, 3] - cy))
    radius = float(np.max(np.hypot(dx, dy))) * 1.05 + 1.0  # any rotation of any section fits
    n = np.asarray(qc["n_cells"][...]).astype(np.float64)
    spacing = np.sqrt(4 * dx * dy / np.maximum(n, 1))      # typical distance between neighbouring cells
    auto = float(np.clip(np.median(spacing), 2 * radius / max_px, None))
    pixel = float(pixel_um) if pixel_um else auto
    size = int(np.ceil(2 * radius / pixel)) + 1
    return {"centroid": np.stack([cx, cy], 1), "pixel_um": pixel, "size": size,
            "origin": [-(size - 1) / 2 * pixel, -(size - 1) / 2 * pixel]}


def pixel_to_um(raster) -> np.ndarray:
    """3x3 map from canvas pixel (col, row) to section-centred um, read from a ``/raster`` group's attrs."""
    spacing, origin = float(raster.attrs["spacing"]), raster.attrs["origin"]
    return np.array([[spacing, 0, origin[0]], [0, spacing, origin[1]], [0, 0, 1.0]])


def _rasterize_section(store: str, s: int, lo: int, hi: int, center, geom: dict, n_channels: int, use_types: bool,
                       sigma_px: float, chunk: int) -> int:
    root = zarr.open_group(store, mode="r+")
    shape = (geom["size"], geom["size"])
    img = np.zeros((n_channels, *shape), np.float32)
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        x = np.asarray(root["cells/x"][a:b], np.float64) - center[0]
        y = np.asarray(root["cells/y"][a:b], np.float64) - center[1]
        ch = np.asarray(root["cells/cell_type"][a:b]) if use_types else None
        img += splat(x, y, ch, n_channels, geom["origin"], geom["pixel_um"], shape)
    target = root[geom["target"]]
    target[s] = smooth(img, sigma_px)
    return hi - lo


def rasterize(atlas: Atlas, pixel_um: float | None = None, sigma_px: float = 1.5, client=None,
              force: bool = False) -> StageResult:
    """Rasterize every section into ``/raster/cells`` ``[section, channel, y, x]`` (cells per pixel, smoothed).

    ``pixel_um`` default: the typical cell spacing, but no finer than a 256-pixel canvas. Channels are
    the cell types when the atlas has them, else one density channel.
    """
    geom = canvas_geometry(atlas.writable(), pixel_um)
    use_types = "cell_type" in atlas.cell_columns
    names = atlas.categories("cell_type") if use_types else ["density"]
    params = {"pixel_um": geom["pixel_um"], "sigma_px": sigma_px, "size": geom["size"], "channels": names}

    def build(group):
        S, C, N = atlas.n_sections, len(names), geom["size"]
        arrays.create(group, "cells", (S, C, N, N), np.float32, (1, C, N, N), ("section", "channel", "y", "x"),
                      {"units": "cells per pixel", "channels": names})
        arrays.write_small(group, "centroid", geom["centroid"], ("section", "xy"),
                           {"units": "um", "description": "raw (x, y) subtracted before drawing"})
        group.attrs.update({"origin": geom["origin"], "spacing": geom["pixel_um"], "sigma_px": sigma_px,
                            "frame": "section-centred: canvas (x, y) = raw (x, y) - centroid"})
        sec = atlas.sections
        job = dict(geom, target=f"{group.path}/cells")
        tasks = [dask.delayed(_rasterize_section, pure=False)(
            atlas.path, s, int(sec.cell_start.iloc[s]), int(sec.cell_stop.iloc[s]), geom["centroid"][s], job, C,
            use_types, sigma_px, atlas.cell_chunk) for s in range(S)]
        compute(*tasks, client=client)
        return {"pixel_um": geom["pixel_um"], "canvas_px": N}

    return run_stage(atlas, "rasterize", "raster", params, build, inputs=("ingest", "section_stats"), force=force)

"""Stage ``rasterize``: every section -> smoothed density images on one shared canvas: one channel per cell
type, and/or (``channels``) one per sign of each of the first principal components of expression.

Each section is drawn in its own centred frame (raw coordinates minus the section's centroid from
``/qc``), so all sections overlap on one canvas whatever their raw offsets; one Dask task per section
streams the section's cells chunk by chunk through ``kernels.raster.splat`` and writes its own
``[1, C, H, W]`` chunk of ``/raster/cells``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import dask
import numpy as np

from ..errors import InputError
from ..kernels.geometry import grid_to_um
from ..kernels.raster import expression_channels, smooth, splat
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

MAX_CANVAS_PX = 256
CHANNELS = ("auto", "types", "pcs", "types+pcs", "density")

log = logging.getLogger("lamina")


@dataclass(frozen=True)
class RasterizeOptions(Options):
    pixel_um: float | None = option(
        None, "canvas pixel (um); null: the typical cell spacing, no finer than a 256-pixel canvas", gt=0
    )
    sigma_px: float = option(1.5, "Gaussian blur of the density images (pixels)", ge=0)
    channels: Literal["auto", "types", "pcs", "types+pcs", "density"] = option(
        "auto",
        "what the images show: cell types, expression PCs (with a density channel), both, or density; "
        "auto: types, else PCs when there are genes",
    )
    n_pc_channels: int = option(8, "principal components drawn (2 channels each, by sign)", ge=1)
    expression_share: float = option(0.75, "share of each cell's mass spread over the PC channels", gt=0, le=1)


def channel_kind(atlas: Atlas, channels: str = "auto") -> str:
    """What the raster channels are: ``types`` (one per cell type), ``pcs`` (a density channel and the first
    principal components of expression; needs a complete ``pca`` stage), ``types+pcs`` (both: the types
    and the PCs) or ``density``; ``auto``: types when the atlas has them, else PCs when it has at least two
    genes, else density."""
    if channels not in CHANNELS:
        raise InputError(f"rasterize: channels must be one of {', '.join(CHANNELS)}, not {channels!r}")
    has_types, has_genes = "cell_type" in atlas.cell_columns, atlas.n_genes >= 2
    if channels == "auto":
        return "types" if has_types else "pcs" if has_genes else "density"
    if "types" in channels and not has_types:
        raise InputError(f"rasterize: channels={channels!r} but {atlas.path} has no cell_type column")
    if "pcs" in channels and not has_genes:
        raise InputError(
            f"rasterize: channels={channels!r} needs expression of at least 2 genes; {atlas.path} has {atlas.n_genes}"
        )
    return channels


def canvas_geometry(atlas: Atlas, pixel_um: float | None, max_px: int = MAX_CANVAS_PX) -> dict:
    """Centroids, canvas half-width and pixel size (um) from the ``/qc`` table (small)."""
    qc = atlas.root["qc"]
    cx, cy = np.asarray(qc["centroid_x"][...]), np.asarray(qc["centroid_y"][...])
    corners = np.stack([np.asarray(qc[k][...]) for k in ("xmin", "xmax", "ymin", "ymax")], 1)
    dx = np.maximum(np.abs(corners[:, 0] - cx), np.abs(corners[:, 1] - cx))
    dy = np.maximum(np.abs(corners[:, 2] - cy), np.abs(corners[:, 3] - cy))
    radius = float(np.max(np.hypot(dx, dy))) * 1.05 + 1.0  # any rotation of any section fits
    n = np.asarray(qc["n_cells"][...]).astype(np.float64)
    spacing = np.sqrt(4 * dx * dy / np.maximum(n, 1))  # typical distance between neighbouring cells
    auto = float(np.clip(np.median(spacing), 2 * radius / max_px, None))
    pixel = float(pixel_um) if pixel_um else auto
    size = int(np.ceil(2 * radius / pixel)) + 1
    return {
        "centroid": np.stack([cx, cy], 1),
        "pixel_um": pixel,
        "size": size,
        "origin": [-(size - 1) / 2 * pixel, -(size - 1) / 2 * pixel],
    }


def pixel_to_um(raster) -> np.ndarray:
    """3x3 map from canvas pixel (col, row) to section-centred um, read from a ``/raster`` group's attrs."""
    return grid_to_um(float(raster.attrs["spacing"]), raster.attrs["origin"])


def check_half(index: np.ndarray) -> np.ndarray:
    """Bool ``[n]``: which cells (by global row ``index``) fall in the *check half* of their section.

    The top bit of the splitmix64 finaliser of the row: fixed, independent of chunking and of any cell
    property, about one cell in two, and unrelated between consecutive rows (tables are often sorted by
    position; a plain multiplicative hash would interleave the halves in a regular pattern)."""
    z = np.asarray(index, np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as intended
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(bool)


def _rasterize_section(
    store: str,
    s: int,
    lo: int,
    hi: int,
    center,
    geom: dict,
    n_channels: int,
    kind: str,
    n_pcs: int,
    share: float,
    sigma_px: float,
    chunk: int,
) -> int:
    root = open_root(store, "r+")
    shape = (geom["size"], geom["size"])
    img = np.zeros((n_channels, *shape), np.float32)
    half = np.zeros((n_channels, *shape), np.float32)
    expression = "pcs" in kind
    if expression:  # centred on the section's own mean: a shift between sections (batch) is not anatomy
        sd = np.sqrt(np.asarray(root["pca/explained_variance"][:n_pcs], np.float64))
        centre = sum(
            np.asarray(root["pca/pcs"][a : min(hi, a + chunk), :n_pcs], np.float64).sum(0) for a in range(lo, hi, chunk)
        ) / max(hi - lo, 1)
    n_identity = n_channels - 2 * n_pcs
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        x = np.asarray(root["cells/x"][a:b], np.float64) - center[0]
        y = np.asarray(root["cells/y"][a:b], np.float64) - center[1]
        types = np.asarray(root["cells/cell_type"][a:b]) if "types" in kind else None
        weights = None
        unlabelled = types is not None and bool((types < 0).any())
        if expression or unlabelled:
            # identity channels: the type (a cell without one spreads evenly over them, so that it still counts
            # in the density every image sums to), or the one density channel
            if types is None:
                identity = np.ones((b - a, 1))
            else:
                identity = np.eye(n_identity)[np.maximum(types, 0)]
                identity[types < 0] = 1.0 / n_identity
            if expression:  # the identity channels keep 1 - share of each cell's mass, the PC channels the rest
                e = expression_channels(np.asarray(root["pca/pcs"][a:b, :n_pcs]) - centre, sd, share)
                weights = np.hstack([identity * (1.0 - share), e])
            else:
                weights = identity
            types = None
        img += splat(x, y, types, n_channels, geom["origin"], geom["pixel_um"], shape, weights=weights)
        pick = check_half(np.arange(a, b))
        half += splat(
            x[pick],
            y[pick],
            None if types is None else types[pick],
            n_channels,
            geom["origin"],
            geom["pixel_um"],
            shape,
            weights=None if weights is None else weights[pick],
        )
    root[geom["target"]][s] = smooth(img, sigma_px)
    root[geom["half"]][s] = smooth(half, sigma_px)
    return hi - lo


def _needs(atlas: Atlas, opts: RasterizeOptions) -> tuple[str, ...]:
    return ("ingest", "section_stats") + (("pca",) if "pcs" in channel_kind(atlas, opts.channels) else ())


def _check(atlas: Atlas, opts: RasterizeOptions) -> None:
    channel_kind(atlas, opts.channels)


def _layout(atlas: Atlas, opts: RasterizeOptions) -> tuple[str, list[str], int]:
    """(kind, channel names, PCs drawn) of the rasters."""
    kind = channel_kind(atlas, opts.channels)
    names = list(atlas.categories("cell_type")) if "types" in kind else ["density"]
    n_pcs = 0
    if "pcs" in kind:
        n_pcs = min(int(opts.n_pc_channels), int(atlas.root["pca/components"].shape[0]))
        names += [f"PC{i + 1}{sign}" for i in range(n_pcs) for sign in "+-"]
    return kind, names, n_pcs


def _prepare(atlas: Atlas, opts: RasterizeOptions) -> dict:
    geom = canvas_geometry(atlas, opts.pixel_um)
    kind, names, n_pcs = _layout(atlas, opts)
    return {"canvas_pixel_um": geom["pixel_um"], "canvas_px": geom["size"], "channel_names": names}


def _build(ctx: StageContext) -> dict:
    """Rasterize every section into ``/raster/cells`` ``[section, channel, y, x]`` (cells per pixel, smoothed).

    With PC channels, ``expression_share`` of each cell's unit of mass is split over ``2 x n_pc_channels``
    channels by the signs and sizes of its first principal components, centred on its section's mean
    (``kernels.raster.expression_channels``; PCs from the ``pca`` stage), and the rest stays in its type
    channel (``types+pcs``) or a density channel (``pcs``). The channels always sum to the cell density.
    Why 0.75 (measured against 0.5): phantom pairs without types, median error 16.7 against 20.6 um (45.5
    with the density alone); her2st pairs, cluster agreement 0.624 against 0.618 (density alone 0.621) but
    40.3 against 33.9 um from the authors' alignment (35.7). ``types+pcs`` is not the default: on the
    phantom stack it gave 21.7 um against 22.4 with the types alone, within what other shares moved it.
    """
    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    geom = canvas_geometry(atlas, opts.pixel_um)
    kind, names, n_pcs = _layout(atlas, opts)
    share = float(opts.expression_share) if n_pcs else 0.0
    what = {
        "types": "one per label of cell_type",
        "pcs": "cell density split by the signs of the first expression PCs",
        "types+pcs": "labels of cell_type and expression PCs",
        "density": "cell density",
    }[kind]
    log.info(
        "rasterize: registration channels (%s): %s%s",
        what,
        ", ".join(names[:12]),
        " ..." if len(names) > 12 else "",
    )
    if "types" in kind and opts.channels == "auto":
        log.info("rasterize: labels drive the fit; stages.rasterize.channels: density (or pcs) registers without them")
    S, C, N = atlas.n_sections, len(names), geom["size"]
    half = (
        "the same image of the check half of the cells (rasterize.check_half): refine fits each warp on one half "
        "of a section's cells and checks it on the other"
    )
    for name, extra in (("cells", {"kind": kind}), ("half", {"description": half})):
        arrays.create(
            group,
            name,
            (S, C, N, N),
            np.float32,
            (1, C, N, N),
            ("section", "channel", "y", "x"),
            {"units": "cells per pixel", "channels": names, **extra},
        )
    arrays.write_small(
        group,
        "centroid",
        geom["centroid"],
        ("section", "xy"),
        {"units": "um", "description": "raw (x, y) subtracted before drawing"},
    )
    group.attrs.update(
        {
            "origin": geom["origin"],
            "spacing": geom["pixel_um"],
            "sigma_px": opts.sigma_px,
            "frame": "section-centred: canvas (x, y) = raw (x, y) - centroid",
        }
    )
    sec = atlas.sections
    job = dict(geom, target=f"{group.path}/cells", half=f"{group.path}/half")
    tasks = [
        dask.delayed(_rasterize_section, pure=False)(
            atlas.path,
            s,
            int(sec.cell_start.iloc[s]),
            int(sec.cell_stop.iloc[s]),
            geom["centroid"][s],
            job,
            C,
            kind,
            n_pcs,
            share,
            opts.sigma_px,
            atlas.cell_chunk,
        )
        for s in range(S)
    ]
    ctx.compute(*tasks)
    return {"pixel_um": geom["pixel_um"], "canvas_px": N, "channels": kind}


STAGE = Stage(
    name="rasterize",
    output="raster",
    inputs=("ingest", "section_stats", "pca"),  # pca for PC channels only (_needs)
    options=RasterizeOptions,
    version=3,  # 2: cells without a label stay in the density (spread over the type channels); 3: /raster/half
    summary="Every section as smoothed density images on one shared, section-centred canvas.",
    build=_build,
    element="lamina.raster",
    pipeline="align",
    needs=_needs,
    check=_check,
    prepare=_prepare,
)
rasterize = STAGE.function

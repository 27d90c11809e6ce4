"""Stage ``section_stats``: per-section QC table (cells, centroid, spread, extent, cell-type counts).

One Dask task per cell chunk computes partial sums (``kernels.stats``); dask tree-reduces them; the
small per-section result is written to ``/qc/sections``.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from ..kernels.stats import group_category_counts, group_extents, group_moments
from ..store import arrays
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options


@dataclass(frozen=True)
class SectionStatsOptions(Options):
    """``section_stats`` has no options: the table is a fixed set of sums."""


def _per_chunk(*blocks, fn, **kw):
    """Run a partial-sum kernel on one cell chunk, with a leading axis to reduce over."""
    return fn(*blocks, **kw)[None]


def _prepare(atlas: Atlas, opts: SectionStatsOptions) -> dict:
    return {"n_sections": atlas.n_sections}


def _build(ctx: StageContext) -> dict:
    """The per-section QC table into ``/qc``: one partial-sum task per cell chunk, tree-reduced."""
    atlas, group = ctx.atlas, ctx.group
    S = atlas.n_sections
    has_types = "cell_type" in atlas.cell_columns
    ds = atlas.to_xarray()
    sec, x, y = ds["cell_section"].data, ds["x"].data, ds["y"].data
    nb = sec.numblocks[0]
    moments = da.map_blocks(
        _per_chunk,
        sec,
        x,
        y,
        fn=group_moments,
        n_groups=S,
        new_axis=[1, 2],
        chunks=((1,) * nb, (S,), (5,)),
        dtype=np.float64,
    ).sum(axis=0)
    ext = da.map_blocks(
        _per_chunk,
        sec,
        x,
        y,
        fn=group_extents,
        n_groups=S,
        new_axis=[1, 2],
        chunks=((1,) * nb, (S,), (4,)),
        dtype=np.float64,
    )
    lo = ext[:, :, [0, 2]].min(axis=0)
    hi = ext[:, :, [1, 3]].max(axis=0)
    todo = [moments, lo, hi]
    cats = atlas.categories("cell_type") if has_types else []
    if has_types:
        todo.append(
            da.map_blocks(
                _per_chunk,
                sec,
                ds["cell_type"].data,
                fn=group_category_counts,
                n_groups=S,
                n_categories=len(cats),
                new_axis=[1, 2],
                chunks=((1,) * nb, (S,), (len(cats),)),
                dtype=np.int64,
            ).sum(axis=0)
        )
    results = ctx.compute(*todo)
    m, lo, hi = results[:3]
    count = m[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx, cy = m[:, 1] / count, m[:, 2] / count
        sx = np.sqrt(np.maximum(m[:, 3] / count - cx**2, 0))
        sy = np.sqrt(np.maximum(m[:, 4] / count - cy**2, 0))
    um = {"units": "um"}
    for name, values, attrs in [
        ("n_cells", count.astype(np.int64), None),
        ("centroid_x", cx, um),
        ("centroid_y", cy, um),
        ("spread_x", sx, um),
        ("spread_y", sy, um),
        ("xmin", lo[:, 0], um),
        ("ymin", lo[:, 1], um),
        ("xmax", hi[:, 0], um),
        ("ymax", hi[:, 1], um),
    ]:
        arrays.write_small(group, name, values, ("section",), attrs)
    if has_types:
        arrays.write_small(group, "cell_type_counts", results[3], ("section", "cell_type"), {"categories": cats})
    return {"n_sections": S}


STAGE = Stage(
    name="section_stats",
    output="qc",
    inputs=("ingest",),
    options=SectionStatsOptions,
    version=1,
    summary="Per-section QC table (cells, centroid, spread, extent, cell-type counts) into ``/qc``.",
    build=_build,
    element="lamina.section-stats",
    pipeline="align",
    prepare=_prepare,
)
section_stats = STAGE.function

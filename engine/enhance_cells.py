"""Enhanced expression at given cells: a segmentation of the section's image (nuclei, cells) or any points of an
enhanced section -> one row per cell with its metagene scores and genes (what the issue calls "per cell when cells
are segmented or given"); ``project`` makes the cells inside each measured spot average to the spot's measurement.

Data flow, per section (the embedding read one band of grid rows at a time, its halo the cells' radius)::

    cells (the section's raw um, or level-0 image pixels --image_to_section-->) --grid--> (col, row) superpixels
    /enhance/<section>/embedding [band + halo] --footprint_means--> scores [cell, metagene] --@ loadings--> genes
    project: owner spot of each cell (its centre within the spot radius of a fitted spot; the nearest wins)
             --project_to_spots(genes, owner, /X of the owners)--> genes, each spot's cells averaging to its /X

The metagene columns stay the embedding's footprint means; only the gene columns are projected (a spot's
measurement is its genes). Memory: one band of the embedding and the cells' own rows.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, InputError, MissingInputError, UnknownGeneError, UnknownSectionError
from .store.arrays import as_text
from .store.atlas import Atlas

FRAMES = ("section", "image")


def _points(atlas: Atlas, sid: str, xy: np.ndarray, frame: str) -> np.ndarray:
    """The cells' positions in the section's raw um."""
    if frame == "section":
        return xy
    A = np.asarray(atlas.image(sid)["image_to_section"], np.float64)
    return (np.c_[xy, np.ones(len(xy))] @ A.T)[:, :2]


def _checked(atlas: Atlas, cells: pd.DataFrame, section: str, x: str, y: str, frame: str, radius_um) -> np.ndarray:
    if not atlas.group_is_complete("enhance"):
        raise MissingInputError(f"{atlas.path} has no complete /enhance; run lamina.enhance(atlas) first")
    missing = [c for c in (section, x, y) if c not in cells.columns]
    if missing:
        raise InputError(
            f"enhance_cells: the cells have no column(s) {missing} (columns: {', '.join(map(str, cells.columns))}); "
            f"name them with section=, x=, y="
        )
    if frame not in FRAMES:
        raise ConfigError(f"enhance_cells: frame={frame!r}; use 'section' (the section's raw um) or 'image' (pixels)")
    if radius_um is not None and not (math.isfinite(radius_um) and radius_um >= 0):
        raise ConfigError(f"enhance_cells: radius_um={radius_um!r}; give a cell radius in um >= 0, or None")
    xy = cells[[x, y]].to_numpy(np.float64)
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise InputError(
            f"enhance_cells: {int(bad.sum())} cell(s) have NaN or infinite coordinates (first: index "
            f"{cells.index[np.argmax(bad)]!r}); drop or fix them"
        )
    return xy


def enhance_cells(
    atlas: Atlas,
    cells: pd.DataFrame,
    *,
    section: str = "section",
    x: str = "x",
    y: str = "y",
    frame: str = "section",
    radius_um: float | None = None,
    genes=None,
    project: bool = True,
) -> pd.DataFrame:
    """Enhanced expression of given cells (see the module docstring), one row per row of ``cells``, same index.

    ``cells``: a table with the section id and the cell centre (``section``, ``x``, ``y`` name its columns),
    in the section's raw um (``frame='section'``, the frame of ``/cells/x, y``) or in level-0 pixels of the
    section's image (``frame='image'``, as a segmentation of that image gives them). ``radius_um``: the cell's
    disc; the embedding's mean over the superpixels whose centres lie within it (None or less than half a
    superpixel: the superpixel under the centre). ``genes``: model genes to return (default all).
    ``project``: shift the gene columns of the cells inside each fitted spot so their mean equals the spot's
    measurement (/X); a cell belongs to the fitted spot whose centre is nearest, within the spot radius.

    Columns: ``section``, ``x``, ``y`` (raw um), ``z``, ``atlas_x``, ``atlas_y`` (when aligned), ``spot`` (the
    /cells row of the owning fitted spot; -1 for none, or without ``project``), ``metagene_0 ...``, then one
    column per gene.
    """
    from scipy.spatial import cKDTree

    from .export_enhance import is_aligned
    from .kernels.enhance import footprint_means, project_to_spots
    from .stages.enhancement import read_expression
    from .transforms import to_atlas

    xy_in = _checked(atlas, cells, section, x, y, frame, radius_um)
    g = atlas.root["enhance"]
    names = list(as_text(g["model/gene"][...]))
    genes = names if genes is None else [str(v) for v in genes]
    unknown = [v for v in genes if v not in set(names)]
    if unknown:
        raise UnknownGeneError(f"enhance_cells: gene(s) {unknown[:10]} are not model genes of {atlas.path}/enhance")
    cols = np.array([names.index(v) for v in genes], np.int64)
    H = np.asarray(g["model/loadings"][...], np.float64)[:, cols]
    R, n = H.shape[0], len(cells)
    done = [str(s) for s in g.attrs["sections"]]
    sec_of = cells[section].astype(str).to_numpy()
    unknown_sec = sorted(set(sec_of) - set(done))
    if unknown_sec:
        raise UnknownSectionError(
            f"enhance_cells: section(s) {unknown_sec[:10]} of the cells are not enhanced in {atlas.path} "
            f"(enhanced: {', '.join(done)})"
        )
    store_gene = {v: i for i, v in enumerate(atlas.genes)}
    gene_idx = np.array([store_gene[v] for v in genes], np.int64)
    secs = atlas.sections
    aligned = is_aligned(atlas)
    out = {
        "xy": np.full((n, 2), np.nan),
        "atlas": np.full((n, 2), np.nan),
        "z": np.full(n, np.nan),
        "spot": np.full(n, -1, np.int64),
        "scores": np.full((n, R), np.nan),
        "genes": np.full((n, len(genes)), np.nan),
    }
    for sid in done:
        take = np.flatnonzero(sec_of == sid)
        if not len(take):
            continue
        grp = g[sid]
        emb = grp["embedding"]
        _, h, w = emb.shape
        sp_um = float(grp.attrs["superpixel_um"])
        A = np.asarray(grp.attrs["grid_to_section"], np.float64)
        pts = _points(atlas, sid, xy_in[take], frame)
        c = (np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(A).T)[:, :2]  # (col, row) in superpixels
        outside = (c[:, 0] < 0) | (c[:, 0] >= w) | (c[:, 1] < 0) | (c[:, 1] >= h)
        if outside.any():
            raise InputError(
                f"enhance_cells: {int(outside.sum())} of {len(take)} cells of section {sid!r} lie outside its "
                f"enhanced grid ({w * sp_um:.0f} x {h * sp_um:.0f} um; first: index {cells.index[take[outside][0]]!r} "
                f"at ({pts[outside][0, 0]:.1f}, {pts[outside][0, 1]:.1f}) um); check frame= ('section' um or "
                f"'image' pixels) and the section column"
            )
        radius_sp = (radius_um or 0.0) / sp_um
        halo = int(math.ceil(max(radius_sp, 0.5))) + 2
        band = emb.chunks[1]
        row_of = np.floor(c[:, 1]).astype(np.int64)
        scores = np.empty((len(take), R))
        for y0 in range(0, h, band):
            sel = (row_of >= y0) & (row_of < y0 + band)
            if not sel.any():
                continue
            lo, hi = max(0, y0 - halo), min(h, y0 + band + halo)
            scores[sel], _ = footprint_means(np.asarray(emb[:, lo:hi, :], np.float64), c[sel], radius_sp, (lo, 0))
        expr = scores @ H
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        if project:
            fitted = np.flatnonzero(np.asarray(g["cells/fitted"][a:b], bool))
            if len(fitted):
                spots = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64)[fitted]
                dist, near = cKDTree(spots).query(pts, distance_upper_bound=float(grp.attrs["spot_radius_um"]))
                owner = np.where(np.isfinite(dist), near, -1)
                measured = read_expression(atlas, a + fitted, gene_idx)
                expr = project_to_spots(expr, owner, measured)
                out["spot"][take] = np.where(owner >= 0, a + fitted[np.maximum(owner, 0)], -1)
        out["xy"][take], out["z"][take] = pts, float(row.z)
        out["scores"][take], out["genes"][take] = scores, expr
        if aligned:
            out["atlas"][take] = to_atlas(atlas, sid, pts)
    frame_out = {"section": cells[section].astype(str).to_numpy(), "x": out["xy"][:, 0], "y": out["xy"][:, 1]}
    frame_out["z"] = out["z"]
    if aligned:
        frame_out["atlas_x"], frame_out["atlas_y"] = out["atlas"][:, 0], out["atlas"][:, 1]
    frame_out["spot"] = out["spot"]
    frame_out.update({f"metagene_{k}": out["scores"][:, k].astype(np.float32) for k in range(R)})
    frame_out.update({v: out["genes"][:, j].astype(np.float32) for j, v in enumerate(genes)})
    return pd.DataFrame(frame_out, index=cells.index)


#: a column of a cell table file with one of these names becomes the cells' index (their ids in the output)
ID_COLUMNS = ("cell_id", "cell")


def read_cells(path) -> pd.DataFrame:
    """A cell table from CSV or Parquet (by suffix), indexed by its ``cell_id`` or ``cell`` column when it has
    one, with a clear error for what cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"enhance_cells: no cell table at {path}")
    table = None
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"enhance_cells: {path} could not be read as a table ({err}); give CSV or Parquet") from err
    if table is None:
        raise InputError(f"enhance_cells: {path} is neither CSV (.csv, .tsv) nor Parquet (.parquet); convert it")
    ids = next((c for c in ID_COLUMNS if c in table.columns), None)
    return table.set_index(ids) if ids is not None else table


#: enhance_cells' keyword options and their defaults (read from its signature: one place states them)
CELL_OPTIONS = {
    name: p.default for name, p in inspect.signature(enhance_cells).parameters.items() if p.kind is p.KEYWORD_ONLY
}


def export_enhanced_cells(atlas: Atlas, cells, out, fmt: str = "parquet", sections=None, **options):
    """:func:`enhance_cells` of ``cells`` (a table or a CSV / Parquet path; only the rows of ``sections`` when
    given) written to ``out`` as ``parquet``
    (one row group per section, computed and written one section at a time; the cells' index as column ``cell``)
    or ``anndata`` (``.h5ad``: X = genes, obs names the cells' index, obsm ``X_enhance`` (metagenes), ``spatial``
    (atlas x, y, z when aligned, else raw)); written to ``out.partial`` and renamed when complete."""
    from .export import write_parquet_frames
    from .export_enhance import anndata_of

    if fmt not in ("parquet", "anndata"):
        raise ConfigError(f"the enhanced cells export as parquet or anndata, not {fmt!r}")
    table = cells if isinstance(cells, pd.DataFrame) else read_cells(cells)
    unknown = sorted(set(options) - set(CELL_OPTIONS))
    if unknown:
        raise ConfigError(f"export_enhanced_cells: unknown option(s) {unknown}; options: {', '.join(CELL_OPTIONS)}")
    opts = {**CELL_OPTIONS, **options}  # enhance_cells' own defaults, so the check below reads what it will use
    column = opts["section"]
    if sections is not None and column in table.columns:
        wanted = [str(atlas.sections.id.iloc[atlas.section_index(str(v))]) for v in sections]
        table = table[table[column].astype(str).isin(wanted)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        if fmt == "parquet":
            # the whole table is checked before the first section is written (each part is checked again, cheaply)
            _checked(atlas, table, column, opts["x"], opts["y"], opts["frame"], opts["radius_um"])
            parts = (part for _, part in table.groupby(table[column].astype(str), sort=False))
            frames = (enhance_cells(atlas, part, **options).reset_index(names="cell") for part in parts)
            if not write_parquet_frames(frames, tmp):
                raise InputError(f"enhance_cells: the cell table of {out} holds no cell")
        else:
            df = enhance_cells(atlas, table, **options)
            anndata_of(df, ("spot",), df.index.astype(str)).write_h5ad(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out

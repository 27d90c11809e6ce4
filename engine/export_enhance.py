"""Export of the enhanced maps (``/enhance``): one row per superpixel of the measured tissue, streamed.

Rows: the superpixels within one spot pitch of a spot of their section (the tissue the spots cover; the glass
around it is left out). Columns: ``section``, ``x``, ``y`` (the section's raw um), ``z`` (the section's depth),
``atlas_x``, ``atlas_y`` when the atlas is aligned (the same transforms as the cells, :func:`lamina.to_atlas`),
``metagene_0 ...`` (the embedding) and one column per gene (``embedding @ loadings``). Parquet is written one
band of superpixel rows at a time; AnnData is built in memory (refused past ``max_bytes``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import MissingInputError, TooLargeError, UnknownGeneError
from .store.arrays import as_text
from .store.atlas import Atlas


def is_aligned(atlas: Atlas) -> bool:
    """Whether the sections have transforms to the atlas frame (register, or refine): rows get atlas x, y."""
    return atlas.group_is_complete("deformation") or atlas.group_is_complete("transforms")


def iter_enhanced(atlas: Atlas, genes=None, sections=None) -> Iterator[pd.DataFrame]:
    """Frames of superpixel rows (see the module docstring), a band of the grid at a time."""
    from scipy.spatial import cKDTree

    from .transforms import to_atlas

    if not atlas.group_is_complete("enhance"):
        raise MissingInputError(f"{atlas.path} has no complete /enhance; run lamina.enhance(atlas) first")
    g = atlas.root["enhance"]
    names = list(as_text(g["model/gene"][...]))
    genes = names if genes is None else list(genes)
    missing = [x for x in genes if x not in names]
    if missing:
        raise UnknownGeneError(f"gene(s) {missing[:10]} are not model genes of {atlas.path}/enhance")
    H = np.asarray(g["model/loadings"][...], np.float64)[:, [names.index(x) for x in genes]]
    done = [str(s) for s in g.attrs["sections"]]
    for s in sections or []:
        atlas.section_index(s)
    wanted = [s for s in done if sections is None or s in set(map(str, sections))]
    pitch = float(g.attrs["spot_pitch_um"])
    secs = atlas.sections
    aligned = is_aligned(atlas)
    for sid in wanted:
        grp = g[sid]
        emb = grp["embedding"]
        R, h, w = emb.shape
        A = np.asarray(grp.attrs["grid_to_section"], np.float64)
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        spots = cKDTree(np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64))
        band = emb.chunks[1]
        for y0 in range(0, h, band):
            block = np.asarray(emb[:, y0 : min(h, y0 + band), :], np.float64)
            rr, cc = np.mgrid[y0 : y0 + block.shape[1], 0:w]
            pts = np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5, np.ones(cc.size)], 1) @ A.T
            dist, _ = spots.query(pts[:, :2], distance_upper_bound=pitch)
            keep = np.isfinite(dist)
            if not keep.any():
                continue
            scores = block.reshape(R, -1)[:, keep].T
            frame = {
                "section": sid,
                "x": pts[keep, 0].astype(np.float32),
                "y": pts[keep, 1].astype(np.float32),
                "z": np.full(int(keep.sum()), float(row.z), np.float32),
            }
            if aligned:  # the refined transform when refine ran, else the affine
                xy = to_atlas(atlas, sid, pts[keep, :2])
                frame["atlas_x"], frame["atlas_y"] = xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)
            frame.update({f"metagene_{k}": scores[:, k].astype(np.float32) for k in range(R)})
            expr = scores @ H
            frame.update({name: expr[:, j].astype(np.float32) for j, name in enumerate(genes)})
            yield pd.DataFrame(frame)


def export_enhanced(
    atlas: Atlas, out, fmt: str = "parquet", genes=None, sections=None, max_bytes: int = 2 * 2**30
) -> Path:
    """Write the enhanced maps to ``out`` as ``parquet`` (streamed) or ``anndata`` (``.h5ad``: X = genes, obs
    section / z, obsm ``spatial`` (atlas x, y, z when aligned, else raw x, y, z), ``spatial_raw``, ``X_enhance``
    (the metagene scores)); written to ``out.partial`` and renamed when complete."""
    from .errors import ConfigError
    from .export import write_parquet_frames

    if fmt not in ("parquet", "anndata"):
        raise ConfigError(f"the enhanced maps export as parquet or anndata, not {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        if fmt == "parquet":
            if not write_parquet_frames(iter_enhanced(atlas, genes, sections), tmp):
                raise MissingInputError(f"{atlas.path}: no superpixel of the enhanced sections lies near a spot")
        else:
            frames, size = [], 0
            for frame in iter_enhanced(atlas, genes, sections):
                size += frame.memory_usage(index=False).sum()
                if size > max_bytes:
                    raise TooLargeError(
                        f"the enhanced maps of {atlas.path} exceed {max_bytes / 2**30:.1f} GiB in memory as AnnData; "
                        f"export fewer sections / genes, or as parquet (streamed)"
                    )
                frames.append(frame)
            anndata_of(pd.concat(frames, ignore_index=True)).write_h5ad(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def anndata_of(df: pd.DataFrame, extra_obs=(), index=None):
    """AnnData of enhanced rows (superpixels, or cells with ``extra_obs=("spot",)``): X = the gene columns, obs
    ``section``, ``z`` and ``extra_obs``, obsm ``spatial`` (atlas x, y, z when aligned, else raw), ``spatial_raw``,
    ``X_enhance`` (the metagene columns). ``index``: obs names (default ``section:row``)."""
    import anndata as ad

    meta = ["section", "x", "y", "z", "atlas_x", "atlas_y", *extra_obs]
    scores = [c for c in df.columns if c.startswith("metagene_")]
    genes = [c for c in df.columns if c not in meta and c not in scores]
    obs = pd.DataFrame({"section": pd.Categorical(df["section"]), "z": df["z"].to_numpy()})
    for c in extra_obs:
        obs[c] = df[c].to_numpy()
    obs.index = [f"{s}:{i}" for i, s in enumerate(df["section"])] if index is None else list(index)
    adata = ad.AnnData(X=df[genes].to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    raw = df[["x", "y", "z"]].to_numpy(np.float32)
    adata.obsm["spatial_raw"] = raw
    adata.obsm["spatial"] = df[["atlas_x", "atlas_y", "z"]].to_numpy(np.float32) if "atlas_x" in df else raw
    adata.obsm["X_enhance"] = df[scores].to_numpy(np.float32)
    return adata

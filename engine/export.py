"""Export an atlas to CSV / Parquet (streamed chunk by chunk), AnnData (in memory, size-guarded) or a
SpatialData Zarr store (streamed, :mod:`lamina.spatialdata_zarr`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, MissingInputError, UnknownGeneError
from .store.arrays import as_text, read_columns
from .store.atlas import Atlas

FORMATS = ("csv", "parquet", "anndata", "spatialdata")


def iter_frames(atlas: Atlas, sections=None, genes=None, embeddings: bool = True) -> Iterator[pd.DataFrame]:
    """Cell tables (one cell chunk at a time): cell columns, z, aligned x/y/z if present, the embeddings
    (``<key>_0``, ``<key>_1``, ...; ``embeddings=False``: none), one column per gene."""
    sec = atlas.sections
    picks = sec.index if sections is None else [atlas.section_index(s) for s in sections]
    names = atlas.genes
    gidx = gene_positions(atlas, genes)
    step = atlas.cell_chunk
    aligned = "aligned" in atlas.root and atlas.group_is_complete("aligned")
    keys = [k for k in atlas.embeddings() if atlas.group_is_complete(f"embeddings/{k}")] if embeddings else []
    for i in picks:
        lo, hi = int(sec.cell_start.iloc[i]), int(sec.cell_stop.iloc[i])
        # pieces end on chunk boundaries (reads are chunk-aligned); a section need not start on one
        bounds = sorted({lo, hi, *range((lo // step + 1) * step, hi, step)})
        for a, b in zip(bounds[:-1], bounds[1:]):
            frame = _rows(atlas, a, b)
            frame.insert(3, "z", np.float32(sec.z.iloc[i]))
            if aligned:
                for k in ("x", "y", "z"):
                    frame[f"aligned_{k}"] = np.asarray(atlas.root[f"aligned/{k}"][a:b])
            for key in keys:
                values = np.asarray(atlas.root[f"embeddings/{key}/values"][a:b])
                cols = [f"{key}_{j}" for j in range(values.shape[1])]
                frame = pd.concat([frame, pd.DataFrame(values, columns=cols, index=frame.index)], axis=1)
            if len(gidx) and "X" in atlas.root:
                block = read_columns(atlas.root["X"], a, b, gidx)
                frame = pd.concat([frame, pd.DataFrame(block, columns=names[gidx], index=frame.index)], axis=1)
            yield frame


def gene_positions(atlas: Atlas, genes=None) -> np.ndarray:
    """Positions of ``genes`` (all when None) in ``/genes``; an unknown name is an ``UnknownGeneError``."""
    names = atlas.genes
    if genes is None:
        return np.arange(len(names))
    gidx = names.get_indexer(list(genes))
    if (gidx < 0).any():
        raise UnknownGeneError(
            f"genes not in {atlas.path}: {[g for g, i in zip(genes, gidx) if i < 0][:10]}; it has "
            f"{len(names)} genes ({', '.join(map(str, names[:5]))} ...)"
        )
    return gidx


def _rows(atlas: Atlas, a: int, b: int) -> pd.DataFrame:
    ids = atlas.sections["id"].tolist()
    out = {col: atlas.decode(col, np.asarray(atlas.root[f"cells/{col}"][a:b]), ids) for col in atlas.cell_columns}
    cols = ["section", "x", "y"] + [c for c in out if c not in ("section", "x", "y")]
    return pd.DataFrame({c: out[c] for c in cols}, index=pd.RangeIndex(a, b, name="cell"))


def export(atlas: Atlas, fmt: str, out: str | Path, sections=None, genes=None) -> Path:
    """Write the atlas (or some sections / genes) to ``out`` as ``fmt`` (csv, parquet, anndata, spatialdata)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    for s in sections or []:  # unknown sections / genes fail before anything is written
        atlas.section_index(s)
    gene_positions(atlas, genes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "spatialdata":
        from .spatialdata_zarr import export_spatialdata

        return export_spatialdata(atlas, out, sections, genes, overwrite=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        _write(atlas, fmt, tmp, out, sections, genes)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def _write(atlas: Atlas, fmt: str, tmp: Path, out: Path, sections, genes) -> None:
    if fmt == "anndata":
        adata = atlas.to_anndata(sections=sections, genes=genes)
        adata.write_h5ad(tmp)
    elif fmt == "parquet":
        write_parquet_frames((f.reset_index() for f in iter_frames(atlas, sections, genes)), tmp)
    else:
        import gzip

        first = True
        opener = gzip.open if out.name.endswith(".gz") else open
        with opener(tmp, "wt", newline="") as fh:
            for frame in iter_frames(atlas, sections, genes):
                frame.to_csv(fh, header=first)
                first = False


def write_parquet_frames(frames, path) -> int:
    """Stream DataFrames into one Parquet file at ``path`` (the schema of the first; the others cast to it), a row
    group per frame; returns the rows written (0: nothing written, no file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, rows = None, 0
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += len(frame)
    finally:
        if writer is not None:
            writer.close()
    return rows


def export_expression_parquet(atlas: Atlas, path, genes=None, row_group_rows: int = 65_536) -> int:
    """Stream ``/expression`` to Parquet: one row per occupied voxel (x, y, z voxel centres in um, the
    cell count, one column per gene), written a volume chunk at a time in row groups of ``row_group_rows``.
    Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not atlas.group_is_complete("expression"):
        raise MissingInputError(f"{atlas.path} has no complete /expression; run lamina.invert(atlas) first")
    expr = atlas.root["expression"]
    values, dens = expr["values"], atlas.root["volume/density"]
    names = [str(g) for g in as_text(expr["gene"][...])]
    idx = np.arange(len(names))
    if genes is not None:
        missing = [g for g in genes if g not in names]
        if missing:
            raise UnknownGeneError(
                f"genes not in the expression volume of {atlas.path}: {missing[:10]}; the volume has "
                f"{len(names)} genes ({', '.join(names[:5])} ...)"
            )
        idx = np.array([names.index(g) for g in genes])
    v, (ox, oy, oz) = float(expr.attrs["voxel_um"]), expr.attrs["origin"]
    _, Z, Y, X = values.shape
    cz, ty = values.chunks[1:3]
    schema = pa.schema(
        [(k, pa.float32()) for k in ("x", "y", "z")]
        + [("cells", pa.float32())]
        + [(names[i], pa.float32()) for i in idx]
    )
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
                data = [pa.array(cols[c].astype(np.float32)) for c in ("x", "y", "z")] + [
                    pa.array(count[k, j, i].astype(np.float32))
                ]
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

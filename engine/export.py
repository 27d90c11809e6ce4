"""Export an atlas to CSV / Parquet (streamed chunk by chunk) or AnnData (in memory, size-guarded)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import ConfigError
from .store.atlas import Atlas

FORMATS = ("csv", "parquet", "anndata")


def iter_frames(atlas: Atlas, sections=None, genes=None) -> Iterator[pd.DataFrame]:
    """Cell tables (one cell chunk at a time): cell columns, z, aligned x/y/z if present, one column per gene."""
    sec = atlas.sections
    picks = sec.index if sections is None else [atlas.section_index(s) for s in sections]
    names = atlas.genes
    gidx = np.arange(len(names)) if genes is None else names.get_indexer(list(genes))
    if (gidx < 0).any():
        raise ConfigError(f"genes not in {atlas.path}: {[g for g, i in zip(genes, gidx) if i < 0][:10]}")
    step = atlas.cell_chunk
    aligned = "aligned" in atlas.root and atlas.group_is_complete("aligned")
    for i in picks:
        lo, hi = int(sec.cell_start.iloc[i]), int(sec.cell_stop.iloc[i])
        for a in range(lo, hi, step):
            b = min(hi, (a // step + 1) * step)
            frame = _rows(atlas, a, b)
            frame.insert(3, "z", np.float32(sec.z.iloc[i]))
            if aligned:
                for k in ("x", "y", "z"):
                    frame[f"aligned_{k}"] = np.asarray(atlas.root[f"aligned/{k}"][a:b])
            if len(gidx) and "X" in atlas.root:
                block = np.asarray(atlas.root["X"][a:b])[:, gidx]
                frame = pd.concat([frame, pd.DataFrame(block, columns=names[gidx], index=frame.index)], axis=1)
            yield frame


def _rows(atlas: Atlas, a: int, b: int) -> pd.DataFrame:
    ids = atlas.sections["id"].tolist()
    out = {col: atlas.decode(col, np.asarray(atlas.root[f"cells/{col}"][a:b]), ids) for col in atlas.cell_columns}
    cols = ["section", "x", "y"] + [c for c in out if c not in ("section", "x", "y")]
    return pd.DataFrame({c: out[c] for c in cols}, index=pd.RangeIndex(a, b, name="cell"))


def export(atlas: Atlas, fmt: str, out: str | Path, sections=None, genes=None) -> Path:
    """Write the atlas (or some sections / genes) to ``out`` as ``fmt`` (csv, parquet, anndata)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if fmt == "anndata":
        adata = atlas.to_anndata(sections=sections, genes=genes)
        adata.write_h5ad(tmp)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for frame in iter_frames(atlas, sections, genes):
            table = pa.Table.from_pandas(frame.reset_index(), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
        if writer is not None:
            writer.close()
    else:
        first = True
        compression = "gzip" if out.name.endswith(".gz") else None
        import gzip

        opener = gzip.open if compression else open
        with opener(tmp, "wt", newline="") as fh:
            for frame in iter_frames(atlas, sections, genes):
                frame.to_csv(fh, header=first)
                first = False
    tmp.replace(out)
    return out

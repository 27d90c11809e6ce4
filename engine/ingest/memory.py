"""Read units for tables already in memory: a pandas DataFrame or an AnnData (in memory or backed).

They stream like files (bounded row chunks through the same staging), but they are staged in the client
process that holds them: shipping a table to a worker would copy it into the task graph. Their fingerprint
is a hash of the content, so re-ingesting the same table is a no-op and a changed one re-runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from .readers import RawChunk, ReadUnit, genes_of


def _hash_frame(frame: pd.DataFrame, h) -> None:
    h.update(repr([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    h.update(np.ascontiguousarray(pd.util.hash_pandas_object(frame, index=True).to_numpy()).tobytes())


def _hash_matrix(X, h, rows: int = 65536) -> None:
    import scipy.sparse as sp

    h.update(repr((type(X).__name__, tuple(X.shape))).encode())
    for a in range(0, X.shape[0], rows):  # by rows: a backed matrix is never read whole
        block = X[a : a + rows]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            for part in (block.indptr - block.indptr[0], block.indices, block.data):
                h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(block)).tobytes())


class FrameTable(ReadUnit):
    """A ``pandas.DataFrame`` with one row per cell (columns named as in a file)."""

    local = True

    def __init__(self, frame: pd.DataFrame, label: str = "DataFrame", default_section: str | None = None):
        if not isinstance(frame, pd.DataFrame):
            raise InputError(f"{label}: expected a pandas DataFrame, got {type(frame).__name__}")
        names = [str(c) for c in frame.columns]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise InputError(f"{label}: duplicate column names {dup[:5]}; rename them so each is unique")
        self.frame = frame.set_axis(names, axis=1) if list(frame.columns) != names else frame
        self.default_section = default_section
        self.label = f"{label} ({len(frame):,} rows x {frame.shape[1]} columns)"

    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        have = [c for c in self.frame.columns if c in set(needed)]
        for a in range(0, len(self.frame), rows):
            yield RawChunk(frame=self.frame.iloc[a : a + rows][have].reset_index(drop=True), row0=a)

    def fingerprint(self):
        h = hashlib.blake2b(digest_size=16)
        _hash_frame(self.frame, h)
        return ["frame", h.hexdigest(), len(self.frame)]


class AnnDataTable(ReadUnit):
    """An ``anndata.AnnData``: obs columns (``_index`` = obs_names), ``obsm[spatial_key]`` as
    ``obsm:<key>:0`` / ``obsm:<key>:1``, expression from ``X`` (dense or sparse; a backed object is read by
    row slices)."""

    local = True

    def __init__(self, adata, spatial_key: str | None = None, label: str = "AnnData", default_section=None):
        self.adata = adata
        self.spatial_key = spatial_key
        self.default_section = default_section
        self.label = f"{label} ({adata.n_obs:,} cells x {adata.n_vars} genes)"
        if spatial_key is not None and spatial_key not in adata.obsm:
            raise InputError(
                f"{self.label}: no obsm[{spatial_key!r}]; obsm has {list(adata.obsm.keys())}; set spatial_key "
                f"to one of them, or x=/y= to obs columns"
            )

    def columns(self) -> list[str]:
        cols = [str(c) for c in self.adata.obs.columns] + ["_index"]
        if self.spatial_key:
            cols += [f"obsm:{self.spatial_key}:0", f"obsm:{self.spatial_key}:1"]
        return cols

    def genes(self, spec) -> list[str]:
        if spec.genes is None:
            return []
        return genes_of([str(g) for g in self.adata.var_names], spec)

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        import scipy.sparse as sp

        obs = self.adata.obs
        cols = [c for c in obs.columns if str(c) in set(needed)]
        want_genes = any(n not in set(self.columns()) for n in needed)  # gene names are asked for too
        n = self.adata.n_obs
        var_names = [str(g) for g in self.adata.var_names]
        for a in range(0, n, rows):
            b = min(n, a + rows)
            frame = obs.iloc[a:b][cols].reset_index(drop=True)
            frame.columns = [str(c) for c in frame.columns]
            if "_index" in needed:
                frame["_index"] = np.asarray(self.adata.obs_names[a:b], dtype=object)
            if self.spatial_key:
                xy = np.asarray(self.adata.obsm[self.spatial_key][a:b])
                if xy.ndim != 2 or xy.shape[1] < 2:
                    raise InputError(f"{self.label}: obsm[{self.spatial_key!r}] must be [n_cells, 2+], got {xy.shape}")
                frame[f"obsm:{self.spatial_key}:0"], frame[f"obsm:{self.spatial_key}:1"] = xy[:, 0], xy[:, 1]
            block = None
            if want_genes and self.adata.X is not None:
                X = self.adata.X[a:b]
                block = (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float32, copy=False)
            yield RawChunk(frame=frame, X=block, genes=var_names, row0=a)

    def fingerprint(self):
        h = hashlib.blake2b(digest_size=16)
        _hash_frame(self.adata.obs, h)
        h.update(repr(list(map(str, self.adata.var_names))).encode())
        if self.spatial_key:
            h.update(np.ascontiguousarray(np.asarray(self.adata.obsm[self.spatial_key])).tobytes())
        if self.adata.X is not None:
            _hash_matrix(self.adata.X, h)
        return ["anndata", h.hexdigest(), int(self.adata.n_obs)]


def is_anndata(obj) -> bool:
    """True for an ``anndata.AnnData`` without importing anndata when the caller never did."""
    return type(obj).__name__ == "AnnData" and type(obj).__module__.startswith("anndata")

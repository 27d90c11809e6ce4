"""The 10x Genomics HDF5 feature-barcode matrix (Cell Ranger, Space Ranger, Xenium), streamed by barcode.

Layout (10x's documented "HDF5 Feature Barcode Matrix Format")::

    matrix/barcodes            [n_barcodes] strings
    matrix/data, indices       nonzero counts and their feature (row) index, column-major
    matrix/indptr              [n_barcodes + 1] start of each barcode's column in data / indices
    matrix/shape               (n_features, n_barcodes)
    matrix/features/{id, name, feature_type, genome}

Each barcode is one column of a features x barcodes CSC matrix, i.e. one row of a barcodes x features CSR
matrix: rows ``a:b`` are one contiguous slice of ``data`` / ``indices``, so a chunk of cells is read without
touching the rest of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .readers import open_hdf5
from .readers import text_list as _text


def make_unique(names: list[str]) -> list[str]:
    """anndata's ``var_names_make_unique``: the second ``name`` becomes ``name-1``, the third ``name-2``."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out


class TenxH5Matrix:
    """Rows (barcodes) of a 10x ``.h5`` matrix, features of the chosen ``feature_types`` as columns.

    ``feature_types``: the types kept (10x writes ``Gene Expression`` for genes and e.g. ``Negative Control
    Probe`` / ``Blank Codeword`` for Xenium controls); None keeps all. Gene names are the ``name`` field, made
    unique as anndata does.
    """

    def __init__(self, path, feature_types: tuple[str, ...] | None = ("Gene Expression",)):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"10x matrix {self.path} does not exist")
        with self._open() as f:
            m = self._group(f)
            n_features, self.n_rows = (int(v) for v in m["shape"][...])
            feats = m["features"]
            names = _text(feats["name"][...])
            types = _text(feats["feature_type"][...]) if "feature_type" in feats else ["Gene Expression"] * len(names)
        if len(names) != n_features:
            raise InputError(f"{self.path}: {len(names)} feature names for a matrix of {n_features} features")
        keep = [i for i, t in enumerate(types) if feature_types is None or t in feature_types]
        if not keep:
            raise InputError(
                f"{self.path}: no features of type {', '.join(feature_types or ())}; the file has "
                f"{', '.join(sorted(set(types)))}"
            )
        self.genes = make_unique([names[i] for i in keep])
        self._col_of = np.full(n_features, -1, dtype=np.int64)  # file feature -> column of X (-1: left out)
        self._col_of[keep] = np.arange(len(keep))

    def _open(self):
        return open_hdf5(self.path, "it looks truncated or corrupt: copy it again from the instrument's output folder")

    def _group(self, f):
        if "matrix" not in f or not all(k in f["matrix"] for k in ("barcodes", "data", "indices", "indptr", "shape")):
            raise InputError(
                f"{self.path}: not a 10x feature-barcode matrix (needs matrix/barcodes, data, indices, indptr, "
                f"shape); pass the filtered_feature_bc_matrix.h5 / cell_feature_matrix.h5 of the run"
            )
        return f["matrix"]

    def chunks(self, rows: int):
        """Yield ``(barcodes, X)`` for consecutive row slices: ``X`` ``[b - a, len(genes)]`` float32."""
        with self._open() as f:
            m = self._group(f)
            for a in range(0, self.n_rows, rows):
                b = min(self.n_rows, a + rows)
                try:
                    ptr = np.asarray(m["indptr"][a : b + 1], dtype=np.int64)
                    data = np.asarray(m["data"][ptr[0] : ptr[-1]], dtype=np.float32)
                    col = self._col_of[np.asarray(m["indices"][ptr[0] : ptr[-1]], dtype=np.int64)]
                    barcodes = _text(m["barcodes"][a:b])
                except (OSError, KeyError, ValueError) as exc:
                    raise InputError(
                        f"{self.path}: cannot read barcodes {a}-{b}: {type(exc).__name__}: {exc}; the file "
                        f"looks truncated or corrupt"
                    ) from exc
                row = np.repeat(np.arange(b - a), np.diff(ptr))
                kept = col >= 0
                X = np.zeros((b - a, len(self.genes)), dtype=np.float32)
                X[row[kept], col[kept]] = data[kept]  # a barcode lists each feature once
                yield barcodes, X

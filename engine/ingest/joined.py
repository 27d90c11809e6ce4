"""A section whose cells come as two files joined by a cell key: positions + metadata, and a matrix.

Instrument outputs keep expression apart from positions (Xenium ``cells.parquet`` + ``cell_feature_matrix.h5``,
MERSCOPE ``cell_metadata.csv`` + ``cell_by_gene.csv``, CosMx ``metadata_file`` + ``exprMat_file``, Visium
``tissue_positions`` + ``filtered_feature_bc_matrix.h5``). The matrix decides which cells exist and their
order; each matrix row gets the positions row with the same key.

Two ways to join:

* **in step** (the usual case: both files list the cells in the same order, after the positions' filter,
  e.g. Visium's ``in_tissue == 1``): both files stream side by side, one chunk at a time, each chunk's keys
  checked;
* **by lookup** from the first row where the orders part: the rest of the section's positions (only the
  columns the ingest needs) are held while the rest of the matrix streams. That is one section's positions,
  never the matrix, and it is logged. A matrix row whose key is missing (or consumed already) is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from .readers import RawChunk, ReadUnit, TableFile, genes_of

log = logging.getLogger("lamina")

#: the column every joined unit adds: the cell key as text (key columns joined by "_"), used as the cell id
KEY = "cell_key"


def key_text(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The cell key of each row: the ``columns`` as text joined by ``_`` (CosMx: ``fov_cellID``)."""
    parts = [frame[c].astype(str).str.strip() for c in columns]
    out = parts[0]
    for p in parts[1:]:
        out = out + "_" + p
    return out.to_numpy(dtype=object)


def _take(stream: Iterator[pd.DataFrame], buffer: list, n: int) -> pd.DataFrame:
    """Exactly ``n`` rows from ``stream`` (fewer only at its end), keeping the rest in ``buffer``."""
    have = sum(len(b) for b in buffer)
    while have < n:
        nxt = next(stream, None)
        if nxt is None:
            break
        buffer.append(nxt)
        have += len(nxt)
    if not buffer:
        return pd.DataFrame()
    frame = pd.concat(buffer, ignore_index=True) if len(buffer) != 1 else buffer[0].reset_index(drop=True)
    buffer.clear()
    if len(frame) > n:
        buffer.append(frame.iloc[n:].reset_index(drop=True))
        frame = frame.iloc[:n]
    return frame


@dataclass
class TableMatrix:
    """Expression as a table, one row per cell: key columns, gene columns (MERSCOPE, CosMx).

    ``drop``: (column, value) rows that are no cells (CosMx's ``cell_ID == 0``: unassigned transcripts);
    ``control``: name prefixes of control / blank probes, kept out of the genes."""

    table: TableFile
    key: list[str]
    drop: tuple | None = None
    control: tuple[str, ...] = ()
    genes: list[str] = field(init=False)

    def __post_init__(self):
        cols = self.table.columns()
        missing = [c for c in self.key if c not in cols]
        if missing:
            raise InputError(f"{self.table.label}: no column {missing[0]!r}; its columns start {cols[:6]}")
        skip = set(self.key) | ({self.drop[0]} if self.drop else set())
        self.genes = [c for c in cols if c not in skip and not c.startswith(self.control or ("\0",))]
        if not self.genes:
            raise InputError(f"{self.table.label}: no gene columns besides the key {self.key}")

    def _frames(self, rows: int, columns: list[str]) -> Iterator[pd.DataFrame]:
        for raw in self.table.chunks(rows, columns):
            frame = raw.frame
            if self.drop is not None:
                frame = frame[frame[self.drop[0]].astype(str) != str(self.drop[1])]
            yield frame

    def chunks(self, rows: int, genes: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cols = self.key + ([self.drop[0]] if self.drop and self.drop[0] not in self.key else []) + genes
        for frame in self._frames(rows, cols):
            block = frame[genes]
            bad = [g for g in genes if not pd.api.types.is_numeric_dtype(block[g])]
            if bad:
                raise InputError(f"{self.table.label}: gene column {bad[0]!r} holds text; counts must be numbers")
            yield key_text(frame, self.key), block.to_numpy(dtype=np.float32)


class JoinedUnit(ReadUnit):
    """One section: ``positions`` (a table with the key columns ``key``) joined with ``matrix`` (an object
    with ``genes`` and ``chunks(rows[, genes])``, e.g. :class:`TableMatrix` or
    :class:`~lamina.ingest.tenx.TenxH5Matrix`). ``keep``: (column, value) positions rows that are cells;
    ``scale``: new column -> (column, factor), e.g. Visium's full-resolution pixels as um."""

    def __init__(
        self,
        positions: TableFile,
        key: list[str],
        matrix,
        label: str,
        default_section: str,
        keep=None,
        scale: dict | None = None,
    ):
        self.positions, self.key, self.matrix, self.keep = positions, list(key), matrix, keep
        self.label, self.default_section = label, default_section
        self.scale = dict(scale or {})
        cols = positions.columns()
        for c in self.key + ([keep[0]] if keep else []) + [src for src, _ in self.scale.values()]:
            if c not in cols:
                raise InputError(
                    f"{positions.label}: no column {c!r}, which the {label} layout needs; its columns: {cols[:12]}"
                )

    def columns(self) -> list[str]:
        return [*self.positions.columns(), *self.scale, KEY]

    def genes(self, spec) -> list[str]:
        return [] if spec.genes is None else genes_of(list(self.matrix.genes), spec)

    def _positions(self, rows: int, columns: list[str]) -> Iterator[pd.DataFrame]:
        derived = [self.scale[c][0] for c in columns if c in self.scale]
        cols = list(dict.fromkeys([*self.key, *([self.keep[0]] if self.keep else []), *columns, *derived]))
        for raw in self.positions.chunks(rows, cols):
            frame = raw.frame
            if self.keep is not None:
                col = frame[self.keep[0]]
                frame = frame[(col == self.keep[1]) | (col.astype(str) == str(self.keep[1]))]
            frame = frame.reset_index(drop=True)
            frame[KEY] = key_text(frame, self.key)
            for name, (src, factor) in self.scale.items():
                if name in columns:
                    frame[name] = pd.to_numeric(frame[src], errors="coerce") * factor
            yield frame

    def _matrix_chunks(self, rows: int, genes: list[str]):
        if isinstance(self.matrix, TableMatrix):
            yield from self.matrix.chunks(rows, genes)
            return
        at = {g: i for i, g in enumerate(self.matrix.genes)}
        idx = [at[g] for g in genes]
        for keys, X in self.matrix.chunks(rows):
            yield np.asarray(keys, dtype=object), X[:, idx]

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        pcols = [c for c in needed if c in set(self.positions.columns()) | set(self.scale)]
        genes = [g for g in self.matrix.genes if g in set(needed)]
        stream, buffer = self._positions(rows, pcols), []
        table = None  # the rest of the positions by key, once the two files' orders part
        row0 = 0
        for keys, X in self._matrix_chunks(rows, genes):
            keys = np.asarray(keys, dtype=object)
            if table is None:
                pos = _take(stream, buffer, len(keys))
                n = min(len(pos), len(keys))
                same = pos[KEY].to_numpy()[:n] == keys[:n] if n else np.zeros(0, bool)
                if n == len(keys) and same.all():
                    yield RawChunk(frame=pos, X=X, genes=genes, row0=row0)
                    row0 += len(keys)
                    continue
                i = n if same.all() else int(np.argmin(same))
                table = self._lookup_table([pos.iloc[i:], *buffer, *stream], row0 + i)
                buffer.clear()
                frame = pd.concat([pos.iloc[:i], self._lookup(table, keys[i:], row0 + i)], ignore_index=True)
            else:
                frame = self._lookup(table, keys, row0)
            yield RawChunk(frame=frame, X=X, genes=genes, row0=row0)
            row0 += len(keys)

    def _lookup_table(self, frames: list[pd.DataFrame], row: int) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[KEY])
        dup = table[KEY].duplicated()
        if dup.any():
            raise InputError(
                f"{self.positions.label}: cell key {table[KEY][dup].iloc[0]!r} is listed twice; each cell once"
            )
        log.info(
            "%s: from matrix row %d on the positions list the cells in another order; joining by lookup "
            "(%d positions held)",
            self.label,
            row,
            len(table),
        )
        return table.set_index(KEY, drop=False)

    def _lookup(self, table: pd.DataFrame, keys: np.ndarray, row0: int) -> pd.DataFrame:
        missing = ~pd.Index(keys).isin(table.index)
        if missing.any():
            raise InputError(
                f"{self.label}: {int(missing.sum())} cell(s) of the matrix have no position, e.g. key "
                f"{keys[int(np.flatnonzero(missing)[0])]!r} (near matrix row {row0}); the two files are "
                f"from different runs or one is truncated"
            )
        return table.loc[list(keys)].reset_index(drop=True)

    def fingerprint(self):
        scale = {k: [src, float(f)] for k, (src, f) in self.scale.items()}
        return ["joined", self.label, self.positions.fingerprint(), _matrix_fingerprint(self.matrix), scale]


def _matrix_fingerprint(matrix):
    if isinstance(matrix, TableMatrix):
        return matrix.table.fingerprint()
    st = matrix.path.stat()
    return [str(matrix.path.resolve()), st.st_size, st.st_mtime_ns]

"""Pass 2 of ingest: copy staged rows into the store, one task per cell chunk (chunk-aligned writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ensure
from ..store.arrays import assert_aligned, open_root


def pieces_for_rows(pieces: list[tuple], starts: np.ndarray, a: int, b: int) -> list[tuple]:
    """The parts of ``pieces`` (global row ``starts``) that fall in rows ``[a, b)``, clipped."""
    first = int(np.searchsorted(starts, a, side="right")) - 1
    out = []
    for i in range(max(first, 0), len(pieces)):
        d, lo, hi, code = pieces[i]
        g0 = int(starts[i])
        if g0 >= b:
            break
        s, e = max(a, g0), min(b, g0 + hi - lo)
        if e > s:
            out.append((d, lo + s - g0, lo + e - g0, code))
    return out


def _gather(staging: Path, pieces: list[tuple], name: str, columns: slice | None = None) -> np.ndarray:
    """The staged rows of ``pieces`` of array ``name`` (and only ``columns`` of a 2-D one), concatenated."""
    index = (slice(None),) if columns is None else (slice(None), columns)
    parts = []
    for d, lo, hi, _ in pieces:
        staged = np.load(staging / d / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        parts.append(staged[lo:hi][index])
    return np.concatenate(parts) if parts else np.empty(0)


def write_block(store: str, staging: str, a: int, b: int, pieces: list[tuple], plan: dict) -> int:
    """Write rows ``[a, b)`` of every cell array and of ``/X`` from the staged ``pieces``; returns rows written.

    ``plan``: {"cats": {col: categories}, "texts": [col], "nums": {col: dtype}, "genes": bool, "chunk": rows,
    "row_offset": [first input row of each read unit]}. A fragment's folder ``uNNNNNcMMMMM`` names its unit.
    """
    root = open_root(store, "r+")
    n = int(root["cells/x"].shape[0])
    assert_aligned(a, b, plan["chunk"], n, "cells")
    staging = Path(staging)
    sec = np.concatenate([np.full(hi - lo, code, dtype=np.int32) for _, lo, hi, code in pieces])
    ensure(len(sec) == b - a, f"staged rows for [{a}, {b}) add up to {len(sec)}")
    root["cells/section"][a:b] = sec
    root["cells/x"][a:b] = _gather(staging, pieces, "x")
    root["cells/y"][a:b] = _gather(staging, pieces, "y")
    offsets = np.concatenate(
        [np.full(hi - lo, plan["row_offset"][int(d[1:6])], dtype=np.int64) for d, lo, hi, _ in pieces]
    )
    root["cells/input_row"][a:b] = _gather(staging, pieces, "row") + offsets
    for col, cats in plan["cats"].items():
        codes = pd.Categorical(_gather(staging, pieces, f"obs.{col}"), categories=cats).codes
        root[f"cells/{col}"][a:b] = codes.astype(root[f"cells/{col}"].dtype)
    for col in plan["texts"]:
        root[f"cells/{col}"][a:b] = _gather(staging, pieces, f"obs.{col}").astype(str)
    for col, dtype in plan["nums"].items():
        root[f"cells/{col}"][a:b] = _gather(staging, pieces, f"obs.{col}").astype(dtype)
    if plan["genes"]:  # gene chunk by gene chunk: a task holds [cell chunk, gene chunk], not the whole rows
        X = root["X"]
        for g0 in range(0, X.shape[1], X.chunks[1]):
            g1 = min(X.shape[1], g0 + X.chunks[1])
            X[a:b, g0:g1] = _gather(staging, pieces, "X", slice(g0, g1))
    return b - a

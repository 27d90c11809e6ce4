"""Pass 1 of ingest: stream one read unit into section-sorted fragments on disk and summarise it.

A fragment is one read chunk, sorted by section (stable), saved as ``.npy`` files per field so that pass 2
can memory-map exactly the rows it needs. The summary returned to the client is small: per-fragment
section segments, per-section counts / z range / extent, categories and column kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .batch import MISSING, CellBatch, check_columns, normalise, required_columns, selected
from .readers import RawChunk, ReadUnit
from .spec import IngestSpec

READ_BYTES = 64 * 2**20


def read_rows(spec: IngestSpec, n_columns: int) -> int:
    if spec.read_rows:
        return int(spec.read_rows)
    return int(np.clip(READ_BYTES // (8 * max(n_columns, 1)), 256, 200_000))


def _save(folder: Path, name: str, values: np.ndarray) -> None:
    if values.dtype == object:
        values = values.astype(str)
    np.save(folder / f"{name}.npy", values, allow_pickle=False)


def _kind(batch: CellBatch) -> dict:
    kinds = {c: "cat" for c in batch.cats}
    kinds.update({c: "text" for c in batch.texts})
    kinds.update({c: f"num:{np.asarray(v).dtype.kind}" for c, v in batch.nums.items()})
    return kinds


def stage_unit(unit: ReadUnit, spec: IngestSpec, genes: list[str], staging: str, index: int) -> dict:
    """Stream ``unit`` into fragments under ``staging``; return its summary (see module docstring)."""
    check_columns(spec, unit)
    unit_genes = unit.genes(spec)
    needed = required_columns(spec, unit) + ([g for g in unit_genes] if genes else [])
    if unit.default_section is not None and spec.section:
        needed.append(spec.section)
    if spec.only_sections is not None and spec.section and spec.section not in needed:
        needed.append(spec.section)
    rows = read_rows(spec, len(needed))
    fragments, sections, categories, kinds = [], {}, {}, {}
    total = 0
    for c, raw in enumerate(unit.chunks(rows, needed)):
        input_rows = raw.row0 + np.arange(len(raw.frame), dtype=np.int64)
        keep = selected(raw, unit, spec)
        if keep is not None:
            total += len(raw.frame)  # input_row counts every row read, kept or not
            input_rows = input_rows[keep]
            X = raw.X[keep] if raw.X is not None else None
            raw = RawChunk(frame=raw.frame[keep].reset_index(drop=True), X=X, genes=raw.genes, row0=raw.row0)
        if not len(raw.frame):
            continue
        batch = normalise(raw, unit, spec, genes, unit_genes)
        codes, ids = pd.factorize(batch.section, sort=False)
        # factorize numbers sections by first appearance, so a chunk already in section order (always, for
        # one file per section) has non-decreasing codes and needs no reordering copy
        ordered = bool(np.all(codes[1:] >= codes[:-1]))
        order = slice(None) if ordered else np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(ids))
        folder = Path(staging) / f"u{index:05d}c{c:05d}"
        folder.mkdir(parents=True, exist_ok=False)
        _save(folder, "x", batch.x[order].astype(np.float32))
        _save(folder, "y", batch.y[order].astype(np.float32))
        _save(folder, "row", input_rows[order])
        for name, values in {**batch.cats, **batch.texts, **batch.nums}.items():
            _save(folder, f"obs.{name}", np.asarray(values)[order])
        if batch.X is not None:
            _save(folder, "X", batch.X[order])
        rows_read = len(raw.frame)
        del raw  # the input chunk is staged: free it before the next one is read
        segments = []
        start = 0
        for j, sid in enumerate(ids):
            segments.append([str(sid), int(counts[j])])
            sel = slice(start, start + int(counts[j]))
            idx = sel if ordered else order[sel]
            rec = sections.setdefault(
                str(sid),
                {
                    "n": 0,
                    "zmin": np.inf,
                    "zmax": -np.inf,
                    "xmin": np.inf,
                    "xmax": -np.inf,
                    "ymin": np.inf,
                    "ymax": -np.inf,
                },
            )
            rec["n"] += int(counts[j])
            if batch.z is not None:
                rec["zmin"] = min(rec["zmin"], float(batch.z[idx].min()))
                rec["zmax"] = max(rec["zmax"], float(batch.z[idx].max()))
            rec["xmin"] = min(rec["xmin"], float(batch.x[idx].min()))
            rec["xmax"] = max(rec["xmax"], float(batch.x[idx].max()))
            rec["ymin"] = min(rec["ymin"], float(batch.y[idx].min()))
            rec["ymax"] = max(rec["ymax"], float(batch.y[idx].max()))
            start += int(counts[j])
        fragments.append({"dir": folder.name, "segments": segments})
        for name, values in batch.cats.items():
            categories.setdefault(name, set()).update(v for v in pd.unique(values) if v != MISSING)
        for name, kind in _kind(batch).items():
            if kinds.setdefault(name, kind) != kind and {kinds[name][:3], kind[:3]} != {"num"}:
                raise InputError(
                    f"{unit.label}: column {name!r} holds text in some rows and numbers in others; make it one type"
                )
        if keep is None:
            total += rows_read
    return {
        "unit": unit.label,
        "index": index,
        "rows": total,
        "fragments": fragments,
        "sections": sections,
        "categories": {k: sorted(v) for k, v in categories.items()},
        "kinds": kinds,
        "genes": unit_genes,
        "default_section": unit.default_section,
    }

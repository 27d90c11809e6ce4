"""Validate one raw chunk and turn it into typed arrays (coordinates in um, ids as text, X as float32)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError
from .readers import RawChunk, ReadUnit
from .spec import IngestSpec

#: Marks a missing categorical label in staged text arrays (np.save of text needs a fixed-width dtype).
MISSING = "\x00"


@dataclass
class CellBatch:
    section: np.ndarray  # [n] str section ids
    x: np.ndarray  # [n] float64 um
    y: np.ndarray
    z: np.ndarray | None  # [n] float64 um, when the input has a z column
    cats: dict  # name -> [n] str (MISSING for missing), stored as categorical codes
    texts: dict  # name -> [n] str, stored as text (cell ids: too many to be categories)
    nums: dict  # name -> [n] numeric
    X: np.ndarray | None  # [n, G] float32


def stored_names(spec: IngestSpec) -> dict:
    """Input column -> name in /cells: the cell type and id columns take the store's canonical names."""
    names = {c: c for c in spec.obs}
    if spec.cell_type:
        names[spec.cell_type] = "cell_type"
    if spec.cell_id:
        names[spec.cell_id] = "cell_id"
    if spec.block:
        names[spec.block] = "block"
    reserved = {"section", "x", "y", "input_row"} & set(names.values())
    if reserved:
        raise InputError(f"obs columns may not be named {sorted(reserved)} (lamina's own cell columns); rename them")
    return names


def coord_columns(spec: IngestSpec) -> tuple[str, str]:
    if spec.spatial_key:
        return f"obsm:{spec.spatial_key}:0", f"obsm:{spec.spatial_key}:1"
    return spec.x, spec.y


def required_columns(spec: IngestSpec, unit: ReadUnit) -> list[str]:
    x, y = coord_columns(spec)
    cols = [x, y, spec.z, spec.cell_type, spec.cell_id, spec.block, *spec.obs]
    if unit.default_section is None:
        cols.append(spec.section)
    return [c for c in cols if c]


def check_columns(spec: IngestSpec, unit: ReadUnit) -> None:
    """Fail before reading any rows when a named column is absent."""
    have = unit.columns()
    if unit.default_section is None and not spec.section:
        raise InputError(
            f"{unit.label}: no section column given; set section: <column> (or ingest a folder with "
            f"one file per section)"
        )
    for col in required_columns(spec, unit):
        if col not in have:
            role = {
                spec.x: "x",
                spec.y: "y",
                spec.section: "section",
                spec.z: "z",
                spec.cell_type: "cell_type",
                spec.cell_id: "cell_id",
                spec.block: "block",
            }.get(col, "obs")
            import difflib

            close = difflib.get_close_matches(col, have, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise InputError(
                f"{unit.label}: column {col!r} (the {role} column) not found{hint}; columns are "
                f"{have[:20]}{' ...' if len(have) > 20 else ''}. Set {role}: <column name> in the config "
                f"(or {role}=... in lamina.ingest)."
            )


def _numeric(values, name: str, unit: ReadUnit, row0: int) -> np.ndarray:
    s = pd.Series(values)
    if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        conv = pd.to_numeric(s, errors="coerce")
        bad = np.flatnonzero(conv.isna().to_numpy() & s.notna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise InputError(
                f"{unit.label}: column {name!r} has a non-numeric value {s.iloc[i]!r} at data row "
                f"{row0 + i} ({len(bad)} such rows in this chunk); coordinates must be numbers"
            )
        s = conv
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _finite(values: np.ndarray, name: str, unit: ReadUnit, row0: int) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.flatnonzero(bad if bad.ndim == 1 else bad.any(axis=1))
        raise InputError(
            f"{unit.label}: {name} has NaN/inf at data rows {[int(r) + row0 for r in rows[:5]]}"
            f"{' ...' if len(rows) > 5 else ''} ({len(rows)} rows in this chunk); drop or fix those rows"
        )


def _text(values, na_values=()) -> np.ndarray:
    s = pd.Series(values)
    if len(na_values):
        s = s.where(~s.astype(str).isin(list(na_values)))
    if pd.api.types.is_float_dtype(s):
        finite = s.dropna()
        if len(finite) and np.all(np.mod(finite.to_numpy(), 1) == 0):
            s = s.astype("Int64")  # labels such as cluster 3.0 read as "3"
    out = s.astype(str).to_numpy(dtype=object)
    out[s.isna().to_numpy()] = MISSING
    return out


def is_text(values) -> bool:
    s = pd.Series(values)
    return not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))


def normalise(raw: RawChunk, unit: ReadUnit, spec: IngestSpec, genes: list[str], unit_genes: list[str]) -> CellBatch:
    """Validate ``raw`` and return a :class:`CellBatch` with expression ordered as ``genes``.

    Genes of ``genes`` that the unit lacks (``gene_join='union'``) are 0. Raises :class:`InputError` naming
    the file, column and row for non-numeric or non-finite values.
    """
    f, row0, n = raw.frame, raw.row0, len(raw.frame)
    xcol, ycol = coord_columns(spec)
    x = _numeric(f[xcol], xcol, unit, row0) * spec.scale
    y = _numeric(f[ycol], ycol, unit, row0) * spec.scale
    _finite(x, f"column {xcol!r}", unit, row0)
    _finite(y, f"column {ycol!r}", unit, row0)
    if unit.default_section is not None and not (spec.section and spec.section in f):
        section = np.full(n, unit.default_section, dtype=object)
    else:
        sec = pd.Series(f[spec.section])
        if sec.isna().any():
            i = int(np.flatnonzero(sec.isna().to_numpy())[0])
            raise InputError(
                f"{unit.label}: section column {spec.section!r} is empty at data row {row0 + i}; every "
                f"cell needs a section"
            )
        section = sec.astype(str).to_numpy(dtype=object)
    z = None
    if spec.z:
        z = _numeric(f[spec.z], spec.z, unit, row0)
        _finite(z, f"column {spec.z!r}", unit, row0)
    cats, texts, nums = {}, {}, {}
    for col, name in stored_names(spec).items():
        values = f[col] if col in f else f["_index"]
        if col == spec.cell_id and is_text(values):
            texts[name] = _text(values, spec.na_values)
        elif col in spec.categorical or col == spec.block or is_text(values):
            cats[name] = _text(values, spec.na_values)
        else:
            nums[name] = np.asarray(pd.Series(values).to_numpy())
    X = None
    if genes:
        pos = {g: i for i, g in enumerate(genes)}
        X = np.zeros((n, len(genes)), dtype=np.float32) if raw.X is not None or unit_genes != genes else None
        if raw.X is not None:
            names = raw.genes if raw.genes is not None else unit_genes  # the columns of raw.X
            wanted = set(unit_genes)
            src = [j for j, g in enumerate(names) if g in pos and g in wanted]
            X[:, [pos[names[j]] for j in src]] = raw.X[:, src]
        else:
            have = [g for g in unit_genes if g in pos]
            nonnum = [c for c in have if not pd.api.types.is_numeric_dtype(f[c])]
            if nonnum:
                col = nonnum[0]
                conv = pd.to_numeric(f[col], errors="coerce")
                i = int(np.flatnonzero(conv.isna().to_numpy() & f[col].notna().to_numpy())[0])
                raise InputError(
                    f"{unit.label}: gene column {col!r} has a non-numeric value {f[col].iloc[i]!r} "
                    f"at data row {row0 + i}; expression must be numbers (or leave {col!r} out of genes)"
                )
            if have == genes:  # the usual case: one copy, straight into float32
                X = f[have].to_numpy(dtype=np.float32)
            else:
                X[:, [pos[g] for g in have]] = f[have].to_numpy(dtype=np.float32)
        bad = ~np.isfinite(X)
        if bad.any():
            r, c = (int(v[0]) for v in np.nonzero(bad))
            raise InputError(
                f"{unit.label}: expression of gene {genes[c]!r} is NaN/inf at data row {row0 + r} "
                f"({int(bad.any(axis=1).sum())} rows in this chunk); fill or drop those values"
            )
        if spec.normalize == "log1p":
            if (X < 0).any():
                raise InputError(
                    f"{unit.label}: negative expression cannot be log1p-normalised; the data looks "
                    f"already normalised: use normalize: none"
                )
            total = X.sum(axis=1, keepdims=True)
            X = np.log1p(np.divide(X * 1e4, total, out=np.zeros_like(X), where=total > 0)).astype(np.float32)
    return CellBatch(section=section, x=x, y=y, z=z, cats=cats, texts=texts, nums=nums, X=X)


def selected(raw: RawChunk, unit: ReadUnit, spec: IngestSpec) -> np.ndarray | None:
    """Rows of ``raw`` inside ``spec.only_sections`` / ``spec.only_blocks`` (None: every row is read)."""
    if not spec.selects:
        return None
    f, keep = raw.frame, np.ones(len(raw.frame), dtype=bool)
    if spec.only_sections is not None:
        wanted = [str(s) for s in spec.only_sections]
        if unit.default_section is not None and not (spec.section and spec.section in f):
            keep &= unit.default_section in wanted
        else:
            keep &= pd.Series(f[spec.section]).astype(str).isin(wanted).to_numpy()
    if spec.only_blocks is not None:
        labels = _text(f[spec.block], spec.na_values)
        keep &= pd.Series(labels).isin([str(b) for b in spec.only_blocks]).to_numpy()
    return keep

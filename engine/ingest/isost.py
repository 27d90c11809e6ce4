"""Import an isoST data folder: per-slice ``.pt`` tensors plus min / scale CSVs -> a lamina atlas.

isoST keeps each slice as a torch tensor of coordinates and min-max normalised features (usually PCs) and
the normalisation in two CSV files. What this reader accepts (one slice per ``.pt`` file, natural order of
the file names unless ``order`` is given):

* a tensor ``[n, c + F]``: ``c`` coordinate columns (``coords=3``: x, y, z; ``coords=2``: x, y, with z
  from the slice's position times ``spacing``) followed by ``F`` normalised features; or
* a dict of tensors with the coordinates under one of ``COORD_KEYS`` and the features under one of
  ``FEATURE_KEYS``.

Features are restored as ``value = normalised * scale + min`` with ``min`` and ``scale`` read from the
CSVs (``F`` numbers, as one row or one column; a header of names, if present, names the features).
Files are opened with ``torch.load(weights_only=True)``: tensors only, never pickled code. Coordinates are
taken as already aligned in 3D (isoST works on registered slices), so the atlas gets a completed ``warp``
stage (``/aligned`` = the given x, y, z) and can go straight to ``lamina.pca`` / ``train_flow``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .readers import natural_key

COORD_KEYS = ("coords", "coord", "coordinates", "pos", "position", "positions", "spatial", "xyz", "xy")
FEATURE_KEYS = ("features", "feature", "feats", "pcs", "pc", "expr", "expression", "x", "X")


def _read_vector(path: Path, what: str) -> tuple[np.ndarray, list[str] | None]:
    if not path.is_file():
        raise InputError(f"isoST import: the {what} file {path} does not exist")
    raw = pd.read_csv(path, header=None)
    names = None
    first = raw.iloc[0].astype(str)
    if not pd.to_numeric(first, errors="coerce").notna().all():  # a header row of feature names
        names, raw = list(first), raw.iloc[1:]
    if raw.shape[1] > 1 and not pd.to_numeric(raw.iloc[:, 0], errors="coerce").notna().all():  # index column
        raw = raw.iloc[:, 1:]
        names = names[1:] if names else None
    values = pd.to_numeric(raw.to_numpy().ravel(), errors="coerce")
    if np.isnan(values).any():
        raise InputError(f"isoST import: {path} holds non-numeric {what} values")
    return values.astype(np.float64), names


def read_isost_slice(path: Path, coords: int) -> tuple[np.ndarray, np.ndarray]:
    """``(coordinates [n, coords], normalised features [n, F])`` of one isoST slice file."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-tensor files
        raise InputError(f"isoST import: cannot read {path} as tensors (torch.load weights_only): {exc}") from exc
    if isinstance(obj, dict):
        ck = next((k for k in COORD_KEYS if k in obj), None)
        fk = next((k for k in FEATURE_KEYS if k in obj), None)
        if ck is None or fk is None:
            raise InputError(
                f"isoST import: {path} is a dict with keys {sorted(obj)}; need coordinates under one of "
                f"{COORD_KEYS} and features under one of {FEATURE_KEYS}"
            )
        xyz, feats = np.asarray(obj[ck], np.float64), np.asarray(obj[fk], np.float64)
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().numpy().astype(np.float64)
        if t.ndim != 2 or t.shape[1] <= coords:
            raise InputError(
                f"isoST import: {path} holds a tensor of shape {tuple(t.shape)}; expected [cells, "
                f"{coords} coordinates + features]"
            )
        xyz, feats = t[:, :coords], t[:, coords:]
    else:
        raise InputError(f"isoST import: {path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    if xyz.ndim != 2 or len(xyz) != len(feats):
        raise InputError(f"isoST import: {path}: coordinates {xyz.shape} and features {feats.shape} do not match")
    return xyz, feats


def import_isost(
    folder,
    store,
    min_csv=None,
    scale_csv=None,
    coords: int = 3,
    spacing: float = 10.0,
    order: list[str] | None = None,
    units: str = "um",
    pixel_size: float | None = None,
    overwrite: bool = False,
    client=None,
):
    """Build an atlas at ``store`` from an isoST folder (see the module docstring); returns the ``Atlas``."""
    from ..stages.warp import mark_aligned
    from . import ingest

    folder = Path(folder)
    files = sorted(folder.glob("*.pt"), key=natural_key)
    if order is not None:
        by_stem = {f.stem: f for f in files}
        missing = [s for s in order if s not in by_stem]
        if missing:
            raise InputError(f"isoST import: no {missing[:5]} .pt files in {folder}")
        files = [by_stem[s] for s in order]
    if not files:
        raise InputError(f"isoST import: no .pt slice files in {folder}")
    if coords not in (2, 3):
        raise InputError(f"isoST import: coords must be 2 (x, y) or 3 (x, y, z), got {coords}")
    lo, names = _read_vector(Path(min_csv) if min_csv else folder / "min.csv", "min")
    sc, names2 = _read_vector(Path(scale_csv) if scale_csv else folder / "scale.csv", "scale")
    if len(lo) != len(sc):
        raise InputError(f"isoST import: min has {len(lo)} values and scale {len(sc)}; they must match the features")
    names = names or names2 or [f"f{i:03d}" for i in range(len(lo))]
    # staged beside the store (not in /tmp): one Parquet file per slice, as large as the input
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{Path(store).name}.isost-", dir=Path(store).parent))
    try:
        for k, path in enumerate(files):
            xyz, feats = read_isost_slice(path, coords)
            if feats.shape[1] != len(lo):
                raise InputError(f"isoST import: {path} has {feats.shape[1]} features but min/scale have {len(lo)}")
            table = pd.DataFrame(feats * sc + lo, columns=names)
            table.insert(0, "x", xyz[:, 0])
            table.insert(1, "y", xyz[:, 1])
            z = xyz[:, 2] if coords == 3 else np.full(len(xyz), k * spacing)
            if coords == 3 and np.ptp(z) > 1e-6 * max(1.0, abs(z).max()):
                raise InputError(
                    f"isoST import: slice {path.name} spans z {z.min():g}..{z.max():g}; a slice must have one depth"
                )
            table.insert(2, "z", z)
            table.insert(3, "section", path.stem)
            table.to_parquet(staging / f"{k:05d}.parquet", index=False)
        atlas = ingest(
            staging,
            store,
            x="x",
            y="y",
            z="z",
            section="section",
            genes=list(names),
            units=units,
            pixel_size=pixel_size,
            overwrite=overwrite,
            client=client,
            min_cells_per_section=1,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    mark_aligned(atlas, client=client)
    return atlas

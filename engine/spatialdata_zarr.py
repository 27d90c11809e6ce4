"""Export an atlas as a SpatialData Zarr store, written from lamina's own code, one cell chunk at a time.

spatialdata pins its own versions of dask and a stack of geometry libraries (geopandas, shapely, ome-zarr,
...), so lamina does not depend on it; it writes the on-disk format that ``spatialdata.read_zarr`` reads
(SpatialData format 0.2, as written by spatialdata 0.4-0.7 with zarr 3; the test reads the result back with
spatialdata in a virtual environment of its own). What the store holds::

    shapes/cells_<section>    circles at the raw (x, y) um of the section's cells, index = the store row
                              ("cell"); coordinate system "<section>" (the section's own um frame)
    points/cells              every cell at its aligned (x, y, z) um (coordinate system "atlas"), or, before
                              registration, at raw (x, y) and the section's z ("stack"), with its labels
    images/<section>_image    the section's image of /images (its pyramid), affine into "<section>"
    tables/table              AnnData: X (cells x genes), obs (section, z, input_row, cell columns, region,
                              cell), obsm spatial / spatial_raw / X_pca / X_<embedding>; it annotates the
                              shapes: region = cells_<section>, instance key = cell

Encodings follow anndata's on-disk specification (``encoding-type`` / ``encoding-version`` on every element)
and OME-NGFF 0.5 as spatialdata extends it (``coordinateTransformations`` with named input/output frames).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ._version import __version__
from .errors import ConfigError
from .export import gene_positions, iter_frames
from .store import arrays
from .store.atlas import Atlas

FORMAT = "0.2"  # spatialdata's format of the store root and of the tables
DEFAULT_RADIUS_UM = 5.0


def element_name(text: str) -> str:
    """A valid SpatialData element name: letters, digits, ``_``, ``-``, ``.``; other characters become ``_``."""
    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(text))


def _axes(names: str, unit: str) -> list[dict]:
    return [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": unit} for a in names]


def _transform(kind: str, names: str, frame: str, unit: str, **values) -> dict:
    """One spatialdata coordinate transformation from an element's intrinsic axes ``names`` into ``frame``."""
    return {
        "type": kind,
        **values,
        "input": {"name": names, "axes": _axes(names, unit)},
        "output": {"name": frame, "axes": _axes(names, unit)},
    }


def _image_affine(image_to_section: np.ndarray, frame: str, unit: str) -> dict:
    """``image_to_section`` (3x3 on (col, row, 1)) as spatialdata writes an x/y affine of a ``cyx`` image:
    rows (c, x, y) over columns (c, y, x, 1)."""
    a = np.asarray(image_to_section, float)
    matrix = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, a[0, 1], a[0, 0], a[0, 2]],
        [0.0, a[1, 1], a[1, 0], a[1, 2]],
    ]
    out = _transform("affine", "cyx", frame, unit, affine=matrix)
    out["output"]["axes"] = _axes("cxy", unit)
    return out


def _array(group, name: str, shape, dtype, chunks, encoding: str = "array") -> zarr.Array:
    arr = group.create_array(name, shape=tuple(shape), dtype=dtype, chunks=tuple(max(1, c) for c in chunks))
    arr.attrs.update({"encoding-type": encoding, "encoding-version": "0.2.0"})
    return arr


def _dict_group(parent, name: str):
    g = parent.create_group(name)
    g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return g


class _Obs:
    """``obs`` as anndata's dataframe encoding, filled chunk by chunk: numbers as arrays, labels as
    categoricals (codes + categories; code -1 = missing), text as string arrays."""

    def __init__(self, parent, n: int, chunk: int, kinds: dict[str, tuple]):
        self.group = parent.create_group("obs")
        self.group.attrs.update(
            {"_index": "_index", "column-order": list(kinds), "encoding-type": "dataframe", "encoding-version": "0.2.0"}
        )
        self.arrays = {"_index": _array(self.group, "_index", (n,), str, (chunk,), "string-array")}
        for col, (kind, extra) in kinds.items():
            if kind == "cat":
                g = self.group.create_group(col)
                g.attrs.update({"ordered": False, "encoding-type": "categorical", "encoding-version": "0.2.0"})
                cats = _array(g, "categories", (len(extra),), str, (max(1, len(extra)),), "string-array")
                if len(extra):
                    cats[...] = np.array(list(extra), dtype=object)
                self.arrays[col] = _array(g, "codes", (n,), np.int32, (chunk,))
            elif kind == "text":
                self.arrays[col] = _array(self.group, col, (n,), str, (chunk,), "string-array")
            else:
                self.arrays[col] = _array(self.group, col, (n,), extra, (chunk,))

    def write(self, a: int, b: int, values: dict) -> None:
        for col, v in values.items():
            self.arrays[col][a:b] = v


def _points_part(frame: pd.DataFrame, folder: Path, part: int, cats: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for col in frame.columns:
        v = frame[col]
        if col in cats:  # one dictionary for every part: dask reads the parts as one categorical
            v = pd.Categorical(v.astype(object), categories=cats[col])
        columns[col] = v
    table = pa.Table.from_pandas(pd.DataFrame(columns), preserve_index=False)
    pq.write_table(table, folder / f"part.{part}.parquet")


def _wkb_points(x: np.ndarray, y: np.ndarray):
    """Points as a WKB binary column (little-endian type 1 + two float64: 21 bytes each), built without a
    Python loop."""
    import pyarrow as pa

    rec = np.zeros(len(x), dtype=[("order", "u1"), ("kind", "<u4"), ("x", "<f8"), ("y", "<f8")])
    rec["order"], rec["kind"], rec["x"], rec["y"] = 1, 1, x, y
    offsets = (np.arange(len(x) + 1, dtype=np.int32) * 21).tobytes()
    return pa.Array.from_buffers(pa.binary(), len(x), [None, pa.py_buffer(offsets), pa.py_buffer(rec.tobytes())])


class _Shapes:
    """``shapes/<name>/shapes.parquet``: GeoParquet 1.0 circles (WKB points + radius), index ``cell``,
    streamed in row groups (the optional bbox is left out: it would need the whole section first)."""

    def __init__(self, folder: Path, frame_name: str, unit: str):
        self.folder, self.frame_name, self.unit = folder, frame_name, unit
        self.writer = None

    def write(self, cell: np.ndarray, x: np.ndarray, y: np.ndarray, radius: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        frame = pd.DataFrame({"radius": radius.astype(np.float64)}, index=pd.Index(cell.astype(np.int64), name="cell"))
        table = pa.Table.from_pandas(frame, preserve_index=True)
        table = table.add_column(0, "geometry", _wkb_points(x.astype(np.float64), y.astype(np.float64)))
        if self.writer is None:
            geo = {
                "version": "1.0.0",
                "primary_column": "geometry",
                "columns": {"geometry": {"encoding": "WKB", "crs": None, "geometry_types": ["Point"]}},
                "creator": {"library": "lamina", "version": __version__},
            }
            self.schema = table.schema.with_metadata(
                {**(table.schema.metadata or {}), b"geo": json.dumps(geo).encode()}
            )
            self.folder.mkdir(parents=True)
            self.writer = pq.ParquetWriter(self.folder / "shapes.parquet", self.schema)
        self.writer.write_table(table.cast(self.schema))

    def close(self, root) -> None:
        self.writer.close()
        node = root.require_group(f"shapes/{self.folder.name}")
        node.attrs.update(
            {
                "encoding-type": "ngff:shapes",
                "axes": ["x", "y"],
                "coordinateTransformations": [_transform("identity", "xy", self.frame_name, self.unit)],
                "spatialdata_attrs": {"version": "0.3"},
            }
        )


def export_spatialdata(
    atlas: Atlas, out, sections=None, genes=None, radius_um: float | None = None, overwrite: bool = False
) -> Path:
    """Write ``atlas`` (or some sections / genes) as the SpatialData Zarr store ``out`` (see the module
    docstring); built beside ``out`` and renamed into place when complete.

    ``radius_um``: the circles' radius; default sqrt(cell_area / pi) where a ``cell_area`` column exists (um^2,
    Xenium), else 5 um."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=True (CLI: --overwrite) or choose another path")
    picks = list(atlas.sections.index) if sections is None else [atlas.section_index(s) for s in sections]
    gidx = gene_positions(atlas, genes)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(atlas, tmp, picks, gidx, radius_um)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(atlas: Atlas, path: Path, picks: list[int], gidx: np.ndarray, radius_um: float | None) -> None:
    sec = atlas.sections
    ids = [str(sec.id.iloc[i]) for i in picks]
    names = [element_name(s) for s in ids]
    if len(set(names)) < len(names):
        raise ConfigError(f"section ids {ids} give repeated SpatialData element names {names}; rename the sections")
    unit = "pixel" if atlas.attrs.get("units") == "px" else "micrometer"
    lengths = [int(sec.cell_stop.iloc[i] - sec.cell_start.iloc[i]) for i in picks]
    n, chunk = sum(lengths), atlas.cell_chunk
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["spatialdata_attrs"] = {"version": FORMAT, "spatialdata_software_version": f"lamina {__version__}"}
    for g in ("images", "points", "shapes", "tables"):
        root.create_group(g)
    aligned = "aligned" in atlas.root and atlas.group_is_complete("aligned")
    frame_name = "atlas" if aligned else "stack"
    columns = [c for c in atlas.cell_columns if c not in ("section", "x", "y")]
    cat_cols = {c: list(cats) for c in columns if (cats := atlas.categories(c)) is not None}
    regions = [f"cells_{s}" for s in names]
    kinds: dict[str, tuple] = {"section": ("cat", ids), "z": ("num", np.float32)}
    for c in columns:
        dtype = np.asarray(atlas.root[f"cells/{c}"][:1]).dtype
        kinds[c] = ("cat", cat_cols[c]) if c in cat_cols else ("text", None) if dtype.kind in "TUO" else ("num", dtype)
    kinds.update({"region": ("cat", regions), "cell": ("num", np.int64)})
    table = root.create_group("tables/table")
    obs = _Obs(table, n, chunk, kinds)
    X = _array(table, "X", (n, len(gidx)), np.float32, (chunk, max(1, min(len(gidx), 512))))
    obsm = _dict_group(table, "obsm")
    spatial = _array(obsm, "spatial", (n, 3 if aligned else 2), np.float32, (chunk, 3 if aligned else 2))
    spatial_raw = _array(obsm, "spatial_raw", (n, 2), np.float32, (chunk, 2))
    dense = {}
    if atlas.group_is_complete("pca"):
        dense["X_pca"] = "pca/pcs"
    for key in atlas.embeddings():
        if atlas.group_is_complete(f"embeddings/{key}"):
            dense[f"X_{key}"] = f"embeddings/{key}/values"
    extra = {
        k: _array(obsm, k, (n, atlas.root[src].shape[1]), np.float32, (chunk, atlas.root[src].shape[1]))
        for k, src in dense.items()
    }
    root.create_group("points/cells")
    points = path / "points" / "cells" / "points.parquet"
    points.mkdir()
    point_cats = {"section": ids, **cat_cols}
    row, part = 0, 0
    for k, sid in enumerate(ids):
        shapes = _Shapes(path / "shapes" / regions[k], sid, unit)
        for frame in iter_frames(atlas, [sid], genes=[], embeddings=False):  # obsm reads them as arrays
            a, b = int(frame.index[0]), int(frame.index[-1]) + 1
            r0, r1 = row, row + (b - a)
            cell = frame.index.to_numpy(np.int64)
            values = {
                "_index": (sid + ":" + frame["cell_id"].astype(str)).to_numpy(object)
                if "cell_id" in frame
                else cell.astype(str).astype(object),
                "section": np.full(b - a, ids.index(sid), np.int32),
                "z": frame["z"].to_numpy(np.float32),
                "region": np.full(b - a, k, np.int32),
                "cell": cell,
            }
            for c in columns:
                v = frame[c]
                values[c] = (
                    np.asarray(v.cat.codes, np.int32)
                    if c in cat_cols
                    else v.astype(object).to_numpy()
                    if kinds[c][0] == "text"
                    else v.to_numpy()
                )
            obs.write(r0, r1, values)
            if len(gidx) and "X" in atlas.root:
                X[r0:r1] = arrays.read_columns(atlas.root["X"], a, b, gidx).astype(np.float32)
            raw = frame[["x", "y"]].to_numpy(np.float32)
            spatial_raw[r0:r1] = raw
            xyz = frame[["aligned_x", "aligned_y", "aligned_z"]].to_numpy(np.float32) if aligned else raw
            spatial[r0:r1] = xyz
            for key, src in dense.items():
                extra[key][r0:r1] = np.asarray(atlas.root[src][a:b], np.float32)
            if radius_um is not None:
                radius = np.full(b - a, float(radius_um))
            elif "cell_area" in frame:
                radius = np.sqrt(np.clip(frame["cell_area"].to_numpy(np.float64), 0, None) / np.pi)
            else:
                radius = np.full(b - a, DEFAULT_RADIUS_UM)
            shapes.write(cell, raw[:, 0], raw[:, 1], radius)
            pts = pd.DataFrame(
                {
                    "x": (xyz[:, 0] if aligned else raw[:, 0]).astype(np.float64),
                    "y": (xyz[:, 1] if aligned else raw[:, 1]).astype(np.float64),
                    "z": (xyz[:, 2] if aligned else frame["z"].to_numpy()).astype(np.float64),
                    "section": frame["section"].astype(str).to_numpy(),
                    "cell": cell,
                    **{c: frame[c].astype(object).to_numpy() for c in cat_cols},
                }
            )
            _points_part(pts, points, part, point_cats)
            row, part = r1, part + 1
        if lengths[k]:
            shapes.close(root)
        if sid in atlas.images():
            _write_image(atlas, root, sid, f"{names[k]}_image", unit)
    root["points/cells"].attrs.update(
        {
            "encoding-type": "ngff:points",
            "axes": ["x", "y", "z"],
            "coordinateTransformations": [_transform("identity", "xyz", frame_name, unit)],
            "spatialdata_attrs": {"version": "0.2", "instance_key": "cell"},
        }
    )
    var = table.create_group("var")
    var.attrs.update(
        {"_index": "_index", "column-order": [], "encoding-type": "dataframe", "encoding-version": "0.2.0"}
    )
    genes = atlas.genes[gidx].astype(str).to_numpy(object) if len(gidx) else np.array([], dtype=object)
    _array(var, "_index", (len(genes),), str, (max(1, len(genes)),), "string-array")[...] = genes
    for g in ("layers", "obsp", "varm", "varp"):
        _dict_group(table, g)
    uns = _dict_group(table, "uns")
    attrs = _dict_group(uns, "spatialdata_attrs")
    _array(attrs, "region", (len(regions),), str, (len(regions),), "string-array")[...] = np.array(
        regions, dtype=object
    )
    for key, value in (("region_key", "region"), ("instance_key", "cell")):
        arr = attrs.create_array(key, shape=(), dtype=str)
        arr[...] = value
        arr.attrs.update({"encoding-type": "string", "encoding-version": "0.2.0"})
    raw_node = table.create_array("raw", shape=(), dtype=bool)
    raw_node.attrs.update({"encoding-type": "null", "encoding-version": "0.1.0"})
    table.attrs.update(
        {
            "encoding-type": "anndata",
            "encoding-version": "0.1.0",
            "spatialdata-encoding-type": "ngff:regions_table",
            "region": regions,
            "region_key": "region",
            "instance_key": "cell",
            "version": FORMAT,
        }
    )
    arrays.consolidate(str(path))  # parquet inside groups is the format: zarr's "not recognized" is expected


def _write_image(atlas: Atlas, root, sid: str, name: str, unit: str) -> None:
    """The section's /images pyramid as an OME-NGFF multiscale image (levels s0, s1, ...), copied chunk by chunk."""
    import dask.array as da

    image = atlas.image(sid)
    group = root.create_group(f"images/{name}")
    datasets = []
    for k, level in enumerate(image["levels"]):
        target = group.create_array(
            f"s{k}", shape=level.shape, dtype=level.dtype, chunks=level.chunksize, dimension_names=("c", "y", "x")
        )
        da.store(level, target, lock=False)  # type: ignore[arg-type]  # chunks equal: one task per chunk
        datasets.append(
            {"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0**k, 2.0**k]}]}
        )
    c = int(image["levels"][0].shape[0])
    group.attrs.update(
        {
            "ome": {
                "version": "0.5-dev-spatialdata",
                "omero": {"channels": [{"label": j} for j in range(c)]},
                "multiscales": [
                    {
                        "name": f"/images/{name}",
                        "axes": [
                            {"name": "c", "type": "channel"},
                            {"name": "y", "type": "space"},
                            {"name": "x", "type": "space"},
                        ],
                        "datasets": datasets,
                        "coordinateTransformations": [_image_affine(image["image_to_section"], sid, unit)],
                    }
                ],
            },
            "spatialdata_attrs": {"version": "0.3"},
        }
    )

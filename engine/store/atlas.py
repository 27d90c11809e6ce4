"""`Atlas`: one Zarr v3 store holding everything about one 3D atlas, read lazily as xarray.

Layout (see DESIGN.md): ``/cells/<column>`` over [cell] sorted by section; ``/sections/<field>`` over
[section]; ``/genes/name`` over [gene]; ``/X`` [cell, gene] float32; further groups are written by stages.
Categorical cell columns are integer codes with their labels in the array's ``categories`` attr.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Literal, cast

import dask.array as da
import numpy as np
import pandas as pd
import psutil
import xarray as xr
import zarr

from .._version import __version__
from ..errors import StoreError, TooLargeError, UnknownGeneError, UnknownSectionError
from .arrays import as_text, get_array, get_group, read_columns
from .elements import EmbeddingV1, ImageV1, expect
from .format import FORMAT_NAME, FORMAT_VERSION, UNITS, check_format, require_current

CELL_GROUPS = ("cells", "sections", "genes", "X")


def _is_url(path: str) -> bool:
    return "://" in str(path)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _obs_names(obs: pd.DataFrame, rows: np.ndarray) -> pd.Index:
    """AnnData's obs_names: the cell ids when unique, ``<section>:<id>`` when ids repeat across sections,
    else the store rows."""
    if "cell_id" in obs:
        ids = pd.Index(obs["cell_id"].astype(str).to_numpy())
        if ids.is_unique:
            return ids
        scoped = pd.Index(obs["section"].astype(str).to_numpy() + ":" + ids.to_numpy())
        if scoped.is_unique:
            return scoped
    return pd.Index(rows.astype(str))


class Atlas:
    """Handle on an atlas store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: str | os.PathLike, root: zarr.Group):
        self.path = str(path)
        self.root = root

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike, overwrite: bool = False) -> Atlas:
        """Create an empty store at ``path`` (a directory ``NAME.lamina.zarr`` or an fsspec URL)."""
        path = str(path)
        if not _is_url(path) and Path(path).exists() and not overwrite:
            raise StoreError(f"{path} already exists; open it with lamina.Atlas.open() or pass overwrite=True")
        root = zarr.open_group(path, mode="w", zarr_format=3)
        root.attrs.update(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "units": UNITS,
                "encoding-type": FORMAT_NAME,
                "encoding-version": str(FORMAT_VERSION),
                "created_by": f"lamina {__version__}",
                "created": now_iso(),
                "stages": {},
            }
        )
        return cls(path, root)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: Literal["r", "r+", "a"] = "r") -> Atlas:
        """Open an existing store; refuses stores of a newer format version."""
        path = str(path)
        if not _is_url(path) and not (Path(path) / "zarr.json").exists():
            raise StoreError(
                f"no atlas store at {path} (no zarr.json); build one with `lamina build` or lamina.ingest()"
            )
        try:
            root = zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=False)
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"cannot open {path} as a Zarr v3 group: {exc}") from exc
        check_format(dict(root.attrs), path)
        return cls(path, root)

    def __repr__(self) -> str:
        if not self.has_cells:
            return f"<lamina.Atlas {self.path} (empty)>"
        return (
            f"<lamina.Atlas {self.path}: {self.n_cells:,} cells, {self.n_sections} sections, "
            f"{self.n_genes} genes; stages: {', '.join(self.completed_stages()) or 'none'}>"
        )

    def writable(self) -> Atlas:
        """This handle, reopened for writing if it was opened read-only (stages call this). A store of an older
        format is refused with the command that upgrades it."""
        require_current(dict(self.root.attrs), self.path)
        if self.root.store.read_only:
            self.root = zarr.open_group(self.path, mode="r+", zarr_format=3, use_consolidated=False)
        return self

    def check_disk(self, need: int, what: str, hint: str) -> None:
        """Refuse (``TooLargeError``) to write ``need`` bytes when the store's disk has less free space."""
        if _is_url(self.path):
            return
        free = shutil.disk_usage(Path(self.path).resolve().parent).free
        if need > free:
            raise TooLargeError(
                f"{what} would take up to {need / 2**30:.1f} GiB uncompressed but only "
                f"{free / 2**30:.1f} GiB are free next to {self.path}; {hint}"
            )

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def has_cells(self) -> bool:
        return "cells" in self.root and "sections" in self.root

    def _require_cells(self):
        if not self.has_cells:
            raise StoreError(f"{self.path} has no cells yet; run lamina.ingest() (or `lamina build`) first")

    @property
    def n_cells(self) -> int:
        self._require_cells()
        return int(get_array(self.root, "cells/x").shape[0])

    @property
    def n_sections(self) -> int:
        self._require_cells()
        return int(get_array(self.root, "sections/id").shape[0])

    @property
    def genes(self) -> pd.Index:
        if "genes" not in self.root:
            return pd.Index([], name="gene", dtype=object)
        return pd.Index(as_text(get_array(self.root, "genes/name")[...]), name="gene", dtype=object)

    @property
    def n_genes(self) -> int:
        return int(get_array(self.root, "genes/name").shape[0]) if "genes" in self.root else 0

    @property
    def sections(self) -> pd.DataFrame:
        """Per-section table (small): id, z (um), cell_start, cell_stop, n_cells, source (the file it came
        from) and any other 1-D per-section array; index = position along z."""
        self._require_cells()
        g = get_group(self.root, "sections")
        df = pd.DataFrame({k: np.asarray(get_array(g, k)[...]) for k in ("z", "cell_start", "cell_stop")})
        df.insert(0, "id", as_text(get_array(g, "id")[...]))
        for k in sorted(set(g.array_keys()) - {"id", "z", "cell_start", "cell_stop"}):
            arr = get_array(g, k)
            if arr.ndim == 1:
                v = arr[...]
                df[k] = as_text(v) if np.asarray(v).dtype.kind in "TUO" else np.asarray(v)
        df["n_cells"] = df["cell_stop"] - df["cell_start"]
        df.index.name = "section"
        return df

    @property
    def cell_columns(self) -> list[str]:
        self._require_cells()
        return sorted(get_group(self.root, "cells").array_keys())

    def categories(self, column: str) -> list[str] | None:
        """Labels of a categorical cell column (None if the column is numeric)."""
        cats = get_array(self.root, f"cells/{column}").attrs.get("categories")
        return None if cats is None else [str(c) for c in cats]  # type: ignore[union-attr]

    @property
    def cell_chunk(self) -> int:
        return int(get_array(self.root, "cells/x").chunks[0])

    # ------------------------------------------------------------------ stages
    def stage_records(self) -> dict:
        records = self.root.attrs.get("stages", {})
        return dict(records) if isinstance(records, dict) else {}

    def completed_stages(self) -> list[str]:
        return [k for k, v in self.stage_records().items() if v.get("complete")]

    def group_is_complete(self, group: str) -> bool:
        return group in self.root and bool(self.root[group].attrs.get("complete"))

    # ------------------------------------------------------------------ lazy views
    def _lazy(self, name: str) -> da.Array:
        arr = get_array(self.root, name)
        return da.from_zarr(arr, chunks=arr.chunks)

    def to_xarray(self) -> xr.Dataset:
        """The cells, sections and expression as one lazy, dask-backed ``xarray.Dataset``.

        Dims: ``cell``, ``gene``, ``section``; the per-cell section index is ``cell_section``; ``aligned_x/y/z``
        (um, atlas frame) once the warp stage has run (the volume: :meth:`volume`). Categorical columns
        hold int codes with their labels in ``ds[col].attrs['categories']`` (decode with :meth:`obs`). Nothing is
        read until computed.
        """
        self._require_cells()
        data_vars = {}
        for col in self.cell_columns:
            arr = self.root[f"cells/{col}"]
            # the per-cell section index cannot share its name with the "section" dimension
            data_vars["cell_section" if col == "section" else col] = xr.DataArray(
                self._lazy(f"cells/{col}"), dims=("cell",), attrs=dict(arr.attrs)
            )
        if "X" in self.root:
            data_vars["X"] = xr.DataArray(self._lazy("X"), dims=("cell", "gene"), attrs=dict(self.root["X"].attrs))
        if self.group_is_complete("aligned"):
            for k in ("x", "y", "z"):
                data_vars[f"aligned_{k}"] = xr.DataArray(
                    self._lazy(f"aligned/{k}"), dims=("cell",), attrs=dict(self.root[f"aligned/{k}"].attrs)
                )
        sec = self.sections
        for k in ("z", "cell_start", "cell_stop"):
            data_vars[f"section_{k}"] = xr.DataArray(sec[k].to_numpy(), dims=("section",))
        coords = {"section_id": ("section", sec["id"].to_numpy()), "cell": np.arange(self.n_cells)}
        if self.n_genes:
            coords["gene"] = self.genes.to_numpy()
        attrs = {k: v for k, v in self.attrs.items() if k != "stages"}
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    def volume(self) -> xr.Dataset:
        """The voxel grid as a lazy ``xarray.Dataset`` with um coordinates (voxel centres, atlas frame) to
        ``.sel`` on: ``pcs [pc, z, y, x]`` and ``density [z, y, x]`` from ``/volume``, and ``expression
        [gene, z, y, x]`` once the invert stage has run, e.g. ``atlas.volume().expression.sel(gene="Snap25",
        z=120, method="nearest")``."""
        from ..errors import MissingInputError

        if not self.group_is_complete("volume"):
            raise MissingInputError(f"{self.path} has no volume yet; run lamina.reconstruct(atlas) first")
        group = get_group(self.root, "volume")
        voxel = float(cast(float, group.attrs["voxel_um"]))
        origin = [float(v) for v in cast(list, group.attrs["origin"])]  # lower corner (x, y, z) um
        Z, Y, X = (int(v) for v in get_array(group, "density").shape)
        coords: dict[str, tuple] = {
            name: (name, origin[i] + (np.arange(size) + 0.5) * voxel, {"units": "um"})
            for i, (name, size) in enumerate((("x", X), ("y", Y), ("z", Z)))
        }
        data = {
            "pcs": xr.DataArray(self._lazy("volume/pcs"), dims=("pc", "z", "y", "x")),
            "density": xr.DataArray(self._lazy("volume/density"), dims=("z", "y", "x"), attrs={"units": "cells"}),
        }
        if self.group_is_complete("expression"):
            expr = get_group(self.root, "expression")
            data["expression"] = xr.DataArray(self._lazy("expression/values"), dims=("gene", "z", "y", "x"))
            coords["gene"] = ("gene", as_text(get_array(expr, "gene")[...]))
        return xr.Dataset(data, coords=coords, attrs={"voxel_um": voxel, "units": "um"})

    def section_index(self, section) -> int:
        """Position of a section given its id (str) or position (int)."""
        sec = self.sections
        ids = list(sec["id"])
        listed = ", ".join(map(str, ids[:10])) + (f" ... ({len(ids)} in all)" if len(ids) > 10 else "")
        if isinstance(section, (int, np.integer)) and not isinstance(section, bool):
            if not 0 <= section < len(sec):
                raise UnknownSectionError(
                    f"section position {section} is out of range [0, {len(sec)}) in "
                    f"{self.path}; pass a position in range or a section id ({listed})"
                )
            return int(section)
        hits = np.flatnonzero(sec["id"].to_numpy() == str(section))
        if not len(hits):
            raise UnknownSectionError(f"no section {section!r} in {self.path}; its sections are {listed}")
        return int(hits[0])

    def section(self, section) -> xr.Dataset:
        """Lazy view of one section's cells (by id or position)."""
        i = self.section_index(section)
        row = self.sections.iloc[i]
        ds = self.to_xarray()
        return ds.isel(cell=slice(int(row.cell_start), int(row.cell_stop)))

    def _ranges_for(self, sections) -> list[tuple[int, int]]:
        """Row ranges ``[(start, stop), ...]`` of the given sections (all sections when None), merged."""
        sec = self.sections
        if sections is None:
            return [(0, self.n_cells)]
        picks = sections if isinstance(sections, (list, tuple)) else [sections]
        out: list[tuple[int, int]] = []
        for i in (self.section_index(s) for s in picks):
            a, b = int(sec.cell_start.iloc[i]), int(sec.cell_stop.iloc[i])
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def _guard(self, n_rows: int, row_bytes: int, what: str, max_bytes: int | None) -> None:
        need = n_rows * row_bytes
        limit = max_bytes if max_bytes is not None else psutil.virtual_memory().available // 4
        if need > limit:
            raise TooLargeError(
                f"{what} of {n_rows:,} cells needs ~{need / 2**30:.2f} GiB, over the limit of {limit / 2**30:.2f} "
                f"GiB; pass sections=[...] (or genes=[...]), raise max_bytes, or stream with "
                f"`lamina export {self.path} --format parquet`."
            )

    def _read_rows(self, name: str, ranges) -> np.ndarray:
        arr = get_array(self.root, name)
        parts = [np.asarray(arr[a:b]) for a, b in ranges]
        values = np.concatenate(parts) if parts else np.empty(0, dtype=arr.dtype)
        return as_text(values) if values.dtype.kind == "T" else values

    def obs(self, sections=None, columns=None, max_bytes: int | None = None, aligned: bool | str = False):
        """The stored cell columns (categoricals decoded) for the given sections, index 0..n-1; loads those
        rows into memory (refused with ``TooLargeError`` beyond ``max_bytes``, default a quarter of available
        memory). ``aligned`` other than False gives :meth:`cells` (raw and aligned positions, z, store rows)."""
        if aligned is not False:
            return self.cells(sections, columns, aligned=aligned, max_bytes=max_bytes)
        ranges = self._ranges_for(sections)
        n = sum(b - a for a, b in ranges)
        cols = columns or self.cell_columns
        self._guard(n, 8 * len(cols) + 64, "obs", max_bytes)
        ids = self.sections["id"].tolist()
        out = {col: self.decode(col, self._read_rows(f"cells/{col}", ranges), ids) for col in cols}
        return pd.DataFrame(out, index=pd.RangeIndex(n))

    def cells(
        self, sections=None, columns=None, aligned: bool | str = "auto", max_bytes: int | None = None
    ) -> pd.DataFrame:
        """The cell table users work with, one row per cell of the chosen sections (in store order).

        Index ``cell`` (the store row); columns ``section``, ``cell_id`` (when ingested), ``input_row`` (the row
        in the input: ``sort_values("input_row")`` gives back the input's order), raw ``x``, ``y`` (um within
        the section), ``z`` (the section's depth, um), ``aligned_x``, ``aligned_y``, ``aligned_z`` (um in the
        atlas frame), then the other cell columns (or only ``columns``).

        ``aligned``: ``"auto"`` the warp stage's ``/aligned`` when it has run; ``True`` the same, required;
        ``False`` none; ``"affine"`` / ``"refined"`` computed now from that stage's transforms (``affine``: the
        register stage's affine alone, what ``align(fine=False)`` gives, without re-running anything).
        """
        from ..errors import MissingInputError

        ranges = self._ranges_for(sections)
        first = [c for c in ("section", "cell_id", "input_row", "x", "y") if c in self.cell_columns]
        rest = [c for c in (columns if columns is not None else self.cell_columns) if c not in first]
        frame = self.obs(sections, columns=first + rest, max_bytes=max_bytes)
        frame.index = pd.Index(np.concatenate([np.arange(a, b) for a, b in ranges]), name="cell")
        codes = np.asarray(frame["section"].cat.codes)
        frame.insert(frame.columns.get_loc("y") + 1, "z", self.sections.z.to_numpy(np.float32)[codes])
        if aligned not in ("auto", True, False, "affine", "refined"):
            raise StoreError(f"aligned={aligned!r}: choose 'auto', True, False, 'affine' or 'refined'")
        where = frame.columns.get_loc("z") + 1
        if aligned in ("auto", True):
            if self.group_is_complete("aligned"):
                for j, k in enumerate(("x", "y", "z")):
                    frame.insert(where + j, f"aligned_{k}", self._read_rows(f"aligned/{k}", ranges))
            elif aligned is True:
                raise MissingInputError(f"{self.path} has no aligned positions yet; run lamina.align(atlas) first")
        elif aligned:
            from ..transforms import apply_by_section, transform_group

            src = transform_group(self, str(aligned))
            out = apply_by_section(src, codes, frame[["x", "y"]].to_numpy(np.float64)).astype(np.float32)
            frame.insert(where, "aligned_x", out[:, 0])
            frame.insert(where + 1, "aligned_y", out[:, 1])
            frame.insert(where + 2, "aligned_z", frame["z"].to_numpy())
        return frame

    def decode(self, col: str, values: np.ndarray, section_ids: list[str] | None = None):
        """Stored values of cell column ``col`` -> what users see: section ids and labels as ``pd.Categorical``
        (code -1 = missing), text as Python strings, numbers unchanged."""
        if col == "section":
            return pd.Categorical.from_codes(values, categories=section_ids or self.sections["id"].tolist())
        cats = self.categories(col)
        if cats is not None:
            return pd.Categorical.from_codes(values.astype(np.int64), categories=cats)
        return as_text(values) if values.dtype.kind == "T" else values

    def to_anndata(self, sections=None, genes=None, max_bytes: int | None = None, sparse: bool | None = None):
        """An in-memory ``anndata.AnnData`` of the chosen sections / genes, in the scanpy / squidpy conventions.

        * ``obs_names``: the cell ids (prefixed ``<section>:`` when ids repeat across sections; store rows
          when no ids were ingested); ``obs``: ``section``, ``z`` (um), ``input_row`` and the cell columns, a
          missing label is missing (NaN), never a category of its own.
        * ``obsm["spatial"]``: aligned (x, y, z) um when the warp stage has run, else the raw (x, y);
          ``obsm["spatial_raw"]``: raw (x, y) um within each section; ``obsm["X_pca"]``: the PCA stage's
          scores; ``obsm["X_<key>"]``: each embedding of ``/embeddings``.
        * ``X``: float32, a CSR matrix when under half of it is non-zero (``sparse=None``) or as ``sparse``
          says; read cell chunk by cell chunk.

        Refuses (``TooLargeError``) when the result would exceed ``max_bytes`` (default: a quarter of available
        memory); select fewer sections/genes or stream with ``lamina export --format parquet`` instead.
        """
        import anndata as ad

        ranges = self._ranges_for(sections)
        n = sum(b - a for a, b in ranges)
        gene_idx = np.arange(self.n_genes)
        if genes is not None:
            names = self.genes
            missing = [g for g in genes if g not in set(names)]
            if missing:
                raise UnknownGeneError(
                    f"genes not in {self.path}: {missing[:10]}; it has {len(names)} genes "
                    f"({', '.join(map(str, names[:5]))} ...)"
                )
            gene_idx = names.get_indexer(list(genes))
        emb = [k for k in self.embeddings() if self.group_is_complete(f"embeddings/{k}")]
        extra = [f"embeddings/{k}/values" for k in emb] + (["pca/pcs"] if self.group_is_complete("pca") else [])
        extra_bytes = sum(4 * int(get_array(self.root, k).shape[1]) for k in extra)
        self._guard(n, 4 * len(gene_idx) + 8 * len(self.cell_columns) + extra_bytes + 64, "to_anndata", max_bytes)
        obs = self.cells(sections, max_bytes=max_bytes)
        X = self._matrix(ranges, gene_idx, sparse)
        raw = obs[["x", "y"]].to_numpy(np.float32)
        aligned = [f"aligned_{k}" for k in ("x", "y", "z")]
        spatial = obs[aligned].to_numpy(np.float32) if aligned[0] in obs else raw
        rows = obs.index.to_numpy()
        obs = obs.drop(columns=["x", "y", *[c for c in aligned if c in obs]])
        obs.index = _obs_names(obs, rows)
        var = pd.DataFrame(index=pd.Index(self.genes[gene_idx], name=None).astype(str))
        adata = ad.AnnData(X=X, obs=obs, var=var)
        adata.obsm["spatial"] = spatial  # squidpy's key
        adata.obsm["spatial_raw"] = raw
        if self.group_is_complete("pca"):
            adata.obsm["X_pca"] = self._read_rows("pca/pcs", ranges)
        for key in emb:
            adata.obsm[f"X_{key}"] = self._read_rows(f"embeddings/{key}/values", ranges)
        adata.uns["lamina"] = {
            "store": self.path,
            "format_version": self.attrs.get("format_version"),
            "units": self.attrs.get("units", "um"),
            "spatial": "aligned x, y, z" if spatial is not raw else "raw x, y",
        }
        return adata

    def _matrix(self, ranges, gene_idx: np.ndarray, sparse: bool | None):
        """Rows ``ranges`` x columns ``gene_idx`` of ``/X``: dense float32, or CSR when ``sparse`` (None: CSR
        when under half the entries are non-zero), built one cell chunk at a time."""
        import scipy.sparse as sp

        n = sum(b - a for a, b in ranges)
        if "X" not in self.root or not len(gene_idx) or not n:
            return (
                sp.csr_matrix((n, len(gene_idx)), dtype=np.float32)
                if sparse
                else np.zeros((n, len(gene_idx)), np.float32)
            )
        arr, step = get_array(self.root, "X"), self.cell_chunk
        blocks = []
        for a, b in ranges:
            for lo in range((a // step) * step, b, step):
                lo_, hi_ = max(a, lo), min(b, lo + step)
                block = read_columns(arr, lo_, hi_, gene_idx).astype(np.float32, copy=False)
                blocks.append(sp.csr_matrix(block) if sparse is not False else block)
        if sparse is False:
            return np.concatenate(blocks)
        X = sp.vstack(blocks, format="csr", dtype=np.float32)
        if sparse is None and X.nnz > 0.5 * n * len(gene_idx):
            return X.toarray()
        return X

    # ------------------------------------------------------------------ elements
    def images(self) -> list[str]:
        """Section ids that have an image in ``/images``."""
        if "images" not in self.root:
            return []
        return sorted(get_group(self.root, "images").group_keys())

    def image(self, section) -> dict:
        """The image of ``section``: ``levels`` (lazy dask arrays ``[c, y, x]``, finest first), ``pixel_size_um``
        and ``image_to_section`` (3x3, level-0 pixel -> the section's raw um); dispatched on its encoding."""
        sid = str(self.sections.id.iloc[self.section_index(section)])
        if sid not in self.images():
            raise UnknownSectionError(
                f"section {sid!r} of {self.path} has no image; sections with images: "
                f"{', '.join(self.images()) or 'none'}"
            )
        group = get_group(self.root, f"images/{sid}")
        fmt = expect(group, ImageV1, f"{self.path}/images/{sid}")
        return {
            "levels": fmt.levels(group),
            "pixel_size_um": float(cast(float, group.attrs["pixel_size_um"])),
            "image_to_section": fmt.pixel_to_section(group),
            "source": group.attrs.get("source", ""),
        }

    def embeddings(self) -> list[str]:
        """Keys of ``/embeddings``."""
        if "embeddings" not in self.root:
            return []
        return sorted(get_group(self.root, "embeddings").group_keys())

    def embedding(self, key: str):
        """``/embeddings/<key>`` as a lazy dask array ``[cell, dim]`` and its provenance (attrs)."""
        if key not in self.embeddings():
            raise StoreError(f"{self.path} has no embedding {key!r}; it has {', '.join(self.embeddings()) or 'none'}")
        group = get_group(self.root, f"embeddings/{key}")
        fmt = expect(group, EmbeddingV1, f"{self.path}/embeddings/{key}")
        return fmt.values(group), {k: v for k, v in group.attrs.items() if not k.startswith("encoding")}

    # ------------------------------------------------------------------ summary
    def disk_bytes(self) -> dict[str, int]:
        """Bytes on disk per top-level group (local stores only; empty dict for URLs)."""
        if _is_url(self.path):
            return {}
        out = {}
        for child in sorted(Path(self.path).iterdir()):
            if child.is_dir():
                out[child.name] = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        return out

    def info(self) -> str:
        """Human-readable summary: sections, cells, genes, stages done, sizes."""
        lines = [
            f"lamina atlas  {self.path}",
            f"  format {self.attrs.get('format_version')}  units {self.attrs.get('units')}  "
            f"created by {self.attrs.get('created_by')}",
        ]
        block = self.attrs.get("block")
        if isinstance(block, dict):
            lines.append(
                f"  block {block.get('value')} (column {block.get('column')}): one stack, never aligned to others"
            )
        if not self.has_cells:
            lines.append("  (no cells yet)")
        else:
            sec = self.sections
            lines.append(f"  cells {self.n_cells:,}   sections {len(sec)}   genes {self.n_genes:,}")
            lines.append(f"  cell columns: {', '.join(self.cell_columns)}")
            show = sec if len(sec) <= 12 else pd.concat([sec.head(6), sec.tail(6)])
            lines.append("  section            z(um)      cells")
            for _, r in show.iterrows():
                lines.append(f"  {r['id']:<16} {r['z']:>8.1f} {r['n_cells']:>10,}")
            if len(sec) > 12:
                lines.append(f"  ... ({len(sec) - 12} more)")
        from ..stages.status import stage_lines  # the registry knows every stage; the store only its records

        lines += stage_lines(self)
        if self.images() or self.embeddings():
            lines.append(
                f"  images: {', '.join(self.images()) or 'none'}   embeddings: {', '.join(self.embeddings()) or 'none'}"
            )
        sizes = self.disk_bytes()
        if sizes:
            lines.append(
                "  on disk: "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
                + f"  (total {sum(sizes.values()) / 2**20:.1f} MiB)"
            )
        return "\n".join(lines)

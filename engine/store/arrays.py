"""Zarr helpers: typed, chunk-aligned array creation and writes (the only place that touches zarr codecs)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import zarr

from ..errors import StoreError, ensure

#: Rows per cell chunk are chosen so that one chunk of a [cell, gene] float32 block stays near this size.
TARGET_CHUNK_BYTES = 32 * 2**20
MAX_CELL_CHUNK = 65536
MIN_CELL_CHUNK = 1024


def open_root(store, mode: Literal["r", "r+", "a"] = "r") -> zarr.Group:
    """The store's root group as lamina's own code opens it: never from consolidated metadata, which is a
    snapshot for readers (xarray) taken when a stage finished and does not list what a running stage makes."""
    return zarr.open_group(store, mode=mode, use_consolidated=False)


def consolidate(store) -> None:
    """Write consolidated metadata into the root (what ``xarray.open_zarr`` looks for first). Lamina rewrites
    it after every stage; any later change of the root's attributes through :func:`open_root` drops it."""
    import warnings

    with warnings.catch_warnings():  # "not part of the Zarr v3 specification": xarray reads it all the same
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(store)


def get_array(node: zarr.Group, path: str) -> zarr.Array:
    """``node[path]``, which must be an array (a clear :class:`StoreError` otherwise)."""
    found = node.get(path)
    if not isinstance(found, zarr.Array):
        raise StoreError(
            f"{node.store_path}/{path} is {'missing' if found is None else 'a group'}, not an array; "
            f"the store is damaged or from another tool: rebuild it with `lamina build`"
        )
    return found


def get_group(node: zarr.Group, path: str) -> zarr.Group:
    """``node[path]``, which must be a group (a clear :class:`StoreError` otherwise)."""
    found = node.get(path)
    if not isinstance(found, zarr.Group):
        raise StoreError(
            f"{node.store_path}/{path} is {'missing' if found is None else 'an array'}, not a group; "
            f"the store is damaged or from another tool: rebuild it with `lamina build`"
        )
    return found


def cell_chunk_rows(n_genes: int, gene_chunk: int, requested: int | None = None) -> int:
    """Rows per cell chunk: a power of two so that a [rows, gene_chunk] float32 block is ~32 MiB."""
    if requested:
        return int(requested)
    width = max(1, min(n_genes, gene_chunk))
    rows = TARGET_CHUNK_BYTES // (4 * width)
    rows = 1 << int(np.floor(np.log2(max(rows, 1))))
    return int(np.clip(rows, MIN_CELL_CHUNK, MAX_CELL_CHUNK))


def column_blocks(arr: zarr.Array, start: int, stop: int, dtype=np.float64, skip=None):
    """Rows ``[start, stop)`` of a 2-D array, one Zarr column chunk at a time: yields ``(c0, c1, block)`` with
    ``block = arr[start:stop, c0:c1]`` as ``dtype``, except the chunks whose first column is in ``skip``. What a
    task holds is then one chunk's columns, not the whole width: a row chunk of a whole-transcriptome ``/X``
    (16k cells x 18k genes) is 2.4 GB as float64."""
    step, width = int(arr.chunks[1]), int(arr.shape[1])
    skip = set() if skip is None else set(skip)
    for c0 in range(0, width, step):
        if c0 not in skip:
            c1 = min(width, c0 + step)
            yield c0, c1, np.asarray(arr[start:stop, c0:c1], dtype)


def read_columns(arr: zarr.Array, start: int, stop: int, columns) -> np.ndarray:
    """``arr[start:stop][:, columns]`` (any order, repeats allowed) reading only the column chunks that hold
    ``columns``, never the whole rows."""
    columns = np.asarray(columns, np.int64).reshape(-1)
    if not len(columns):
        return np.zeros((max(stop - start, 0), 0), arr.dtype)
    uniq, back = np.unique(columns, return_inverse=True)
    return np.asarray(arr.get_orthogonal_selection((slice(start, stop), uniq)))[:, back]


def create(
    group: zarr.Group, name: str, shape, dtype, chunks, dims, attrs: dict | None = None, fill_value=None
) -> zarr.Array:
    """Create (or replace) ``group[name]`` with xarray-readable dimension names."""
    chunks = tuple(max(1, int(min(c, s))) if s else 1 for c, s in zip(chunks, shape))
    if fill_value is None:
        fill_value = "" if dtype is str else 0
    arr = group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        chunks=chunks,
        dimension_names=tuple(dims),
        fill_value=fill_value,
        overwrite=True,
    )
    if attrs:
        arr.attrs.update(attrs)
    return arr


def write_small(group: zarr.Group, name: str, values, dims, attrs: dict | None = None) -> zarr.Array:
    """Write a provably small array (per-section tables, gene names) in one chunk."""
    values = np.asarray(values)
    dtype = str if values.dtype.kind in "UOT" else values.dtype
    if dtype is str:
        values = values.astype(str)
    arr = create(group, name, values.shape, dtype, values.shape or (1,), dims, attrs)
    if values.size:
        arr[...] = values
    return arr


def sample_rows(arr: zarr.Array, size: int, seed: int) -> np.ndarray:
    """A fixed random subsample of ``size`` rows (all rows when fewer) of a ``[cell, ...]`` array, read in
    increasing row order (one pass over the chunks it touches), as float64."""
    n = int(arr.shape[0])
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, int(size)), replace=False))
    return np.asarray(arr.oindex[rows] if arr.ndim == 1 else arr.oindex[rows, :], np.float64)


def assert_aligned(region_start: int, region_stop: int, chunk: int, length: int, what: str) -> None:
    """Refuse a parallel write that would share a chunk with another task (silent corruption in Zarr)."""
    ensure(
        not (region_start % chunk or (region_stop % chunk and region_stop != length)),
        f"misaligned write to {what}: rows [{region_start}, {region_stop}) vs chunk {chunk}",
    )


def as_text(values) -> np.ndarray:
    """Zarr text (numpy StringDType) -> object array of Python str (what pandas/anndata expect)."""
    values = np.asarray(values)
    return values.astype(object) if values.dtype.kind == "T" else values.astype(str).astype(object)

"""Spatial domains: k-means clusters of a cell embedding, written to ``/cells/<column>`` as a categorical.

``lamina.domains(atlas, k=8)`` fits k-means (scikit-learn, ``n_init`` restarts) on a fixed random subsample
of ``/embeddings/<key>`` (at most ``sample`` rows, read sorted), then assigns every cell to its nearest
centre, a task per cell chunk, into a new array that replaces ``/cells/<column>`` only once it is complete
(a directory rename). Domains are named ``D1 ... Dk`` by decreasing size in the subsample. The array's attrs
record the embedding, its stage hash, ``k`` and the seed, so a caller can tell whether they are current.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from .cluster import compute
from .errors import ConfigError, InputError, ensure
from .store import arrays
from .store.arrays import consolidate, open_root
from .store.atlas import Atlas

SCRATCH = "_tmp"
#: cell columns that ingest writes: a domain column may not replace them
RESERVED = ("x", "y", "section", "cell_id")


def _assign(store: str, key: str, centres: np.ndarray, target: str, a: int, b: int) -> np.ndarray:
    """Nearest centre of the rows ``[a, b)`` into ``target``; returns the cells per domain ``[k]``."""
    from .kernels.niche import nearest_centroid

    root = open_root(store, "r+")
    values = np.asarray(root[f"embeddings/{key}/values"][a:b], np.float64)
    label = nearest_centroid(values, centres).astype(np.int32)
    root[target][a:b] = label
    return np.bincount(label, minlength=len(centres))


def domains(
    atlas: Atlas,
    k: int,
    key: str = "niche",
    column: str = "domain",
    seed: int = 0,
    sample: int = 200_000,
    n_init: int = 10,
    client=None,
) -> pd.Series:
    """Cluster ``/embeddings/<key>`` into ``k`` spatial domains and write them to ``/cells/<column>``.

    Returns the number of cells per domain (a ``pd.Series`` indexed ``D1 ... Dk``). Raises
    :class:`lamina.ConfigError` for ``k`` outside ``[2, cells]`` or a ``column`` that ingest wrote, and
    :class:`lamina.StoreError` when the atlas has no such embedding.
    """
    from .store.lock import writer

    with writer(atlas.path):
        return _domains(atlas, k, key, column, seed, sample, n_init, client)


def _domains(atlas: Atlas, k: int, key: str, column: str, seed: int, sample: int, n_init: int, client) -> pd.Series:
    from sklearn.cluster import KMeans

    atlas = atlas.writable()
    values, attrs = atlas.embedding(key)
    n = atlas.n_cells
    if not isinstance(k, (int, np.integer)) or not 2 <= int(k) <= n:
        raise ConfigError(f"domains: k must be an integer between 2 and the atlas's {n:,} cells, got {k!r}")
    k = int(k)
    taken = (
        column in atlas.cell_columns and arrays.get_array(atlas.root, f"cells/{column}").attrs.get("domains") is None
    )
    if column in RESERVED or taken:
        raise ConfigError(
            f"domains: /cells/{column} of {atlas.path} holds ingested data; pick another column name (column=...)"
        )
    fit = arrays.sample_rows(atlas.root[f"embeddings/{key}/values"], sample, seed)
    if not np.isfinite(fit).all():
        raise InputError(f"domains: /embeddings/{key} of {atlas.path} holds NaN or inf; re-run the stage that wrote it")
    if len(np.unique(fit, axis=0)) < k:
        raise InputError(
            f"domains: k={k} is more than the {len(np.unique(fit, axis=0)):,} distinct embedding rows sampled from "
            f"{atlas.path}; ask for fewer domains"
        )
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(fit)
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    centres = km.cluster_centers_[order]
    names = [f"D{i + 1}" for i in range(k)]
    chunk = atlas.cell_chunk
    name = f"domains-{uuid.uuid4().hex[:8]}"  # written in the scratch group, moved into /cells when complete
    tmp = f"{SCRATCH}/{name}"
    source = atlas.stage_records().get(attrs.get("stage", ""), {})
    arr = arrays.create(atlas.root.require_group(SCRATCH), name, (n,), np.int32, (chunk,), ("cell",))
    try:
        tasks = [
            dask.delayed(_assign, pure=False)(atlas.path, key, centres, tmp, a, min(n, a + chunk))
            for a in range(0, n, chunk)
        ]
        counts = np.sum(compute(*tasks, client=client, label="domains"), axis=0)
        ensure(int(counts.sum()) == n, "domains: not every cell was assigned")
        arr.attrs.update(
            {
                "categories": names,
                "encoding": "categorical",
                "domains": {"embedding": key, "hash": source.get("hash"), "k": k, "seed": seed},
            }
        )
        old = Path(atlas.path, "cells", column)
        trash = Path(atlas.path, SCRATCH, f"{name}-old")
        if old.exists():
            old.rename(trash)
        Path(atlas.path, tmp).rename(old)
        shutil.rmtree(trash, ignore_errors=True)
        if SCRATCH in atlas.root and not list(atlas.root[SCRATCH].keys()):
            del atlas.root[SCRATCH]
        consolidate(atlas.path)
    except BaseException:
        shutil.rmtree(Path(atlas.path, tmp), ignore_errors=True)
        raise
    return pd.Series(counts, index=names, name=column)

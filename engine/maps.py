"""The two maps every stage's work goes through: tiles of an image, neighbourhoods of cells.

``map_tiles(fn, store, source, target, halo=...)``
    ``fn`` over tiles of a raster or image level ``[..., C, H, W]`` with a halo, written into a target array
    ``[..., C_out, H / factor, W / factor]`` one target chunk per task (so writes are chunk-aligned). The halo
    comes from the kernel: ``halo=kernel_halo(params)`` (e.g. :func:`lamina.kernels.raster.smooth_halo`), or
    from ``fn.required_halo(**kwargs)`` when ``halo`` is not given, as dask-image derives the depth of a
    filter from its parameters. At the image border the halo is cut; the kernel sees the border as it
    would untiled, so the result equals ``fn(whole image)`` bit for bit.

``map_neighbourhoods(fn, atlas, target, radius=... | k=...)``
    ``fn`` over spatial tiles of cells, each with every cell within ``radius`` um (or its ``k`` nearest) as
    halo, within its section and optionally from the ``z_sections`` adjacent sections (aligned coordinates,
    3D distances). Data flow::

        pass 1, a task per cell chunk: tile key of each cell -> rows sorted by tile within the chunk
                                       (chunk-aligned scratch array) + counts per (chunk, tile)
        pass 2, a task per tile:       its rows + the halo tiles' rows -> coordinates, columns (only those
                                       rows) -> CSR neighbours -> fn -> the tile's results (scratch array)
        pass 3, a task per cell chunk: the results of the tiles that touch the chunk -> target rows

    With ``reduce=`` instead of a target, pass 3 is a tree of folds over what ``fn`` returns (e.g. the Gram
    matrix of per-cell features, for a PCA that never forms the ``[cell, feature]`` matrix); ``sample=`` hands
    ``fn`` only a fixed hashed subset of the cells; ``halo_um=`` reads further than the neighbour lists reach
    (a kernel that searches a sample of the cells itself).

    A task holds one tile and its halo (plus one chunk while reading), never a whole section, and the
    neighbour lists of at most ``PAIRS_PER_BLOCK`` pairs at a time: ``fn`` gets a :class:`Neighbourhood` for
    each block of a tile's cells (a dense tissue has more neighbours per cell, not bigger blocks). Neighbour
    lists are in increasing row order with the cell itself included, so a kernel of
    :mod:`lamina.kernels.neighbours` gives the same bits as over all cells at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import uuid

import dask
import numpy as np

from .cluster import compute
from .errors import InputError, MissingInputError, ensure
from .store import arrays
from .store.arrays import open_root
from .store.atlas import Atlas

SCRATCH = "_tmp"
#: the k-nearest halo starts at this multiple of the k-th neighbour distance at the section's mean density
KNN_START = 1.5
#: neighbour pairs per call of ``fn``: a tile's cells are handed over in blocks of about this many pairs
PAIRS_PER_BLOCK = 1_000_000


# ---------------------------------------------------------------------------------------------- tiles
def _tile_task(
    store: str,
    source: str,
    target: str,
    lead: tuple,
    y: tuple[int, int],
    x: tuple[int, int],
    halo: int,
    factor: int,
    fn,
    kwargs: dict,
    with_origin: bool = False,
    channels: tuple[int, int] | None = None,
) -> int:
    root = open_root(store, "r+")
    src, dst = root[source], root[target]
    H, W = src.shape[-2:]
    (y0, y1), (x0, x1) = y, x
    Y0, Y1, X0, X1 = y0 * factor, min(H, y1 * factor), x0 * factor, min(W, x1 * factor)
    a0, a1, b0, b1 = max(0, Y0 - halo), min(H, Y1 + halo), max(0, X0 - halo), min(W, X1 + halo)
    leading = tuple(slice(a, b) for a, b in lead)
    block = np.asarray(src[(*leading, *(slice(None),) * (src.ndim - 2 - len(lead)), slice(a0, a1), slice(b0, b1))])
    if channels is not None:
        kwargs = {**kwargs, "channels": channels}
    out = np.asarray(fn(block, origin=(a0, b0), **kwargs) if with_origin else fn(block, **kwargs))
    oy, ox = (Y0 - a0) // factor, (X0 - b0) // factor
    core = out[..., oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
    ensure(
        core.shape[-2:] == (y1 - y0, x1 - x0),
        f"map_tiles: {getattr(fn, '__name__', fn)} returned {out.shape[-2:]} pixels for a block of {block.shape[-2:]}",
    )
    rest = (slice(None),) * (dst.ndim - 2 - len(lead)) if channels is None else (slice(*channels),)
    dst[(*leading, *rest, slice(y0, y1), slice(x0, x1))] = core
    return 1


def map_tiles(
    fn,
    store: str,
    source: str,
    target: str,
    *,
    halo: int | None = None,
    factor: int = 1,
    batch_dims: int | None = None,
    kwargs: dict | None = None,
    with_origin: bool = False,
    split_channels: bool = False,
    client=None,
    label: str = "map_tiles",
) -> int:
    """Apply ``fn(block, **kwargs)`` tile by tile from ``store``/``source`` into the existing array ``target``.

    Shapes: ``source`` ``[*B, C, H, W]`` (or ``[*B, H, W]``), ``target`` ``[*B, C_out, H // factor, W // factor]``;
    ``batch_dims`` leading dims (default: all but the channel and spatial dims of ``target``; 0 for a
    ``[C, H, W]`` image) are sliced alike in both, the channel dims are whole in every task. One task per
    chunk of ``target``: it reads the source under the chunk grown by ``halo`` input pixels (a multiple of
    ``factor``), calls ``fn`` and writes the chunk's part of the result. Returns the number of tiles.
    ``with_origin``: ``fn`` also gets ``origin=(row, col)``, the source pixel of ``block[..., 0, 0]`` (a kernel
    that places the block in the image, e.g. next to points given in image coordinates).
    ``split_channels``: ``target`` has one channel dim, chunked; one task per chunk of it, and ``fn`` also gets
    ``channels=(c0, c1)``, the output channels it computes (e.g. gene maps ``[gene, y, x]`` written a few genes
    per task, so no task holds every gene of a tile).
    """
    kwargs = dict(kwargs or {})
    if halo is None:
        if not hasattr(fn, "required_halo"):
            raise InputError(f"map_tiles: pass halo= or give {getattr(fn, '__name__', fn)} a required_halo(**kwargs)")
        halo = int(fn.required_halo(**kwargs))
    factor = int(factor)
    if factor < 1 or halo < 0:
        raise InputError(f"map_tiles: factor must be >= 1 and halo >= 0, got {factor} and {halo}")
    halo = -(-int(halo) // factor) * factor  # whole output pixels on every side
    root = open_root(store, "r")
    src, dst = root[source], root[target]
    H, W = src.shape[-2:]
    if dst.shape[-2:] != (-(-H // factor), -(-W // factor)):
        raise InputError(
            f"map_tiles: {target} is {dst.shape[-2:]} pixels; {source} at factor {factor} needs "
            f"{(-(-H // factor), -(-W // factor))}"
        )
    nb = dst.ndim - 3 if batch_dims is None else int(batch_dims)
    nb = max(nb, 0)
    if src.shape[:nb] != dst.shape[:nb]:
        raise InputError(f"map_tiles: batch dims of {source} {src.shape[:nb]} and {target} {dst.shape[:nb]} differ")
    if split_channels and dst.ndim - nb != 3:
        raise InputError(f"map_tiles: split_channels needs one channel dim in {target} (shape {dst.shape})")
    for d in range(nb, dst.ndim - 2):
        if dst.chunks[d] != dst.shape[d] and not split_channels:
            raise InputError(
                f"map_tiles: {target} must hold its channel dim {d} in one chunk "
                f"(chunks {dst.chunks}, shape {dst.shape})"
            )

    def spans(n, c):
        return [(a, min(n, a + c)) for a in range(0, n, c)]

    leads = [()]
    for d in range(nb):
        leads = [(*lead, span) for lead in leads for span in spans(dst.shape[d], dst.chunks[d])]
    splits = spans(dst.shape[nb], dst.chunks[nb]) if split_channels else [None]
    tasks = [
        dask.delayed(_tile_task, pure=False)(
            store, source, target, lead, ys, xs, halo, factor, fn, kwargs, with_origin, channels
        )
        for lead in leads
        for channels in splits
        for ys in spans(dst.shape[-2], dst.chunks[-2])
        for xs in spans(dst.shape[-1], dst.chunks[-1])
    ]
    return int(sum(compute(*tasks, client=client, label=label)))


# -------------------------------------------------------------------------------------- neighbourhoods
@dataclasses.dataclass
class Neighbourhood:
    """A block of one tile's cells and the tile's halo, as ``map_neighbourhoods`` hands it to ``fn``.

    ``rows`` ``[n]``: atlas rows of every cell read (increasing); ``core`` ``[m]``: positions in ``rows`` of the
    block's cells, whose results ``fn`` returns ``[m, F]`` in this order; ``xyz`` ``[n, 3]`` um (z = the
    section's depth); ``section`` ``[n]``; ``columns``: the arrays asked for, at ``rows`` (e.g.
    ``columns["pca/pcs"]`` ``[n, P]``); ``indptr`` ``[m + 1]`` / ``indices`` (into ``rows``) / ``distances`` (um):
    each core cell's neighbours in increasing row order, itself included."""

    rows: np.ndarray
    core: np.ndarray
    xyz: np.ndarray
    section: np.ndarray
    columns: dict
    indptr: np.ndarray
    indices: np.ndarray
    distances: np.ndarray


def neighbours(
    xyz: np.ndarray,
    core: np.ndarray,
    radius: float | None = None,
    k: int | None = None,
    z_scale: float = 1.0,
    tree=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR neighbours of the cells ``core`` among all ``xyz`` ``[n, 3]``: every cell within ``radius`` um, or
    the ``k`` nearest (3D distance, z multiplied by ``z_scale``), each list in increasing index order with the
    cell itself included. Returns ``(indptr, indices, distances)``. ``tree``: a ``cKDTree`` of the scaled
    points when the caller holds one (blocks of one tile)."""
    from scipy.spatial import cKDTree

    pts = np.asarray(xyz, np.float64) * np.array([1.0, 1.0, z_scale])
    tree = cKDTree(pts) if tree is None else tree
    if radius is not None:
        counts, indices = ball_lists(tree, pts[core], float(radius))
    else:
        kk = min(int(k), len(pts))
        _, idx = tree.query(pts[core], k=kk)
        idx = np.sort(np.asarray(idx, np.int64).reshape(len(core), kk), axis=1)
        counts = np.full(len(core), kk, np.int64)
        indices = idx.reshape(-1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    owner = np.repeat(np.asarray(core, np.int64), counts)
    distances = np.sqrt(((pts[indices] - pts[owner]) ** 2).sum(1))
    return indptr, indices, distances


def ball_lists(tree, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of ``tree`` within ``radius`` of each of ``queries``, each list in increasing index order,
    flattened: ``(counts [m], indices [nnz])``."""
    lists = tree.query_ball_point(queries, r=radius, return_sorted=True)
    counts = np.fromiter(map(len, lists), np.int64, len(lists))
    return counts, np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(counts.sum()))


def _blocks(tree, pts: np.ndarray, core: np.ndarray, radius: float | None, k: int | None) -> list[np.ndarray]:
    """``core`` split in order into blocks of about ``PAIRS_PER_BLOCK`` neighbour pairs: what a task holds of
    neighbour lists at once, whatever the density (a dense tissue has more neighbours within a radius)."""
    if radius is not None:
        counts = np.asarray(tree.query_ball_point(pts[core], r=float(radius), return_length=True), np.int64)
    else:
        counts = np.full(len(core), min(int(k), len(pts)), np.int64)
    ends = np.searchsorted(np.cumsum(counts), np.arange(1, 1 + int(counts.sum()) // PAIRS_PER_BLOCK) * PAIRS_PER_BLOCK)
    return [b for b in np.split(core, np.unique(ends[(ends > 0) & (ends < len(core))])) if len(b)]


def _xyz(root, rows, sec: np.ndarray, coords: str, section_z) -> np.ndarray:
    """(x, y, z) um ``[n, 3]`` of ``rows`` (a slice or sorted row indices): aligned, or raw with the section's z."""
    if coords == "aligned":
        return np.stack([np.asarray(root[f"aligned/{c}"].oindex[rows], np.float64) for c in ("x", "y", "z")], 1)
    xy = [np.asarray(root[f"cells/{c}"].oindex[rows], np.float64) for c in ("x", "y")]
    return np.stack([*xy, np.asarray(section_z)[sec]], 1)


def _index_task(store: str, scratch: str, a: int, b: int, coords: str, grid: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 for rows ``[a, b)``: the rows sorted by tile key into ``scratch``; returns (keys, counts)."""
    root = open_root(store, "r+")
    sec = np.asarray(root["cells/section"][a:b]).astype(np.int64)
    xyz = _xyz(root, slice(a, b), sec, coords, grid["section_z"])
    tx = np.clip(np.floor((xyz[:, 0] - grid["x0"]) / grid["tile"]).astype(np.int64), 0, grid["nx"] - 1)
    ty = np.clip(np.floor((xyz[:, 1] - grid["y0"]) / grid["tile"]).astype(np.int64), 0, grid["ny"] - 1)
    key = (sec * grid["ny"] + ty) * grid["nx"] + tx
    order = np.argsort(key, kind="stable")
    root[scratch][a:b] = a + order
    keys, counts = np.unique(key, return_counts=True)
    return keys, counts


def sampled(rows: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Mask ``[n]`` of the rows in a fixed pseudo-random subset of about ``fraction`` (a number, or one per row)
    of all rows: a hash of the row number and ``seed`` (splitmix64), so the subset does not depend on tiles,
    chunks or workers."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows, np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (int(seed) + 1)) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53) < np.asarray(fraction, np.float64)


class _Chunks:
    """The pass-1 array read a chunk at a time, the last few chunks kept (a tile's spans share chunks)."""

    def __init__(self, arr, keep: int = 8):
        self.arr, self.chunk, self.keep = arr, int(arr.chunks[0]), keep
        self.cache: dict[int, np.ndarray] = {}

    def rows(self, spans) -> np.ndarray:
        """The rows of ``spans`` (start, stop), each within one chunk, in order."""
        parts = []
        for a, b in spans:
            c = a // self.chunk
            if c not in self.cache:
                if len(self.cache) >= self.keep:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[c] = np.asarray(self.arr[c * self.chunk : (c + 1) * self.chunk])
            parts.append(self.cache[c][a - c * self.chunk : b - c * self.chunk])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _neighbourhood_task(
    store: str, sorted_rows: str, out: str, key: int, index: dict, grid: dict, spec: dict, fn, kwargs: dict, reduce=None
):
    """Pass 2 for one tile: gather it and its halo, build the neighbours, run ``fn``, write its results (or,
    with ``reduce``, return them folded: ``None`` when no cell of the tile was sampled)."""
    root = open_root(store, "r+")
    nx, ny, n_sec, tile = grid["nx"], grid["ny"], grid["n_sections"], grid["tile"]
    s, rest = divmod(key, nx * ny)
    ty, tx = divmod(rest, nx)
    sorted_arr = _Chunks(root[sorted_rows])
    core_rows = sorted_arr.rows(index.get(key, ()))
    secs = range(max(0, s - spec["z_sections"]), min(n_sec, s + spec["z_sections"] + 1))
    if spec["radius"] is not None:
        reach = max(1, math.ceil(max(spec["radius"], spec["halo_um"]) / tile))
    else:  # start near the k-th neighbour distance of the section's mean density, then double until exact
        guess = KNN_START * math.sqrt(spec["k"] / (math.pi * grid["density"][s]))
        reach = max(1, math.ceil(guess / tile))
    read: dict[int, np.ndarray] = {}  # halo keys already gathered, so a growing halo reads each tile once
    while True:
        box = (max(0, tx - reach), min(nx, tx + reach + 1), max(0, ty - reach), min(ny, ty + reach + 1))
        for ss in secs:
            for yy in range(box[2], box[3]):
                for xx in range(box[0], box[1]):
                    kk = (ss * ny + yy) * nx + xx
                    if kk not in read:
                        read[kk] = sorted_arr.rows(index.get(kk, ()))
        rows = np.sort(np.concatenate(list(read.values())))
        sec = np.asarray(root["cells/section"].oindex[rows]).astype(np.int64)
        xyz = _xyz(root, rows, sec, spec["coords"], grid["section_z"])
        if spec["radius"] is not None:  # of the halo tiles, only the cells within the radius of this tile matter
            r = max(spec["radius"], spec["halo_um"])
            x_lo, y_lo = grid["x0"] + tx * tile - r, grid["y0"] + ty * tile - r
            keep = (xyz[:, 0] >= x_lo) & (xyz[:, 0] <= x_lo + tile + 2 * r) & (xyz[:, 1] >= y_lo)
            keep &= xyz[:, 1] <= y_lo + tile + 2 * r
            keep |= np.isin(rows, core_rows)
            rows, sec, xyz = rows[keep], sec[keep], xyz[keep]
        # core cells in the order the tile's rows were listed (chunk by chunk), which pass 3 relies on
        core = np.searchsorted(rows, core_rows)
        if spec["radius"] is not None or box == (0, nx, 0, ny):
            break
        # k nearest: exact once every core cell's k-th neighbour is nearer than the edge of what was read
        indptr, indices, dist = neighbours(xyz, core, None, spec["k"], spec["z_scale"])
        p = xyz[core]
        inf = np.full(len(p), np.inf)
        edge = np.minimum.reduce(
            [
                p[:, 0] - (grid["x0"] + box[0] * tile) if box[0] > 0 else inf,
                grid["x0"] + box[1] * tile - p[:, 0] if box[1] < nx else inf,
                p[:, 1] - (grid["y0"] + box[2] * tile) if box[2] > 0 else inf,
                grid["y0"] + box[3] * tile - p[:, 1] if box[3] < ny else inf,
            ]
        )
        kth = np.maximum.reduceat(dist, indptr[:-1]) if len(dist) else np.zeros(0)
        if np.all(kth <= edge):
            break
        reach *= 2
    from scipy.spatial import cKDTree

    if spec["sample"] is not None:  # a fixed subset of the cells, whatever the tiling: a hash of the row
        core = core[sampled(rows[core], spec["sample"], spec["seed"])]
    columns = {
        name: np.asarray(root[name].oindex[rows] if root[name].ndim == 1 else root[name].oindex[rows, :])
        for name in spec["columns"]
    }
    pts = xyz * np.array([1.0, 1.0, spec["z_scale"]])
    tree = cKDTree(pts)
    parts = []
    folded = None
    for block in _blocks(tree, pts, core, spec["radius"], spec["k"]):
        indptr, indices, dist = neighbours(xyz, block, spec["radius"], spec["k"], spec["z_scale"], tree=tree)
        result = fn(Neighbourhood(rows, block, xyz, sec, columns, indptr, indices, dist), **kwargs)
        if reduce is not None:
            folded = result if folded is None else reduce(folded, result)
            continue
        out_block = np.asarray(result)
        ensure(
            len(out_block) == len(block),
            f"map_neighbourhoods: fn returned {len(out_block)} rows for {len(block)} cells",
        )
        parts.append(out_block.reshape(len(block), -1))
    if reduce is not None:
        return folded
    values = np.concatenate(parts) if parts else np.zeros((0, 1))
    width, dtype = tuple(spec["width"]), np.dtype(spec["dtype"])
    group, name = out.rsplit("/", 1)
    target = arrays.create(  # this task's own array: no other task writes it
        root[group],
        name,
        (len(core), *width),
        dtype,
        (max(len(core), 1), *width),
        ("row",) + tuple(f"d{i}" for i in range(len(width))),
    )
    target[...] = values.reshape((len(core), *width)).astype(dtype)
    return len(core)


def _copy_task(store: str, sorted_rows: str, target: str, a: int, b: int, parts: list) -> int:
    """Pass 3 for the rows ``[a, b)`` of one chunk: each touching tile's results go to their rows."""
    root = open_root(store, "r+")
    out = np.empty((b - a,) + root[target].shape[1:], root[target].dtype)
    done = 0
    srt = np.asarray(root[sorted_rows][a:b])
    for scratch, offset, start, count in parts:
        out[srt[start : start + count] - a] = np.asarray(root[scratch][offset : offset + count])
        done += count
    ensure(done == b - a, f"map_neighbourhoods: rows [{a}, {b}) got {done} results")
    root[target][a:b] = out
    return b - a


def map_neighbourhoods(
    fn,
    atlas: Atlas,
    target: str | None = None,
    *,
    radius: float | None = None,
    k: int | None = None,
    columns=(),
    coords: str = "aligned",
    z_sections: int = 0,
    z_scale: float = 1.0,
    tile_um: float | None = None,
    kwargs: dict | None = None,
    reduce=None,
    sample: float | None = None,
    seed: int = 0,
    halo_um: float | None = None,
    client=None,
    label: str = "map_neighbourhoods",
):
    """Apply ``fn(Neighbourhood, **kwargs) -> [m, F]`` over spatial tiles of the atlas's cells and write each
    cell's row into ``target`` (an existing ``[cell, F]`` array of the store, chunked like ``/cells``).

    Or, with ``reduce(a, b)`` (associative) and no ``target``: fold what ``fn`` returns for every block (any
    value, e.g. sums and Gram matrices of per-cell features) within each tile, then across tiles by a tree
    of tasks, and return the result (``None`` when no cell was sampled). ``sample``: only a fixed
    pseudo-random fraction of the cells are handed to ``fn`` (as core cells; their neighbours are all
    cells), e.g. to fit statistics on a subset; see :func:`sampled`.

    ``radius`` (um) or ``k``: who is a neighbour. ``coords``: ``aligned`` (the ``warp`` stage's atlas frame;
    needed when ``z_sections`` > 0) or ``raw``. ``z_sections``: adjacent sections on each side whose cells
    join the neighbourhood (3D distance, z times ``z_scale``). ``tile_um``: tile edge (default: about 20,000
    cells per tile, at least the radius). ``columns``: store arrays ``[cell, ...]`` read for the gathered
    cells. Returns the number of cells written.
    """
    if (target is None) == (reduce is None):
        raise InputError("map_neighbourhoods: give a target array to write, or reduce= to fold the results")
    if halo_um is not None and (radius is None or not (np.isfinite(halo_um) and halo_um >= 0)):
        raise InputError(f"map_neighbourhoods: halo_um needs radius= and must be >= 0 um, got {halo_um}")
    if sample is not None and not 0 < float(sample) <= 1:
        raise InputError(f"map_neighbourhoods: sample must be a fraction in (0, 1], got {sample}")
    if (radius is None) == (k is None):
        raise InputError("map_neighbourhoods: give either radius (um) or k (nearest neighbours)")
    if radius is not None and not (np.isfinite(radius) and radius > 0):
        raise InputError(f"map_neighbourhoods: radius must be a positive number of um, got {radius}")
    if k is not None and int(k) < 1:
        raise InputError(f"map_neighbourhoods: k must be >= 1, got {k}")
    if coords not in ("aligned", "raw"):
        raise InputError(f"map_neighbourhoods: coords must be 'aligned' or 'raw', got {coords!r}")
    if coords == "raw" and z_sections:
        raise InputError(
            "map_neighbourhoods: neighbours from adjacent sections need coords='aligned' (raw "
            "coordinates of different sections are not in one frame)"
        )
    if coords == "aligned" and not atlas.group_is_complete("aligned"):
        raise MissingInputError(
            f"map_neighbourhoods: {atlas.path} is not aligned yet (no complete /aligned); run "
            f"lamina.align(atlas) first, or use coords='raw' within sections"
        )
    root = atlas.root
    n, chunk = atlas.n_cells, atlas.cell_chunk
    if target is not None and (root[target].shape[0] != n or root[target].chunks[0] != chunk):
        raise InputError(f"map_neighbourhoods: {target} must be [cell, ...] with {n} rows in chunks of {chunk}")
    for name in columns:
        if name not in root or root[name].shape[0] != n:
            raise MissingInputError(f"map_neighbourhoods: column {name!r} is not a [cell, ...] array of {atlas.path}")
    # a halo wider than the lists (halo_um) is read for every tile: tiles of at least 3 halos keep what a task
    # reads within (1 + 2/3)^2 = 2.8x its own cells, whatever the density
    grid = _grid(atlas, coords, tile_um, None if radius is None else max(radius, 3.0 * (halo_um or 0.0)))
    store = atlas.path
    token = uuid.uuid4().hex[:8]
    scratch = root.require_group(f"{SCRATCH}/nbh-{token}")
    try:
        arrays.create(scratch, "rows", (n,), np.int64, (chunk,), ("cell",))
        sorted_rows = f"{scratch.path}/rows"
        starts = list(range(0, n, chunk))
        found = compute(
            *[
                dask.delayed(_index_task, pure=False)(store, sorted_rows, a, min(n, a + chunk), coords, grid)
                for a in starts
            ],
            client=client,
            label=label,
        )
        index: dict[int, list] = {}  # tile key -> spans of sorted rows, chunk by chunk
        per_chunk: list[list] = []  # chunk -> (key, start in chunk, count)
        for a, (keys, counts) in zip(starts, found):
            offs = np.concatenate([[0], np.cumsum(counts)])
            per_chunk.append([(int(kk), int(o), int(c)) for kk, o, c in zip(keys, offs[:-1], counts)])
            for kk, o, c in per_chunk[-1]:
                index.setdefault(kk, []).append((a + o, a + o + c))
        spec = {
            "radius": None if radius is None else float(radius),
            "halo_um": float(halo_um or 0.0),
            "k": None if k is None else int(k),
            "z_sections": int(z_sections),
            "z_scale": float(z_scale),
            "coords": coords,
            "columns": list(columns),
            "width": list(root[target].shape[1:]) if target is not None else [],
            "dtype": root[target].dtype.str if target is not None else "f8",
            "sample": None if sample is None else float(sample),
            "seed": int(seed),
        }
        tiles = sorted(index)
        outs = {key: f"{scratch.path}/t{key}" for key in tiles}
        # the cells of a section over its occupied tiles: where the k-nearest search starts
        per_section = np.zeros(grid["n_sections"])
        occupied = np.zeros(grid["n_sections"])
        for key in tiles:
            ss = key // (grid["nx"] * grid["ny"])
            per_section[ss] += sum(e - s for s, e in index[key])
            occupied[ss] += 1
        grid["density"] = (per_section / np.maximum(occupied, 1) / grid["tile"] ** 2 + 1e-12).tolist()
        shared = dask.delayed(
            index, pure=True, traverse=False
        )  # one graph node that every tile task reads, not a copy each
        tasks = [
            dask.delayed(_neighbourhood_task, pure=False)(
                store, sorted_rows, outs[key], key, shared, grid, spec, fn, dict(kwargs or {}), reduce
            )
            for key in tiles
        ]
        if reduce is not None:
            while len(tasks) > 1:  # a tree, so no task (and not the client) holds every tile's result
                tasks = [dask.delayed(_fold, pure=False)(reduce, *tasks[i : i + 8]) for i in range(0, len(tasks), 8)]
            return compute(*tasks, client=client, label=label)[0] if tasks else None
        done = sum(compute(*tasks, client=client, label=label))
        ensure(done == n, f"map_neighbourhoods: tiles computed {done} cells of {n}")
        seen: dict[int, int] = {}
        copies = []
        for a, entries in zip(starts, per_chunk):
            parts = []
            for kk, o, c in entries:
                parts.append((outs[kk], seen.get(kk, 0), o, c))
                seen[kk] = seen.get(kk, 0) + c
            copies.append(dask.delayed(_copy_task, pure=False)(store, sorted_rows, target, a, min(n, a + chunk), parts))
        return int(sum(compute(*copies, client=client, label=label)))
    finally:
        if f"{SCRATCH}/nbh-{token}" in root:
            del root[f"{SCRATCH}/nbh-{token}"]


def _fold(reduce, *parts):
    """``reduce`` over the parts that are not ``None`` (tiles without a sampled cell)."""
    out = None
    for part in parts:
        if part is not None:
            out = part if out is None else reduce(out, part)
    return out


def _grid(atlas: Atlas, coords: str, tile_um: float | None, radius: float | None, cells_per_tile: int = 20_000) -> dict:
    """One tile grid for all sections: origin, tile edge (um) and tiles along x and y."""
    names = ("aligned/x", "aligned/y") if coords == "aligned" else ("cells/x", "cells/y")
    x, y = (atlas._lazy(nm) for nm in names)
    x0, x1, y0, y1 = (float(v) for v in dask.compute(x.min(), x.max(), y.min(), y.max()))
    sec = atlas.sections
    if tile_um is None:
        area = max((x1 - x0) * (y1 - y0), 1e-6)
        per_section = float(np.median(sec.n_cells.to_numpy())) or 1.0
        tile_um = math.sqrt(area * cells_per_tile / per_section)
    tile = max(float(tile_um), float(radius or 0.0), 1e-6)
    nx, ny = max(1, math.ceil((x1 - x0) / tile + 1e-9)), max(1, math.ceil((y1 - y0) / tile + 1e-9))
    return {
        "x0": x0,
        "y0": y0,
        "tile": tile,
        "nx": int(nx),
        "ny": int(ny),
        "n_sections": int(len(sec)),
        "section_z": sec.z.to_numpy(np.float64).tolist(),
    }

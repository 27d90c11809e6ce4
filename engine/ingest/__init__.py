"""Streaming ingest of cell tables into an atlas store.

Data flow::

    source -> read units (files / phantom sections) --pass 1, one task per unit--> section-sorted fragments
           -> layout (validate, order sections by z)  --pass 2, one task per cell chunk--> /cells, /X, ...

Neither pass holds more than one read chunk (pass 1) or one cell chunk (pass 2) per task. The new store is
built beside the target (``NAME.tmp-XXXX``) and renamed into place only when complete, so a failure never
touches an existing store; re-running with the same input and parameters is a no-op.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import ConfigError, InputError, StoreError, ensure
from ..hashing import jsonable, params_hash
from ..store import arrays
from ..store.atlas import Atlas, _is_url, now_iso
from ..store.elements import CellsV1, GenesV1, MatrixV1, SectionsV1
from .assemble import Layout, layout_sections, plan_pieces, resolve_genes
from .memory import AnnDataTable, FrameTable, is_anndata
from .readers import H5AD_SUFFIXES, SUPPORTED, H5adFile, PhantomSection, ReadUnit, TableFile, natural_key, stem
from .spec import IngestSpec
from .staging import stage_unit
from .write import pieces_for_rows, write_block

log = logging.getLogger("lamina")
INGEST_VERSION = 2  # 2: /cells/input_row

__all__ = ["ingest", "ingest_blocks", "import_isost", "IngestSpec", "read_units"]


def _unit_for(path: Path, spec: IngestSpec, paste, default_section=None) -> ReadUnit:
    if path.name.lower().endswith(H5AD_SUFFIXES):
        return H5adFile(path, spatial_key=spec.spatial_key, default_section=default_section)
    if not path.name.lower().endswith(SUPPORTED):
        raise InputError(f"{path}: unsupported file type; lamina reads {', '.join(SUPPORTED)}")
    return TableFile(path, paste=list(paste or []), default_section=default_section)


def _memory_unit(obj, spec: IngestSpec, label: str, default_section=None) -> ReadUnit | None:
    if isinstance(obj, pd.DataFrame):
        return FrameTable(obj, label=label, default_section=default_section)
    if is_anndata(obj):
        return AnnDataTable(obj, spatial_key=spec.spatial_key, label=label, default_section=default_section)
    return None


def read_units(source, spec: IngestSpec, paste=None, pattern: str | None = None) -> tuple[list[ReadUnit], bool]:
    """Turn ``source`` into read units; returns (units, folder_mode).

    ``source``: a file; a folder (one file per section, natural name order, ``pattern`` to filter); a list of
    files (one per section); a ``pandas.DataFrame`` or ``anndata.AnnData`` (one table of all cells); a dict
    ``{section id: DataFrame | AnnData | file}`` (one table per section, in the dict's order); or a
    :class:`lamina.datasets.Phantom`.
    """
    from ..datasets.phantom import Phantom

    if isinstance(source, Phantom):
        import dataclasses

        spec_dict = dataclasses.asdict(source.spec)
        return [PhantomSection(spec_dict, s) for s in range(source.spec.n_sections)], False
    if paste and not isinstance(source, (str, Path)):
        raise ConfigError("paste files apply to a single input file, not to in-memory tables or lists of files")
    unit = _memory_unit(source, spec, type(source).__name__)
    if unit is not None:
        return [unit], False
    if isinstance(source, dict):
        if not source:
            raise InputError("ingest was given an empty dict of sections; pass {section id: table, ...}")
        units = []
        for sid, value in source.items():
            unit = _memory_unit(value, spec, f"section {sid!r}", default_section=str(sid))
            if unit is None:
                if not isinstance(value, (str, Path)):
                    raise InputError(
                        f"section {sid!r} of the dict is a {type(value).__name__}; give a DataFrame, an AnnData "
                        f"or a file path per section"
                    )
                path = Path(value)
                if not path.is_file():
                    raise InputError(f"section {sid!r}: input file {path} does not exist; check the path")
                unit = _unit_for(path, spec, None, default_section=str(sid))
            units.append(unit)
        return units, True
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"input {path} does not exist; check the path")
        if path.is_file():
            return [_unit_for(path, spec, paste)], False
        files = sorted(
            (p for p in path.glob(pattern or "*") if p.is_file() and p.name.lower().endswith(SUPPORTED)),
            key=natural_key,
        )
        if not files:
            raise InputError(
                f"folder {path} has no readable files ({', '.join(SUPPORTED)})"
                + (f" matching {pattern!r}" if pattern else "")
            )
    if paste:
        raise ConfigError("paste files apply to a single input file, not to a folder or list of files")
    return [_unit_for(p, spec, None, default_section=stem(p)) for p in files], True


def _spatial_default(source, spec: IngestSpec) -> IngestSpec:
    """AnnData keeps positions in ``obsm["spatial"]`` (the scanpy / squidpy key): use it when the x column
    is not in obs and no key was given."""
    tables = list(source.values()) if isinstance(source, dict) else [source]
    if spec.spatial_key is not None or not tables or not all(is_anndata(t) for t in tables):
        return spec
    if all(spec.x not in t.obs.columns and "spatial" in t.obsm for t in tables):
        import dataclasses

        log.info("ingest: positions from obsm['spatial'] (set x=/y= to use obs columns instead)")
        return dataclasses.replace(spec, spatial_key="spatial")
    return spec


def phantom_spec(ph, **overrides) -> IngestSpec:
    """The :class:`IngestSpec` that reads a phantom's columns (z from the phantom's section depths)."""
    options = {
        "cell_type": "cell_type",
        "cell_id": "cell_id",
        "genes": "rest",
        "section_z": {sid: float(z) for sid, z in zip(ph.section_ids, ph.z)},
    }
    return IngestSpec(**{**options, **overrides})


def _clean_stale(path: Path) -> None:
    for old in path.parent.glob(path.name + ".tmp-*"):
        if (old / "zarr.json").exists() or (old / "_staging").exists():
            shutil.rmtree(old, ignore_errors=True)


def _platform_spec(sections, spec: IngestSpec | None, spec_kwargs: dict) -> IngestSpec:
    """The platform's reading options under the user's: a keyword given, or a field of ``spec`` that differs
    from its default, wins."""
    options = dict(sections[0][1].options)
    options["obs"] = [c for c in options.get("obs", []) if all(c in ps.options.get("obs", []) for _, ps in sections)]
    if spec is not None:
        default = IngestSpec().to_dict()
        given = {k: v for k, v in spec.to_dict().items() if v != default[k]}
    else:
        given = dict(spec_kwargs)
    if given.get("units", options.get("units")) != "px":
        options.pop("pixel_size", None)
    return IngestSpec(**{**options, **given})


def ingest(
    source,
    store,
    spec: IngestSpec | None = None,
    *,
    paste=None,
    pattern: str | None = None,
    platform: str | None = None,
    images=None,
    overwrite: bool = False,
    client=None,
    **spec_kwargs,
) -> Atlas:
    """Stream ``source`` into the atlas store ``store`` and return it (see the module docstring).

    ``source``: a file or folder of files (CSV/TSV/Parquet/h5ad), a list of files, a ``pandas.DataFrame``, an
    ``anndata.AnnData`` (positions from ``obsm["spatial"]`` unless ``x=``/``y=`` name obs columns; expression
    from ``X`` with ``genes="rest"``), a dict ``{section id: table or file}``, or a phantom.

    Column mapping and options come from ``spec`` or keyword arguments of :class:`IngestSpec`
    (``x=``, ``y=``, ``section=``, ``z=``, ``cell_type=``, ``genes=``, ``units=`` ...). ``paste`` lists
    files whose rows correspond 1:1 to ``source`` (e.g. MERFISH positions + metadata). ``overwrite``
    replaces a store that was ingested from other input; the old one stays until the new one is complete.

    ``platform``: ``xenium``, ``merscope``, ``cosmx``, ``visium`` or ``visium_hd``: ``source`` is then an
    instrument output folder per section (one folder, a list, or ``{section id: folder}``), read as the vendor
    documents it (see :mod:`lamina.ingest.platforms`); keyword options still override the layout's.
    ``images``: ``{section id: path | dict(path=, pixel_size_um=, image_to_section=) | ImageSource}`` stored
    in ``/images``; with a platform, True (default) also stores the images its folders hold, False none.
    """
    from ..datasets.phantom import Phantom

    image_sources: dict = {}
    if platform is not None:
        if paste or pattern:
            raise ConfigError("paste= and pattern= do not apply to a platform input (a folder per section)")
        from .platforms import read_platform

        sections = read_platform(platform, source)
        spec = _platform_spec(sections, spec, spec_kwargs)
        spec_kwargs = {}
        if images is not False:
            image_sources = {sid: ps.image for sid, ps in sections if ps.image is not None}
    if isinstance(images, dict):
        from .images import as_source

        image_sources.update({str(k): as_source(v) for k, v in images.items()})
    elif images not in (None, True, False):
        raise ConfigError("images= is a dict {section id: image path or ImageSource}, or True / False with a platform")
    if spec is None:
        spec = phantom_spec(source, **spec_kwargs) if isinstance(source, Phantom) else IngestSpec(**spec_kwargs)
    elif spec_kwargs:
        raise ConfigError("pass either spec= or keyword options to ingest(), not both")
    if _is_url(str(store)):
        raise ConfigError(
            f"ingest writes to a local or shared filesystem path; {store} is a URL. Ingest to a "
            f"shared path, then copy the store to object storage"
        )
    path = Path(store)
    if platform is not None:
        units, folder_mode = [ps.unit for _, ps in sections], True
    else:
        spec = _spatial_default(source, spec)
        units, folder_mode = read_units(source, spec, paste, pattern)
    if spec.only_sections is not None:  # a file that is one section outside the subset is not read at all
        wanted = {str(s) for s in spec.only_sections}
        units = [
            u for u in units if u.default_section is None or spec.section in u.columns() or u.default_section in wanted
        ]
        image_sources = {k: v for k, v in image_sources.items() if k in wanted}
        if not units:
            raise InputError(f"only_sections={spec.only_sections}: no input file is one of these sections")
    from ..store.lock import writer

    with writer(path):
        return _ingest(units, folder_mode, path, spec, overwrite, client, image_sources)


def block_store(store, block: str) -> Path:
    """The store of one block: ``{block}`` in ``store`` replaced, else ``NAME-<block>.lamina.zarr`` beside it."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(block))
    text = str(store)
    if "{block}" in text:
        return Path(text.replace("{block}", safe))
    path = Path(text)
    name = path.name
    for suffix in (".lamina.zarr", ".zarr"):
        if name.endswith(suffix):
            return path.with_name(f"{name[: -len(suffix)]}-{safe}{suffix}")
    return path.with_name(f"{name}-{safe}")


def block_values(source, spec: IngestSpec, paste=None, pattern: str | None = None) -> list[str]:
    """The blocks of ``source`` in its ``spec.block`` column (one pass over that column only), in natural order;
    ``spec.only_blocks`` when given (each must exist)."""
    import re

    if not spec.block:
        raise ConfigError("blocks need a block column: set block=<column> (config: columns.block)")
    units, _ = read_units(source, spec, paste, pattern)
    found: set[str] = set()
    missing = 0
    from .batch import MISSING, _text

    for unit in units:
        if spec.block not in unit.columns():
            raise InputError(f"{unit.label}: no block column {spec.block!r}; its columns: {unit.columns()[:12]}")
        for raw in unit.chunks(200_000, [spec.block]):
            labels = _text(raw.frame[spec.block], spec.na_values)
            missing += int((labels == MISSING).sum())
            found.update(str(v) for v in pd.unique(labels) if v != MISSING)
    if missing:
        log.warning("ingest: %d cell(s) have no %s; they belong to no block and are not read", missing, spec.block)
    order = sorted(found, key=lambda b: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", b)])
    if spec.only_blocks is not None:
        unknown = [str(b) for b in spec.only_blocks if str(b) not in found]
        if unknown:
            raise InputError(f"blocks {unknown} are not in column {spec.block!r}; it has {order[:12]}")
        order = [str(b) for b in spec.only_blocks]
    return order


def ingest_blocks(source, store, spec: IngestSpec | None = None, *, paste=None, pattern=None, client=None, **kw):
    """One store per block of ``spec.block`` (``block=`` column): ``{block: Atlas}``, each ingested as
    :func:`ingest` with ``only_blocks=[block]`` into :func:`block_store` (``store`` with ``{block}``, or
    ``NAME-<block>.lamina.zarr``). The input is read once per block (and once for the block column)."""
    import dataclasses

    options = {k: kw.pop(k) for k in ("overwrite", "images") if k in kw}
    if spec is not None and kw:
        raise ConfigError("pass either spec= or keyword options to ingest_blocks(), not both")
    spec = spec if spec is not None else IngestSpec(**kw)
    return {
        b: ingest(
            source,
            block_store(store, b),
            dataclasses.replace(spec, only_blocks=[b]),
            paste=paste,
            pattern=pattern,
            client=client,
            **options,
        )
        for b in block_values(source, spec, paste, pattern)
    }


def _ingest(
    units: list[ReadUnit], folder_mode: bool, path: Path, spec: IngestSpec, overwrite: bool, client, images: dict
) -> Atlas:
    fingerprints = [u.fingerprint() for u in units]
    if images:  # only then: the hash of a store without images stays what it was
        fingerprints.append({"images": {sid: src.fingerprint() for sid, src in sorted(images.items())}})
    digest = params_hash("ingest", INGEST_VERSION, spec.to_dict(), fingerprints)
    if path.exists():
        existing = Atlas.open(path, mode="r")
        rec = existing.stage_records().get("ingest", {})
        if rec.get("complete") and rec.get("hash") == digest:
            log.info("ingest: %s is up to date, skipped", path)
            return existing
        old = rec.get("algorithm_version")
        # the same input and options read by an older ingest: the algorithm changed, so it re-runs
        same_input = isinstance(old, int) and rec.get("hash") == params_hash(
            "ingest", old, spec.to_dict(), fingerprints
        )
        if same_input:
            log.info("ingest: %s was read by ingest version %s; re-reading with version %d", path, old, INGEST_VERSION)
        elif not overwrite:
            raise StoreError(
                f"{path} already holds an atlas from other input or options; pass overwrite=True "
                f"(CLI: --overwrite) to replace it, or choose another store path"
            )
    _clean_stale(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    try:
        staged = Atlas.create(tmp)
        staging = tmp / "_staging"
        genes, _ = resolve_genes(units, spec)
        from ..cluster import compute

        log.info("ingest: started (%d read unit(s)) -> %s", len(units), path)
        # a table in this process is staged here (shipping it to a worker would copy it into the graph)
        local = {i: stage_unit(u, spec, genes, str(staging), i) for i, u in enumerate(units) if u.local}
        remote = [i for i, u in enumerate(units) if not u.local]
        tasks = [dask.delayed(stage_unit, pure=False)(units[i], spec, genes, str(staging), i) for i in remote]
        if tasks:
            local.update(zip(remote, compute(*tasks, client=client, label="ingest")))
        summaries = [local[i] for i in range(len(units))]
        t_stage = time.perf_counter() - t0
        layout = layout_sections(summaries, spec, folder_mode)
        _write_store(staged, layout, summaries, spec, genes, str(staging), client)
        shutil.rmtree(staging)
        if images:
            from .images import write_images

            write_images(staged.root, images, list(layout.ids))
            log.info("ingest: images of %d section(s) stored in /images", len(images))
        seconds = time.perf_counter() - t0
        record = {
            "complete": True,
            "hash": digest,
            "params": jsonable(spec.to_dict()),
            "group": "/",
            "source": [u.label for u in units][:50],
            "n_units": len(units),
            "finished": now_iso(),
            "seconds": round(seconds, 3),
            "seconds_pass1": round(t_stage, 3),
            "version": __version__,
            "algorithm_version": INGEST_VERSION,
        }
        staged.root.attrs["stages"] = {"ingest": record}
        if spec.block:
            staged.root.attrs["block"] = {"column": spec.block, "value": (layout.categories.get("block") or [None])[0]}
        if not spec.scale_known:  # lengths are pixels of unknown size; every um in the store reads "px"
            staged.root.attrs.update({"units": "px", "scale_known": False})
        arrays.consolidate(str(tmp))
        if path.exists():
            trash = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash)
        else:
            tmp.rename(path)
        log.info(
            "ingest: done in %.1f s -> %s (%d cells, %d sections, %d genes)",
            seconds,
            path,
            int(layout.n.sum()),
            len(layout.ids),
            len(genes),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Atlas.open(path, mode="r+")


def _write_store(
    atlas: Atlas, layout: Layout, summaries: list[dict], spec: IngestSpec, genes: list[str], staging: str, client
) -> None:
    root = atlas.root
    n_total = int(layout.n.sum())
    chunk = arrays.cell_chunk_rows(len(genes), spec.gene_chunk, spec.cell_chunk)
    cells = root.create_group("cells")
    um = {"units": "um"}
    arrays.create(
        cells,
        "section",
        (n_total,),
        np.int32,
        (chunk,),
        ("cell",),
        {"description": "position of the cell's section in /sections"},
    )
    arrays.create(cells, "x", (n_total,), np.float32, (chunk,), ("cell",), um)
    arrays.create(cells, "y", (n_total,), np.float32, (chunk,), ("cell",), um)
    arrays.create(
        cells,
        "input_row",
        (n_total,),
        np.int64,
        (chunk,),
        ("cell",),
        {"description": "0-based row of the cell in the input (inputs in order, rows in order)"},
    )
    row_offset = np.concatenate([[0], np.cumsum([s["rows"] for s in summaries])])[:-1]
    plan = {
        "cats": {},
        "texts": [],
        "nums": {},
        "genes": bool(genes),
        "chunk": chunk,
        "row_offset": [int(v) for v in row_offset],
    }
    for col, kind in layout.kinds.items():
        if kind == "cat":
            cats = layout.categories.get(col, [])
            dtype = np.int16 if len(cats) < 2**15 else np.int32
            arrays.create(
                cells,
                col,
                (n_total,),
                dtype,
                (chunk,),
                ("cell",),
                {"categories": cats, "encoding": "categorical"},
                fill_value=-1,
            )
            plan["cats"][col] = cats
        elif kind == "text":
            arrays.create(cells, col, (n_total,), str, (chunk,), ("cell",))
            plan["texts"].append(col)
        else:
            dtype = np.float32 if kind == "num:f" else np.int64
            arrays.create(cells, col, (n_total,), dtype, (chunk,), ("cell",))
            plan["nums"][col] = np.dtype(dtype).str
    starts = np.concatenate([[0], np.cumsum(layout.n)])
    sec = root.create_group("sections")
    arrays.write_small(sec, "id", np.array(layout.ids, dtype=str), ("section",))
    arrays.write_small(sec, "z", layout.z.astype(np.float32), ("section",), {"units": "um", "source": layout.z_source})
    arrays.write_small(sec, "cell_start", starts[:-1].astype(np.int64), ("section",))
    arrays.write_small(sec, "cell_stop", starts[1:].astype(np.int64), ("section",))
    arrays.write_small(sec, "source", np.array(layout.source, dtype=str), ("section",))
    gene_group = root.create_group("genes")
    arrays.write_small(gene_group, "name", np.array(genes, dtype=str), ("gene",))
    if genes:
        gc = min(spec.gene_chunk, len(genes))
        arrays.create(
            root,
            "X",
            (n_total, len(genes)),
            np.float32,
            (chunk, gc),
            ("cell", "gene"),
            {"normalization": spec.normalize, "gene_join": spec.gene_join, "dtype": "float32"},
        )
        if spec.gene_join == "union":
            pos = {g: i for i, g in enumerate(genes)}
            measured = np.zeros((len(layout.ids), len(genes)), dtype=bool)
            rank = {sid: i for i, sid in enumerate(layout.ids)}
            for s in summaries:
                cols = [pos[g] for g in s["genes"] if g in pos]
                for sid in s["sections"]:
                    measured[rank[sid], cols] = True
            arrays.write_small(
                sec,
                "gene_measured",
                measured,
                ("section", "gene"),
                {"description": "false where the section's file lacked the gene (stored as 0)"},
            )
    from ..cluster import compute

    pieces = plan_pieces(summaries, layout)
    lengths = np.array([hi - lo for _, lo, hi, _ in pieces], dtype=np.int64)
    pstarts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    store = str(atlas.path)
    tasks = [
        dask.delayed(write_block, pure=False)(
            store,
            staging,
            a,
            min(a + chunk, n_total),
            pieces_for_rows(pieces, pstarts, a, min(a + chunk, n_total)),
            plan,
        )
        for a in range(0, n_total, chunk)
    ]
    written = sum(compute(*tasks, client=client, label="ingest"))
    ensure(written == n_total, f"ingest wrote {written} rows, expected {n_total}")
    for fmt, node in ((CellsV1, cells), (SectionsV1, sec), (GenesV1, gene_group)):
        fmt.stamp(node)
    if genes:
        MatrixV1.stamp(root["X"])


from .isost import import_isost  # noqa: E402  (needs ingest defined above)

"""Read units: one input file (or one phantom section) streamed as bounded row chunks.

A unit never holds more than one chunk of rows. ``columns()`` and ``genes()`` read only headers.
Every failure to read becomes an :class:`InputError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz", ".parquet", ".pq")
H5AD_SUFFIXES = (".h5ad",)
SUPPORTED = TABLE_SUFFIXES + H5AD_SUFFIXES


@dataclass
class RawChunk:
    frame: pd.DataFrame  # columns as named in the input (may hold gene columns)
    X: np.ndarray | None = None  # [n, len(genes)] when expression comes apart from the frame (h5ad)
    genes: list | None = None  # names of X's columns (None: the unit's genes under the spec, in order)
    row0: int = 0  # first row's 0-based data-row number in the unit (header excluded)


def stem(path: Path) -> str:
    """File name without its data suffixes: ``151507.csv.gz`` -> ``151507``."""
    name = path.name
    for suf in sorted(SUPPORTED, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def natural_key(path: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _corrupt(label: str, row: int, exc: BaseException) -> InputError:
    return InputError(
        f"{label}: cannot read past data row ~{row}: {type(exc).__name__}: {exc}. The file looks "
        f"truncated or corrupt; re-download or re-export it."
    )


_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError)


def text_list(values) -> list[str]:
    """HDF5 / Parquet strings as Python ``str`` (bytes decoded as UTF-8)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def open_hdf5(path: Path, fix: str, kind: str = "HDF5"):
    """``h5py.File(path, "r")``; a file h5py cannot open is an :class:`InputError` naming it and ``fix``."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable {kind} file ({exc}); {fix}") from exc


def genes_of(names: list[str], spec) -> list[str]:
    """The genes of ``spec.genes`` (``"rest"``: all) among a unit's gene ``names`` (AnnData's var_names)."""
    if spec.genes == "rest":
        return list(names)
    return [g for g in spec.genes if g in set(names)]


class ReadUnit:
    """Base class: a labelled source of row chunks."""

    label: str = "?"
    default_section: str | None = None
    local: bool = False  # staged in the calling process (an in-memory table) instead of on a worker

    def columns(self) -> list[str]:
        raise NotImplementedError

    def genes(self, spec) -> list[str]:
        """Gene names this unit provides under ``spec.genes``."""
        if spec.genes is None:
            return []
        cols = self.columns()
        if spec.genes == "rest":
            used = set(spec.used_columns())
            return [c for c in cols if c not in used]
        return [g for g in spec.genes if g in set(cols)]

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        raise NotImplementedError

    def fingerprint(self):
        raise NotImplementedError


def release_arrow_memory() -> None:
    """Hand memory that arrow's allocator (mimalloc / jemalloc) keeps after a chunk back to the OS; without
    this a streaming reader's footprint creeps up with the number of chunks it has read."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


#: Spellings of a missing number in CSV (R writes NA, pandas NaN); in a text column they are labels.
NUMBER_NA = ("NA", "NaN", "nan", "N/A", "NULL", "null", "None", "-nan", "#N/A")


def missing_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """The CSV missing-value rule, the same as Parquet's nulls: an empty field is missing; the spellings of
    :data:`NUMBER_NA` are missing only in a column whose other values are all numbers (a number column with
    gaps), and stay labels in a text column (cell type "NA" is a label)."""
    for col in frame.columns:
        s = frame[col]
        if s.dtype != object:
            continue
        text = s.astype(str).str.strip()
        na = s.notna().to_numpy() & text.isin(NUMBER_NA).to_numpy()
        if not na.any():
            continue
        rest = s[~na & s.notna().to_numpy()]
        conv = pd.to_numeric(rest, errors="coerce")
        if len(rest) and conv.notna().all():
            frame[col] = pd.to_numeric(s.where(~na), errors="coerce")
    return frame


def _file_fingerprint(path: Path):
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _sep(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", errors="replace") as fh:
            head = fh.readline()
    except _READ_ERRORS as exc:
        raise _corrupt(str(path), 0, exc) from exc
    return "\t" if "\t" in head else ","


@dataclass
class TableFile(ReadUnit):
    """CSV/TSV (optionally gzipped) or Parquet; ``paste`` files are read side by side (same rows, more columns)."""

    path: Path
    paste: list = field(default_factory=list)
    default_section: str | None = None
    names: list | None = None  # column names of a CSV without a header row (Space Ranger 1's positions)
    text: list = field(default_factory=list)  # columns read as text as written (ids: no int / float guess)

    def __post_init__(self):
        self.path = Path(self.path)
        self.paste = [Path(p) for p in self.paste]
        for p in [self.path, *self.paste]:
            if not p.is_file():
                raise InputError(
                    f"input file {p} does not exist; check the path (relative paths are taken from "
                    f"the directory you run lamina in)"
                )
        self.label = str(self.path) + (f" (+ {', '.join(map(str, self.paste))})" if self.paste else "")

    @staticmethod
    def _is_parquet(p: Path) -> bool:
        return p.suffix.lower() in (".parquet", ".pq")

    def _header(self, p: Path) -> list[str]:
        try:
            if self._is_parquet(p):
                import pyarrow.parquet as pq

                schema = pq.ParquetFile(p).schema_arrow
                # pandas stores a non-default index as a column; it is row labels, not data
                index = {c for c in ((schema.pandas_metadata or {}).get("index_columns") or []) if isinstance(c, str)}
                return [c for c in schema.names if c not in index]
            if self.names is not None:
                return [str(c) for c in self.names]
            return list(pd.read_csv(p, sep=_sep(p), nrows=0).columns)
        except InputError:
            raise
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _corrupt(str(p), 0, exc) from exc
        except Exception as exc:  # pandas and pyarrow raise many types for files that are not tables
            raise InputError(
                f"{p}: cannot read the header: {type(exc).__name__}: {exc}. Is it a CSV/TSV/Parquet "
                f"table with a header row?"
            ) from exc

    def columns(self) -> list[str]:
        cols, owner = [], {}
        for p in [self.path, *self.paste]:
            for c in self._header(p):
                if c in owner:
                    raise InputError(
                        f"column {c!r} is in both {owner[c]} and {p}; pasted files must not share "
                        f"column names (rename one)"
                    )
                owner[c] = p
                cols.append(c)
        return cols

    def _iter_file(self, p: Path, rows: int, needed: list[str]) -> Iterator[pd.DataFrame]:
        have = [c for c in self._header(p) if c in set(needed)]
        if self._is_parquet(p):
            import pyarrow as pa
            import pyarrow.parquet as pq

            # pre_buffer=False: with pre-buffering, arrow keeps every column chunk it has read until the
            # whole file is done, so memory would grow with the length of the file
            for batch in pq.ParquetFile(p, pre_buffer=False).iter_batches(batch_size=rows, columns=have):
                frame = pa.Table.from_batches([batch]).to_pandas(split_blocks=True, self_destruct=True)
                del batch
                release_arrow_memory()
                for c in set(self.text) & set(frame.columns):
                    frame[c] = text_list(frame[c])
                yield frame.reset_index(drop=True)
        else:
            reader = pd.read_csv(
                p,
                sep=_sep(p),
                usecols=have,
                chunksize=rows,
                low_memory=False,
                keep_default_na=False,
                na_values=[""],
                header=None if self.names is not None else "infer",
                names=self.names,
                dtype={c: str for c in self.text if c in have} or None,
            )
            for frame in reader:
                yield missing_numbers(frame)

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        files = [self.path, *self.paste]
        iters = [self._iter_file(p, rows, needed) for p in files]
        row0 = 0
        while True:
            parts = []
            for p, it in zip(files, iters):
                try:
                    parts.append(next(it, None))
                except Exception as exc:  # gzip/zlib/pandas/pyarrow each raise their own types for damaged files
                    raise _corrupt(str(p), row0, exc) from exc
            if all(part is None for part in parts):
                return
            lengths = {str(p): (0 if part is None else len(part)) for p, part in zip(files, parts)}
            if len(set(lengths.values())) > 1:
                raise InputError(
                    f"pasted files do not have the same number of rows (near data row {row0}): "
                    f"{lengths}; rows of pasted files must correspond 1:1"
                )
            frame = parts[0] if len(parts) == 1 else pd.concat([x.reset_index(drop=True) for x in parts], axis=1)
            yield RawChunk(frame=frame, row0=row0)
            row0 += len(frame)

    def fingerprint(self):
        return [_file_fingerprint(p) for p in [self.path, *self.paste]]


@dataclass
class H5adFile(ReadUnit):
    """AnnData ``.h5ad`` read with h5py row slice by row slice (obs columns, obsm, dense or CSR X)."""

    path: Path
    spatial_key: str | None = None
    default_section: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        if not self.path.is_file():
            raise InputError(f"input file {self.path} does not exist")
        self.label = str(self.path)

    def _open(self):
        fix = "the file looks truncated or corrupt: re-download or re-write it with anndata"
        return open_hdf5(self.path, fix, kind="HDF5/h5ad")

    @staticmethod
    def _var_names(f) -> list[str]:
        return text_list(f["var"][f["var"].attrs.get("_index", "_index")][...])

    def columns(self) -> list[str]:
        with self._open() as f:
            if "obs" not in f:
                raise InputError(f"{self.path}: no 'obs' group; is this an AnnData .h5ad file?")
            cols = [k for k in f["obs"].keys() if k != "__categories"] + ["_index"]
            if self.spatial_key:
                cols += [f"obsm:{self.spatial_key}:0", f"obsm:{self.spatial_key}:1"]
            return cols

    def n_rows(self) -> int:
        with self._open() as f:
            idx = f["obs"].attrs.get("_index", "_index")
            return int(f["obs"][idx].shape[0])

    def genes(self, spec) -> list[str]:
        if spec.genes is None:
            return []
        with self._open() as f:
            if "var" not in f or "X" not in f:
                raise InputError(f"{self.path}: no 'var'/'X'; cannot read genes from it (set genes: null)")
            names = self._var_names(f)
        return genes_of(names, spec)

    @staticmethod
    def _column(obs, name: str, a: int, b: int):
        node = obs[name]
        if hasattr(node, "keys"):  # categorical: codes + categories
            codes = np.asarray(node["codes"][a:b])
            cats = text_list(node["categories"][...])
            return pd.Categorical.from_codes(codes, categories=cats)
        values = node[a:b]
        if values.dtype.kind in "OS":
            return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
        return values

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        import scipy.sparse as sp

        with self._open() as f:
            obs = f["obs"]
            idx_name = obs.attrs.get("_index", "_index")
            n = int(obs[idx_name].shape[0])
            obs_keys = set(obs.keys())  # one listing: `in obs` per name is an HDF5 lookup
            cols = [c for c in needed if c in obs_keys and c != idx_name]
            want_index = "_index" in needed or idx_name in needed
            own = obs_keys | {"_index", idx_name} | {c for c in needed if c.startswith("obsm:")}
            # expression is read only when genes are asked for (names beyond the obs columns)
            X = f.get("X") if any(c not in own for c in needed) else None
            var_names = self._var_names(f) if X is not None and "var" in f else None
            for a in range(0, n, rows):
                b = min(n, a + rows)
                try:
                    data = {c: self._column(obs, c, a, b) for c in cols}
                    if want_index:
                        data["_index"] = self._column(obs, idx_name, a, b)
                    if self.spatial_key:
                        key = f"obsm/{self.spatial_key}"
                        if key not in f:
                            raise InputError(
                                f"{self.path}: no obsm['{self.spatial_key}']; available: "
                                f"{list(f['obsm'].keys()) if 'obsm' in f else []}"
                            )
                        xy = np.asarray(f[key][a:b])
                        data[f"obsm:{self.spatial_key}:0"], data[f"obsm:{self.spatial_key}:1"] = xy[:, 0], xy[:, 1]
                    block = None
                    if X is not None:
                        enc = X.attrs.get("encoding-type", "array")
                        if enc == "csr_matrix":
                            shape = tuple(X.attrs["shape"])
                            ptr = np.asarray(X["indptr"][a : b + 1])
                            block = (
                                sp.csr_matrix(
                                    (X["data"][ptr[0] : ptr[-1]], X["indices"][ptr[0] : ptr[-1]], ptr - ptr[0]),
                                    shape=(b - a, shape[1]),
                                )
                                .toarray()
                                .astype(np.float32, copy=False)
                            )
                        elif enc == "csc_matrix":
                            raise InputError(
                                f"{self.path}: X is CSC (column-major), which cannot be streamed by rows; "
                                f"convert once with adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
                            )
                        else:
                            block = np.asarray(X[a:b], dtype=np.float32)
                except InputError:
                    raise
                except (OSError, KeyError, ValueError) as exc:
                    raise _corrupt(str(self.path), a, exc) from exc
                yield RawChunk(frame=pd.DataFrame(data), X=block, genes=var_names, row0=a)

    def fingerprint(self):
        return [_file_fingerprint(self.path)]


@dataclass
class PhantomSection(ReadUnit):
    """One section of a synthetic phantom, generated on the worker that reads it."""

    spec: dict
    section: int

    def __post_init__(self):
        self.label = f"phantom section {self.section}"

    def _phantom(self):
        from ..datasets.phantom import Phantom, PhantomSpec

        spec = dict(self.spec)
        spec["extent"] = tuple(spec["extent"])
        return Phantom(PhantomSpec(**spec))

    def columns(self) -> list[str]:
        ph = self._phantom()
        return ["section", "x", "y", "cell_type", "cell_id", *ph.gene_names]

    def chunks(self, rows: int, needed: list[str]) -> Iterator[RawChunk]:
        row0 = 0
        for frame, _ in self._phantom().section_chunks(self.section):
            yield RawChunk(frame=frame, row0=row0)
            row0 += len(frame)

    def fingerprint(self):
        return [self.spec, self.section]

"""Ingest and stage ``pca`` on wide stores (a 5k-gene panel, a whole transcriptome): time and peak RSS of each.

    python benchmarks/wide_pca.py --write                       # 32,768 cells x 5,000 and 18,000 genes
    python benchmarks/wide_pca.py --against OLD --against-label "before (abc1234)"

The input is an ``.h5ad`` of CSR expression (5% of the entries non-zero, log1p of Poisson counts, 8 sections);
it is ingested with the default chunks (``/X`` in ``[cell chunk, 512 genes]``; a cell chunk is 16,384 rows at
these widths), then ``lamina.pca(atlas, n_pcs=50)`` runs on the store. Each step is a fresh process (threads, no
client: what a laptop user gets), measured alone (peak RSS of its process, sampled every 50 ms). ``--against
DIR`` runs both steps again with ``PYTHONPATH=DIR`` (a folder holding another checkout's package as ``lamina``)
into a store of its own, for a before / after table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import child_result, run_measured  # noqa: E402
from ingest import write_results  # noqa: E402

SECTIONS = 8
DENSITY = 0.05


def make_h5ad(path: Path, cells: int, genes: int, seed: int = 0) -> None:
    """CSR expression written block by block into one AnnData (its sparse matrix is ~12 bytes per non-zero)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for a in range(0, cells, 4096):
        n = min(cells, a + 4096) - a
        nnz = int(n * genes * DENSITY)
        rows, cols = rng.integers(0, n, nnz), rng.integers(0, genes, nnz)
        vals = np.log1p(rng.poisson(2.0, nnz) + 1).astype(np.float32)
        m = sp.csr_matrix((vals, (rows, cols)), shape=(n, genes))
        m.sum_duplicates()
        blocks.append(m)
    side = np.sqrt(cells / SECTIONS) * 10.0
    obs = pd.DataFrame(
        {
            "section": np.repeat([f"S{i:02d}" for i in range(SECTIONS)], -(-cells // SECTIONS))[:cells],
            "x": rng.uniform(0, side, cells),
            "y": rng.uniform(0, side, cells),
        },
        index=[f"c{i}" for i in range(cells)],
    )
    a = ad.AnnData(sp.vstack(blocks).tocsr(), obs=obs)
    a.var_names = [f"g{j:05d}" for j in range(genes)]
    a.write_h5ad(path)


def child(kind: str, store: str, source: str, n_pcs: int) -> None:
    import lamina

    t = time.perf_counter()
    if kind == "ingest":
        lamina.ingest(source, store, section="section", x="x", y="y", genes="rest", overwrite=True)
    else:
        lamina.pca(lamina.Atlas.open(store, mode="r+"), n_pcs=n_pcs, force=True)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t}), flush=True)


def run(work: Path, cells: int, genes: int, n_pcs: int, against: str | None) -> list[dict]:
    h5 = work / f"wide-{cells}x{genes}.h5ad"
    if not h5.exists():
        make_h5ad(h5, cells, genes)
    rows = []
    for code, path in [("this checkout", None)] + ([("against", against)] if against else []):
        env = dict(os.environ)
        if path:
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
        store = work / f"wide-{cells}x{genes}-{'against' if path else 'this'}.lamina.zarr"
        row = {"code": code, "cells": cells, "genes": genes}
        for kind in ("ingest", "pca"):
            cmd = [sys.executable, __file__, "--child", kind, str(store), str(h5), "--n-pcs", str(n_pcs)]
            m = run_measured(cmd, env=env)
            row[f"{kind}_s"], row[f"{kind}_gib"] = child_result(m)["seconds"], m["peak_rss"] / 2**30
        import lamina

        row["chunks"] = lamina.Atlas.open(store).root["X"].chunks
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=32_768)
    ap.add_argument("--genes", type=int, nargs="+", default=[5_000, 18_000])
    ap.add_argument("--n-pcs", type=int, default=50)
    ap.add_argument("--work", default="/tmp/lamina-wide-pca")
    ap.add_argument("--against", help="PYTHONPATH folder of another checkout's package (as lamina), for a baseline")
    ap.add_argument("--against-label", default="against")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.n_pcs)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for g in args.genes for r in run(work, args.cells, g, args.n_pcs, args.against)]
    for r in rows:
        if r["code"] == "against":
            r["code"] = args.against_label
    lines = [
        "## Ingest and PCA of wide stores (benchmarks/wide_pca.py)",
        "",
        f"{dt.date.today()} · {platform.machine()}, {os.cpu_count()} cores, no GPU · Python "
        f"{platform.python_version()} · command: `python benchmarks/wide_pca.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Two fresh processes per store and code, each measured alone (peak RSS of the process, imports "
        f"included; threads, no client: what a laptop user gets): `lamina.ingest` of a CSR .h5ad ({DENSITY:.0%} "
        f"non-zero) with default chunks, then `lamina.pca(atlas, n_pcs={args.n_pcs})` (8 Krylov blocks, scaled "
        "genes).",
        "",
        "| code | cells | genes | /X chunks | /X as float32 (GiB) | ingest (s) | ingest peak RSS (GiB) | pca (s) | "
        "pca peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['code']} | {r['cells']:,} | {r['genes']:,} | {r['chunks'][0]:,} x {r['chunks'][1]:,} | "
            f"{r['cells'] * r['genes'] * 4 / 2**30:.2f} | {r['ingest_s']:.1f} | {r['ingest_gib']:.2f} | "
            f"{r['pca_s']:.1f} | {r['pca_gib']:.2f} |"
            for r in rows
        ],
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_results(text, "pca-wide")


if __name__ == "__main__":
    main()

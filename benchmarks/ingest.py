"""Ingest benchmark: phantom atlases of 1M, 3M and 10M cells x 300 genes, time and peak RSS.

Each size is first written as Parquet (one file per section, not timed), then ingested by `lamina build`
in a fresh process on the default local cluster; peak RSS is the sum over that process and its Dask workers,
sampled every 50 ms. Out of core means the peak stays roughly flat as cells grow.

    python benchmarks/ingest.py                       # 1M, 3M, 10M (needs ~40 GB free disk for 10M)
    python benchmarks/ingest.py --sizes 1e6 --write   # also update benchmarks/RESULTS.md
    python benchmarks/ingest.py --smoke               # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402

HERE = Path(__file__).resolve().parent


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_one(n_cells: int, n_genes: int, n_sections: int, work: Path, keep: bool) -> dict:
    import lamina

    src = work / f"phantom_{n_cells}"
    store = work / f"atlas_{n_cells}.lamina.zarr"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=n_sections, n_genes=n_genes, seed=0)
    ph.write_parquet(src)
    cfg = {
        "store": str(store),
        "input": {
            "path": str(src),
            "columns": {"cell_type": "cell_type", "cell_id": "cell_id"},
            "genes": "rest",
            "sections": {"spacing": 35.0},
        },
        "run": [],
        "report": {"enabled": False},
    }
    cfg_path = work / f"ingest_{n_cells}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = run_measured([sys.executable, "-m", "lamina.cli", "build", str(cfg_path)])
    atlas = lamina.Atlas.open(store)
    assert atlas.n_cells == n_cells and atlas.n_genes == n_genes, atlas
    rec = atlas.stage_records()["ingest"]
    row = {
        "cells": n_cells,
        "genes": n_genes,
        "sections": n_sections,
        "input_gb": dir_bytes(src) / 1e9,
        "store_gb": dir_bytes(store) / 1e9,
        "seconds": res["seconds"],
        "ingest_s": rec["seconds"],
        "pass1_s": rec["seconds_pass1"],
        "peak_rss_gib": res["peak_rss"] / 2**30,
    }
    if not keep:
        shutil.rmtree(src)
        shutil.rmtree(store)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| cells | genes | sections | input (GB parquet) | store (GB) | wall (s, incl. cluster start) | ingest (s) "
        "| pass 1 (s) | Mcells/min | peak RSS (GiB, all processes) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['cells']:,} | {r['genes']} | {r['sections']} | {r['input_gb']:.2f} | {r['store_gb']:.2f} | "
        f"{r['seconds']:.1f} | {r['ingest_s']:.1f} | {r['pass1_s']:.1f} | "
        f"{r['cells'] / 1e6 / (r['ingest_s'] / 60):.2f} | {r['peak_rss_gib']:.2f} |\n"
        for r in rows
    )
    return head + body


def write_results(text: str, section: str = "ingest") -> None:
    path = HERE / "RESULTS.md"
    old = (
        path.read_text()
        if path.exists()
        else "# lamina benchmark results\n\nNumbers as measured; newest run of each benchmark replaces its section.\n"
    )
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{text}\n{end}"
    if start in old:
        pre, rest = old.split(start, 1)
        old = pre + block + rest.split(end, 1)[1]
    else:
        old = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 3e6, 1e7])
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--sections", type=int, default=32)
    p.add_argument("--work", default=str(HERE / "out"), help="scratch folder for inputs and stores")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs and stores")
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="tiny size that runs in seconds (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.genes, args.sections = [20_000], 20, 4
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        rows.append(bench_one(int(n), args.genes, args.sections, work, args.keep))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    import lamina

    text = (
        f"## Ingest (benchmarks/ingest.py)\n\n{dt.date.today()} · {platform.node() or 'machine'}: "
        f"{os.cpu_count()} cores, {__import__('psutil').virtual_memory().total / 2**30:.0f} GiB RAM, no GPU · "
        f"lamina {lamina.__version__}, Python {platform.python_version()} · command: "
        f"`python benchmarks/ingest.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n" + table(rows)
    )
    print(text)
    if args.write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

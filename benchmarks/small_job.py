"""Small jobs: one ~5k-cell pair aligned from a cold Python process, by lamina and by STalign, in one run.

    python benchmarks/small_job.py            # print the table
    python benchmarks/small_job.py --write    # also update benchmarks/RESULTS.md

Each row is its own process (``python benchmarks/small_job.py --child ...``), timed from its start to its
exit, so interpreter start and imports count (``cold``); ``warm`` is the same job again inside the process
that just ran it (imports and caches in place). The pair is two phantom sections (``n_cells`` over two
sections, cell types given to both tools as channels). lamina: ``lamina.ingest(DataFrame)`` +
``lamina.align(reference=A)`` with defaults, either without a client (threads in the process, the default
below 1M cells) or under ``with lamina.connect():`` (a local cluster of worker processes). STalign: the
settings of benchmarks/registration.py (``_peers.run_stalign``, 1000 iterations, float64, 1 torch thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _pair_table(n_cells: int, seed: int):
    import lamina

    ph = lamina.datasets.phantom(n_cells=n_cells, n_sections=2, n_genes=8, seed=seed)
    import pandas as pd

    return pd.concat([f for s in range(2) for f, _ in ph.section_chunks(s)], ignore_index=True)


def child_lamina(args) -> dict:
    t0 = time.perf_counter()
    import lamina

    t_import = time.perf_counter() - t0
    table = _pair_table(args.cells, args.seed)
    work = Path(tempfile.mkdtemp(prefix="lamina-small-"))

    def job(name: str, client=None) -> float:
        t = time.perf_counter()
        atlas = lamina.ingest(
            table[["section", "x", "y", "cell_type"]],
            work / f"{name}.lamina.zarr",
            cell_type="cell_type",
            client=client,
        )
        lamina.align(atlas, client=client, reference="S000")
        return time.perf_counter() - t

    out = {"import_s": t_import, "cells": len(table)}
    if args.mode == "processes":
        t = time.perf_counter()
        with lamina.connect() as client:
            out["connect_s"] = time.perf_counter() - t
            out["job_s"] = job("cold", client)
            out["warm_s"] = job("warm", client)
        out["close_s"] = time.perf_counter() - t - out["connect_s"] - out["job_s"] - out["warm_s"]
    else:
        out["job_s"] = job("cold")
        out["warm_s"] = job("warm")
    return out


def child_stalign(args) -> dict:
    t0 = time.perf_counter()
    import _peers
    from STalign import STalign  # noqa: F401  (its import is part of a cold start)

    t_import = time.perf_counter() - t0
    table = _pair_table(args.cells, args.seed)
    a, b = (table[table.section == s] for s in ("S000", "S001"))
    pair = _peers.Pair(
        dataset="phantom",
        name="S000-S001",
        xy_a=a[["x", "y"]].to_numpy(float),
        xy_b=b[["x", "y"]].to_numpy(float),
        features="cell types",
        given_labels_a=a.cell_type.to_numpy(str),
        given_labels_b=b.cell_type.to_numpy(str),
    )
    t = time.perf_counter()
    _peers.run_stalign(pair)
    job = time.perf_counter() - t
    t = time.perf_counter()
    _peers.run_stalign(pair)
    return {"import_s": t_import, "job_s": job, "warm_s": time.perf_counter() - t, "cells": len(table)}


def table_text(rows: list[dict], cells: int) -> str:
    st = next((r for r in rows if r["tool"] == "STalign"), None)
    head = (
        f"One pair of {cells:,} cells (2 phantom sections, cell types as channels), each tool in a fresh process on "
        f"this machine (2 cores). `cold`: process start to exit, imports included (the process then repeats the "
        f"job for `warm`; that repeat is not in `cold`); `job`: the first ingest + align (lamina) or fit (STalign) "
        f"alone, first-use imports (torch, kornia) included. Target: cold lamina <= 2 s.\n\n"
        "| tool | how | cold wall (s) | of which imports (s) | job (s) | warm job (s) | peak RSS (GiB) "
        "| cold vs STalign |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        ratio = f"{st['cold'] / r['cold']:.2f}x" if st else "n/a"
        body += (
            f"| {r['tool']} | {r['how']} | {r['cold']:.2f} | {r['import_s']:.2f} | {r['job_s']:.2f} | "
            f"{r['warm_s']:.2f} | {r['peak'] / 2**30:.2f} | {ratio} |\n"
        )
    return head + body


def main(argv=None) -> int:
    from _measure import child_result, run_measured

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=10_000, help="cells of the pair (both sections)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--no-peers", action="store_true", help="lamina only")
    p.add_argument("--write", action="store_true")
    p.add_argument("--child", choices=["lamina", "stalign"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["threads", "processes"], default="threads", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child_lamina(args) if args.child == "lamina" else child_stalign(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    runs = [("lamina", "threads (default: no client)", ["--child", "lamina", "--mode", "threads"])]
    runs.append(("lamina", "with lamina.connect() (local cluster)", ["--child", "lamina", "--mode", "processes"]))
    if not args.no_peers:
        import _peers

        why = _peers.stalign_available()
        if why:
            print(f"STalign left out: {why}")
        else:
            runs.append(("STalign", "run_stalign, 1000 iterations", ["--child", "stalign"]))
    rows = []
    for tool, how, extra in runs:
        cmd = [sys.executable, __file__, "--cells", str(args.cells), "--seed", str(args.seed), *extra]
        m = run_measured(cmd)
        info = child_result(m)
        # cold: the process's wall time less the repeat of the job it ran afterwards to measure "warm"
        cold = m["seconds"] - info["warm_s"]
        rows.append({"tool": tool, "how": how, "wall": m["seconds"], "cold": cold, "peak": m["peak_rss"], **info})
        if "still alive" in m["stderr"]:
            rows[-1]["how"] += " (workers killed at close)"
        print(rows[-1], flush=True)
    text = table_text(rows, args.cells)
    print(text)
    if args.write:
        from ingest import write_results

        write_results(text, "small-job")
    return 0


if __name__ == "__main__":
    sys.exit(main())

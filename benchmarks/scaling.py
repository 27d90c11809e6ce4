"""Scaling: the same pipeline on phantom atlases of growing size; time per stage, peak RSS, cost per million cells.

    python benchmarks/scaling.py                      # 1M, 3M, 10M cells, 32 sections
    python benchmarks/scaling.py --write              # also update benchmarks/RESULTS.md
    python benchmarks/scaling.py --smoke              # tiny (seconds; used by the tests)

Each size runs in its own child process on the in-process Dask cluster (``lamina.connect()``): the phantom
(default perturbations) is generated on the workers and ingested, then ``section_stats -> rasterize ->
register -> refine -> warp`` and ``pca``. Peak RSS is summed over the child and its Dask workers, sampled
every 50 ms. The flow stages (train_flow, interpolate, voxelize, invert) are timed at 3M cells by
``benchmarks/reconstruction.py``; ``--reconstruct`` adds them here too (hours at 10M on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import child_result, run_measured  # noqa: E402
from ingest import write_results  # noqa: E402

STAGES = ["ingest", "section_stats", "rasterize", "register", "refine", "warp", "pca"]


def child(args) -> None:
    import lamina

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    client = lamina.connect()
    try:
        times = {}
        t = time.perf_counter()
        ph = lamina.datasets.phantom(n_cells=args.cells, n_sections=args.sections, n_genes=args.genes, seed=0)
        atlas = lamina.ingest(ph, work / "scale.lamina.zarr", overwrite=True, client=client)
        times["ingest"] = time.perf_counter() - t
        times.update(lamina.align(atlas, client))
        if args.reconstruct:
            times.update(lamina.reconstruct(atlas, client=client, n_pcs=args.pcs))
        else:
            t = time.perf_counter()
            lamina.pca(atlas, n_pcs=args.pcs, client=client)
            times["pca"] = time.perf_counter() - t
        print("RESULT " + json.dumps({"times": times, "cells": atlas.n_cells}), flush=True)
    finally:
        client.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 3e6, 1e7])
    p.add_argument("--sections", type=int, default=32)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--pcs", type=int, default=20)
    p.add_argument("--reconstruct", action="store_true", help="also train_flow, interpolate, voxelize, invert")
    p.add_argument("--work", default=str(HERE / "out" / "scaling"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.smoke:
        args.sizes, args.sections, args.genes, args.pcs = [12_000], 3, 10, 4
    rows = []
    try:
        for n in args.sizes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--cells",
                str(int(n)),
                "--sections",
                str(args.sections),
                "--genes",
                str(args.genes),
                "--pcs",
                str(args.pcs),
                "--work",
                str(Path(args.work) / f"{int(n)}"),
            ]
            if args.reconstruct:
                cmd.append("--reconstruct")
            m = run_measured(cmd)
            info = child_result(m)
            rows.append({"cells": info["cells"], "wall": m["seconds"], "peak": m["peak_rss"], **info["times"]})
            shutil.rmtree(Path(args.work) / f"{int(n)}", ignore_errors=True)
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    stages = [s for s in [*STAGES, "train_flow", "interpolate", "voxelize", "invert"] if s in rows[0]]
    head = (
        "| cells | "
        + " | ".join(f"{s} (s)" for s in stages)
        + " | wall (s) | s per M cells | peak RSS (GiB) |\n|---|"
        + "---|" * (len(stages) + 3)
    )
    body = "\n".join(
        f"| {r['cells']:,} | "
        + " | ".join(f"{r[s]:.1f}" for s in stages)
        + f" | {r['wall']:.1f} | {r['wall'] / (r['cells'] / 1e6):.1f} | {r['peak'] / 2**30:.2f} |"
        for r in rows
    )
    notes = []
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = (b["wall"] - a["wall"]) / (b["cells"] - a["cells"]) * 1e6
        notes.append(
            f"Marginal cost from {a['cells']:,} to {b['cells']:,} cells: {growth:.1f} s per million cells "
            f"(the rest is fixed cost: cluster start and the raster-based register/refine, which do not "
            f"grow with cells). Peak RSS changes by {(b['peak'] - a['peak']) / 2**30:+.2f} GiB over "
            f"{b['cells'] / a['cells']:.0f}x the cells."
        )
    big = [r for r in rows if r["cells"] >= 10_000_000]
    if big:
        worst = max(r["peak"] for r in big) / 2**30
        notes.append(
            f"Target: peak RSS <= 6 GiB at 10M cells: {worst:.2f} GiB, **{'met' if worst <= 6 else 'not met'}**."
        )
    text = (
        f"## Scaling (benchmarks/scaling.py)\n\n{dt.date.today()} · {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, no GPU · Python {platform.python_version()} · command: "
        f"`python benchmarks/scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Phantom with default perturbations, {args.sections} sections, {args.genes} genes, {args.pcs} PCs; "
        f"one child process per size on the in-process cluster (2 workers).\n\n{head}\n{body}\n\n"
        + "\n".join(notes)
        + "\n"
    )
    print(text)
    if args.write and not args.smoke:
        write_results(text, "scaling")
    return 0


if __name__ == "__main__":
    sys.exit(main())

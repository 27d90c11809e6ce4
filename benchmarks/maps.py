"""The engine's two maps at scale: cell neighbourhoods (``map_neighbourhoods``) and image tiles (``map_tiles``).

    python benchmarks/maps.py                  # 1M and 3M cells, a 16k x 16k x 3 image
    python benchmarks/maps.py --write          # also update benchmarks/RESULTS.md
    python benchmarks/maps.py --smoke          # tiny (seconds; used by the tests)

Neighbourhoods: a phantom (32 sections, 20 genes, positions taken as aligned, 8 PCs) gets the ring means of its
PCs at 30 and 60 um around every cell, with the cells of the adjacent sections in z (``z_sections=1``): the
work a niche embedding starts from. Tiles: a Gaussian blur (sigma 8 px, halo 32 px) of a random RGB image in a
Zarr array, written tile by tile. Each size runs in its own child process on the in-process Dask cluster;
wall time and the peak RSS of the child and its workers are measured from outside. Out of core means the
peak stays flat as the atlas or the image grows.
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

RADII = (30.0, 60.0)


def _rings(nb, radii):
    from lamina.kernels.neighbours import ring_means

    return ring_means(nb.columns["pca/pcs"], nb.indptr, nb.indices, nb.distances, radii)


def child_cells(args) -> dict:
    import numpy as np

    import lamina
    from lamina.kernels.neighbours import required_radius
    from lamina.stages.warp import mark_aligned
    from lamina.store import arrays

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    with lamina.connect() as client:
        t = time.perf_counter()
        ph = lamina.datasets.phantom(n_cells=args.cells, n_sections=args.sections, n_genes=20, seed=0)
        atlas = lamina.ingest(ph, work / "maps.lamina.zarr", overwrite=True, client=client)
        mark_aligned(atlas, client=client)
        lamina.pca(atlas, n_pcs=8, client=client)
        times["ingest + pca"] = time.perf_counter() - t
        arrays.create(atlas.root, "rings", (atlas.n_cells, 16), np.float32, (atlas.cell_chunk, 16), ("cell", "f"))
        t = time.perf_counter()
        n = lamina.map_neighbourhoods(
            _rings,
            atlas,
            "rings",
            radius=required_radius(RADII),
            columns=["pca/pcs"],
            z_sections=1,
            kwargs={"radii": RADII},
            client=client,
        )
        times["map_neighbourhoods"] = time.perf_counter() - t
        sample = np.asarray(atlas.root["rings"][: min(n, 100_000)])
        return {
            "times": times,
            "cells": n,
            "finite_ring0": float(np.isfinite(sample[:, :8]).mean()),
            "pairs_per_cell": _pairs_per_cell(atlas, required_radius(RADII)),
        }


def _pairs_per_cell(atlas, radius: float, n: int = 2_000) -> float:
    """Mean neighbours within ``radius`` (with the adjacent sections) of ``n`` cells of the middle section: the
    work per cell grows with the density of the tissue, which is what a denser phantom changes."""
    import numpy as np

    from lamina.maps import neighbours

    sec = atlas.sections
    mid = len(sec) // 2
    lo, hi = int(sec.cell_start.iloc[mid - 1]), int(sec.cell_stop.iloc[mid + 1])
    xyz = np.stack([np.asarray(atlas.root[f"aligned/{c}"][lo:hi], np.float64) for c in "xyz"], 1)
    a, b = int(sec.cell_start.iloc[mid]) - lo, int(sec.cell_stop.iloc[mid]) - lo
    core = np.random.default_rng(0).choice(np.arange(a, b), min(n, b - a), replace=False)
    indptr, _, _ = neighbours(xyz, core, radius=radius)
    return float(np.diff(indptr).mean())


def child_image(args) -> dict:
    import dask.array as da
    import numpy as np
    import zarr

    import lamina
    from lamina.kernels.raster import smooth, smooth_halo
    from lamina.store import arrays

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "image.zarr")
    root = zarr.open_group(store, mode="w")
    side, chunk, sigma = args.pixels, 2048, 8.0
    times = {}
    with lamina.connect() as client:
        t = time.perf_counter()
        src = arrays.create(root, "src", (3, side, side), np.float32, (3, chunk, chunk), ("c", "y", "x"))
        image = da.random.default_rng(0).random((3, side, side), chunks=(3, chunk, chunk), dtype=np.float32)
        client.compute(da.store(image, src, lock=False, compute=False)).result()
        times["write image"] = time.perf_counter() - t
        arrays.create(root, "blurred", (3, side, side), np.float32, (3, chunk, chunk), ("c", "y", "x"))
        t = time.perf_counter()
        tiles = lamina.map_tiles(
            smooth, store, "src", "blurred", halo=smooth_halo(sigma), kwargs={"sigma_px": sigma}, client=client
        )
        times["map_tiles"] = time.perf_counter() - t
    return {"times": times, "pixels": side * side, "tiles": tiles}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 3e6], help="cells")
    p.add_argument("--sections", type=int, default=32)
    p.add_argument("--images", nargs="+", type=int, default=[8192, 16384], help="image side (px)")
    p.add_argument("--work", default=str(HERE / "out" / "maps"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", choices=["cells", "image"], help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pixels", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child_cells(args) if args.child == "cells" else child_image(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if args.smoke:
        args.sizes, args.sections, args.images = [20_000], 4, [1024]
    rows = []
    try:
        for n in args.sizes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "cells",
                "--cells",
                str(int(n)),
                "--sections",
                str(args.sections),
                "--work",
                str(Path(args.work) / f"c{int(n)}"),
            ]
            m = run_measured(cmd)
            info = child_result(m)
            pairs = info["pairs_per_cell"] * info["cells"]
            rows.append(
                {
                    "what": f"{info['cells']:,} cells, {args.sections} sections ({info['pairs_per_cell']:.0f} "
                    f"neighbours per cell)",
                    "wall": m["seconds"],
                    "peak": m["peak_rss"],
                    "step": info["times"]["map_neighbourhoods"],
                    "per": info["times"]["map_neighbourhoods"] / pairs * 1e8,
                    "unit": "s per 100 M neighbour pairs",
                    "check": f"ring 0 finite in {info['finite_ring0']:.0%} of cells",
                }
            )
            print(rows[-1], flush=True)
            shutil.rmtree(Path(args.work) / f"c{int(n)}", ignore_errors=True)
        for side in args.images:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "image",
                "--pixels",
                str(side),
                "--work",
                str(Path(args.work) / f"i{side}"),
            ]
            m = run_measured(cmd)
            info = child_result(m)
            rows.append(
                {
                    "what": f"{side:,} x {side:,} x 3 image",
                    "wall": m["seconds"],
                    "peak": m["peak_rss"],
                    "step": info["times"]["map_tiles"],
                    "per": info["times"]["map_tiles"] / info["pixels"] * 1e8,
                    "unit": "s per 100 M px",
                    "check": f"{info['tiles']} tiles of 2,048 px",
                }
            )
            print(rows[-1], flush=True)
            shutil.rmtree(Path(args.work) / f"i{side}", ignore_errors=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    body = "\n".join(
        f"| {r['what']} | {r['step']:.1f} | {r['per']:.1f} {r['unit']} | {r['wall']:.1f} | "
        f"{r['peak'] / 2**30:.2f} | {r['check']} |"
        for r in rows
    )
    text = (
        f"## Maps at scale (benchmarks/maps.py)\n\n{dt.date.today()} · {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, no GPU · Python {platform.python_version()} · command: "
        f"`python benchmarks/maps.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Neighbourhoods: ring means of 8 PCs at {', '.join(f'{r:g}' for r in RADII)} um with the adjacent "
        f"sections (`z_sections=1`); tiles: a Gaussian blur, sigma 8 px (halo 32 px). One child process per row on "
        f"the in-process cluster (2 workers); peak RSS of the child and its workers.\n\n"
        "| data | map (s) | cost | wall, whole child (s) | peak RSS (GiB) | check |\n|---|---|---|---|---|---|\n"
        f"{body}\n"
    )
    print(text)
    if args.write and not args.smoke:
        write_results(text, section="maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

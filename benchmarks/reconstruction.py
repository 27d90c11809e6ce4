"""Reconstruction at scale: pca -> train_flow -> interpolate -> voxelize -> invert on a large phantom.

    python benchmarks/reconstruction.py            # 3M cells, 32 sections, 500 genes, 50 PCs, dz = voxel = 10 um
    python benchmarks/reconstruction.py --write    # also update benchmarks/RESULTS.md
    python benchmarks/reconstruction.py --smoke    # tiny (seconds; used by the tests)

The phantom is generated without section perturbations (observed = true coordinates), and registration is
replaced by ``mark_aligned``, so the table times the reconstruction alone (registration at this size is
timed in the registration table). The whole run is one child process; its peak RSS is summed over the
process tree (Dask workers included). The inversion is compared with this machine's floor measured in the
same run on the same chunk grid: Dask tasks that only do the block matmul (no reads, no writes) and tasks
that only write precomputed blocks of the same shape and codec (no reads, no matmul).
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import child_result, run_measured  # noqa: E402
from ingest import write_results  # noqa: E402


def _matmul_only(P: int, G: int, block: tuple, gene_chunk: int, seed: int) -> int:
    from lamina.kernels.pca import invert_volume

    rng = np.random.default_rng(seed)
    pcs = rng.normal(size=(P,) + block).astype(np.float32)
    comp, mean, scale = rng.normal(size=(P, G)).astype(np.float32), np.zeros(G, np.float32), np.ones(G, np.float32)
    for g0 in range(0, G, gene_chunk):
        gs = slice(g0, min(G, g0 + gene_chunk))
        invert_volume(pcs, mean[gs], scale[gs], comp[:, gs])
    return 1


def _write_only(store: str, name: str, zc: int, yc: int, cz: int, ty: int, gene_chunk: int, seed: int) -> int:
    from lamina.store.arrays import open_root

    arr = open_root(store, "r+")[name]  # never the consolidated snapshot: it predates this array
    G, Z, Y, X = arr.shape
    zs, ys = slice(zc * cz, min(Z, (zc + 1) * cz)), slice(yc * ty, min(Y, (yc + 1) * ty))
    rng = np.random.default_rng(seed)
    # values like an expression volume (smooth-ish floats, not constants that compress to nothing)
    block = (rng.normal(size=(min(gene_chunk, G), zs.stop - zs.start, ys.stop - ys.start, X)) * 0.5 + 1).astype(
        np.float32
    )
    for g0 in range(0, G, gene_chunk):
        gs = slice(g0, min(G, g0 + gene_chunk))
        arr[gs, zs, ys, :] = block[: gs.stop - gs.start]
    return 1


def child(args) -> None:
    import dask

    import lamina
    from lamina.cluster import compute
    from lamina.stages.warp import mark_aligned
    from lamina.store import arrays

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    client = lamina.connect()
    times = {}
    try:
        t = time.perf_counter()
        ph = lamina.datasets.phantom(
            n_cells=args.cells,
            n_sections=args.sections,
            n_genes=args.genes,
            seed=1,
            extent=(2690.0, 2170.0),
            max_rotation_deg=0.0,
            max_translation_um=0.0,
            scale_range=0.0,
            warp_um=0.0,
            tube_travel_um=300.0,
        )
        atlas = lamina.ingest(ph, work / "recon.lamina.zarr", overwrite=True, client=client)
        times["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        mark_aligned(atlas, client=client)
        times["mark_aligned"] = time.perf_counter() - t
        flow = {"steps": args.steps} if args.steps else {}
        times.update(lamina.reconstruct(atlas, client=client, n_pcs=args.pcs, dz_um=args.dz, **flow))
        vol = atlas.root["volume"]
        P, Z, Y, X = vol["pcs"].shape
        cz, ty = (int(c) for c in vol.attrs["chunks"])
        gene_chunk = int(atlas.root["expression/values"].chunks[0])
        grid = [(zc, yc) for zc in range(-(-Z // cz)) for yc in range(-(-Y // ty))]
        t = time.perf_counter()
        compute(
            *[
                dask.delayed(_matmul_only, pure=False)(
                    P, args.genes, (min(cz, Z - zc * cz), min(ty, Y - yc * ty), X), gene_chunk, i
                )
                for i, (zc, yc) in enumerate(grid)
            ],
            client=client,
        )
        times["floor_matmul"] = time.perf_counter() - t
        scratch = atlas.root.require_group("_floor")
        arrays.create(
            scratch, "values", (args.genes, Z, Y, X), np.float32, (gene_chunk, cz, ty, X), ("gene", "z", "y", "x")
        )
        t = time.perf_counter()
        compute(
            *[
                dask.delayed(_write_only, pure=False)(atlas.path, "_floor/values", zc, yc, cz, ty, gene_chunk, i)
                for i, (zc, yc) in enumerate(grid)
            ],
            client=client,
        )
        times["floor_write"] = time.perf_counter() - t
        rec = atlas.stage_records()
        info = {
            "times": times,
            "grid": [Z, Y, X],
            "pcs": P,
            "genes": args.genes,
            "cells": atlas.n_cells,
            "interpolated": int(atlas.root["interpolated/x"].shape[0]),
            "expression_gb": args.genes * Z * Y * X * 4 / 1e9,
            "training": {
                k: v
                for k, v in rec["train_flow"].items()
                if k.startswith(("first_", "final_", "heldout", "steps_run", "best_step", "trained", "stopped"))
            },
        }
        print("RESULT " + json.dumps(info), flush=True)
    finally:
        client.close()


def _training_line(tr: dict) -> str:
    """What train_flow did: steps run, its fit excess, and the held-out check's verdict."""
    line = (
        f"train_flow ran {tr['steps_run']} steps; the fit's excess over its noise floor (mean over the first -> the "
        f"last tenth of the steps) {tr['first_excess']:.4f} -> {tr['final_excess']:.4f}."
    )
    if "heldout_section" in tr:
        kept = f"the trained flow (step {tr['best_step']})" if tr["trained"] else "the untrained flow"
        line += (
            f" Held-out section {tr['heldout_section']}: map error over the noise floor untrained "
            f"{tr['heldout_untrained']:.4f}, best trained {tr['heldout_trained']:.4f}; kept {kept}"
            f"{', stopped early' if tr.get('stopped_early') else ''}."
        )
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=3_000_000)
    p.add_argument("--sections", type=int, default=32)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--pcs", type=int, default=50)
    p.add_argument("--dz", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=0, help="flow training steps (0: the default)")
    p.add_argument("--work", default=str(HERE / "out" / "reconstruction"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--write", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.sections, args.genes, args.pcs, args.steps = 20_000, 4, 20, 8, 4
    if args.child:
        child(args)
        return 0
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--cells",
        str(args.cells),
        "--sections",
        str(args.sections),
        "--genes",
        str(args.genes),
        "--pcs",
        str(args.pcs),
        "--dz",
        str(args.dz),
        "--steps",
        str(args.steps),
        "--work",
        args.work,
    ]
    try:
        m = run_measured(cmd)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    info = child_result(m)
    t = info["times"]
    Z, Y, X = info["grid"]
    vox_genes = Z * Y * X * info["genes"]
    floor = t["floor_matmul"] + t["floor_write"]
    steps = ["ingest", "mark_aligned", "pca", "train_flow", "interpolate", "voxelize", "invert"]
    lines = [
        f"Reconstruction at scale, {dt.date.today()}, {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, {os.cpu_count()} CPUs; `python benchmarks/reconstruction.py"
        f"{' --smoke' if args.smoke else ''}`",
        "",
        f"{info['cells']:,} cells, {args.sections} sections, {info['genes']} genes, {info['pcs']} PCs; "
        f"{info['interpolated']:,} interpolated (weighted) cells at dz = {args.dz:g} um; voxel grid "
        f"{X}x{Y}x{Z} (x, y, z) at {args.dz:g} um; expression volume {info['expression_gb']:.2f} GB as float32. "
        + _training_line(info["training"]),
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {s} | {t[s]:.1f} |" for s in steps if s in t]
    lines += [
        f"| **total (wall, whole process)** | **{m['seconds']:.1f}** |",
        "",
        f"Peak RSS of the process tree: **{m['peak_rss'] / 2**30:.2f} GiB** (target <= 4 GiB).",
        "",
        f"Inversion: {vox_genes / t['invert'] / 1e6:.1f} M voxel-genes/s; this machine's floor on the same chunk "
        f"grid: matmul only {t['floor_matmul']:.1f} s + write only {t['floor_write']:.1f} s = {floor:.1f} s "
        f"({vox_genes / floor / 1e6:.1f} M voxel-genes/s); inversion / floor = **{t['invert'] / floor:.2f}x**.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_results(text, "reconstruction")
    return 0


if __name__ == "__main__":
    sys.exit(main())

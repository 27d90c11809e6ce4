"""The ``lamina`` command line: demo, build, info, export, phantom."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import ConfigError, LaminaError

log = logging.getLogger("lamina")


def _resources(args, cfg_cluster: dict | None = None):
    """Where this run computes (:class:`lamina.cluster.Resources`): ``--cluster`` / ``cluster.mode``."""
    from .cluster import Resources

    cfg_cluster = cfg_cluster or {}
    return Resources(
        mode=getattr(args, "cluster", None) or cfg_cluster.get("mode") or "auto",
        threads_below=cfg_cluster.get("threads_below") or 1_000_000,
        address=getattr(args, "scheduler", None) or cfg_cluster.get("scheduler"),
        gpu=cfg_cluster.get("gpu") or None,
        n_workers=getattr(args, "workers", None) or cfg_cluster.get("n_workers"),
        threads_per_worker=cfg_cluster.get("threads_per_worker"),
    )


def _input_bytes(paths) -> int | None:
    """Bytes of the input files (a folder: its files); None when some cannot be sized."""
    total = 0
    for p in [paths] if isinstance(paths, str) else paths:
        path = Path(p)
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
        else:
            return None
    return total


def cmd_demo(args) -> int:
    from .datasets import phantom
    from .ingest import ingest
    from .report import write_report
    from .stages import align, reconstruct

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ph = phantom(n_cells=args.cells, n_sections=args.sections, n_genes=args.genes, seed=args.seed)
    print(ph.describe())
    resources = _resources(args)
    try:
        client = resources.client_for(n_cells=args.cells)
        print(
            f"dask: {client.dashboard_link or client.scheduler.address}" if client else "dask: threads in this process"
        )
        steps = []
        t = time.perf_counter()
        atlas = ingest(ph, out / "demo.lamina.zarr", overwrite=True, client=client)
        steps.append(("ingest", time.perf_counter() - t))
        t = time.perf_counter()
        truth = ph.write_truth(out / "demo.truth.zarr")
        steps.append(("ground truth", time.perf_counter() - t))
        steps += list(align(atlas, client=client).items())
        if args.reconstruct:
            steps += list(
                reconstruct(
                    atlas, client=client, n_pcs=min(20, args.genes), dz_um=args.dz, steps=args.flow_steps, subsample=512
                ).items()
            )
        t = time.perf_counter()
        pictures = write_report(atlas, out)
        steps.append(("pictures", time.perf_counter() - t))
    finally:
        resources.close()
    print(atlas.info())
    print("time per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in steps) + f"; total {time.perf_counter() - t0:.1f}s")
    print(f"ground truth: {truth}")
    median, p95 = _truth_error(atlas, truth)
    print(
        f"registration error against ground truth (one global rigid transform removed, {len(atlas.sections)} "
        f"sections): median {median:.1f} um, p95 {p95:.1f} um"
    )
    if args.reconstruct:
        vol = atlas.root["volume"]
        Z, Y, X = vol["density"].shape
        layer_dz = atlas.stage_records()["interpolate"]["params"]["layer_dz_um"]
        print(
            f"reconstruction: {atlas.root['interpolated/x'].shape[0]:,} interpolated cells (weighted layers "
            f"every ~{layer_dz:g} um), voxel grid {X}x{Y}x{Z} at {vol.attrs['voxel_um']:g} um, expression volume "
            f"of {atlas.n_genes} genes in /expression"
        )
    for p in pictures:
        print(f"picture: {p}")
    return 0


def _truth_error(atlas, truth_path, max_cells: int = 200_000) -> tuple[float, float]:
    """Median / p95 distance (um) between aligned and true positions of a strided sample of cells."""
    import numpy as np
    import zarr

    from .kernels.ransac import rigid_residuals

    truth = zarr.open_group(str(truth_path), mode="r")
    step = max(1, atlas.n_cells // max_cells)
    P = np.stack([atlas.root[f"aligned/{k}"][::step] for k in ("x", "y")], 1).astype(np.float64)
    Q = np.stack([truth[f"cells/{k}"][::step] for k in ("x", "y")], 1)
    err = rigid_residuals(P, Q)
    return float(np.median(err)), float(np.percentile(err, 95))


def cmd_build(args) -> int:
    import dataclasses

    from .config import ingest_spec, load_config
    from .ingest import block_store, block_values

    cfg = load_config(args.config)
    inp, spec = cfg["input"], ingest_spec(cfg)
    if not spec.block:
        _build_one(args, cfg, cfg["store"], spec, cfg["report"]["out"])
        return 0
    # one store per block (donor / patient): a stack is never aligned across blocks
    blocks = block_values(inp["path"], spec, inp["paste"] or None, inp["pattern"])
    log.info("build: %d block(s) of column %s: %s", len(blocks), spec.block, ", ".join(blocks))
    for b in blocks:
        report = cfg["report"]["out"]
        _build_one(
            args,
            cfg,
            str(block_store(cfg["store"], b)),
            dataclasses.replace(spec, only_blocks=[b]),
            str(block_store(report, b)) if report else None,
        )
    return 0


def _build_one(args, cfg: dict, store: str, spec, report_out: str | None) -> None:
    from .ingest import ingest
    from .report import write_report
    from .stages.pipeline import plan, run_plan
    from .store.lock import writer

    inp = cfg["input"]
    # one lock over ingest and every stage: a second build of the same store fails (or waits) at once
    with _resources(args, cfg["cluster"]) as resources, writer(store, wait=args.wait):
        atlas = ingest(
            inp["path"],
            store,
            spec,
            paste=inp["paste"] or None,
            pattern=inp["pattern"],
            platform=inp["platform"],
            images=inp["images"] if inp["platform"] or isinstance(inp["images"], dict) else None,
            overwrite=args.overwrite or cfg["overwrite"],
            client=resources.client_for(input_bytes=_input_bytes(inp["path"])),
        )
        steps = plan(atlas, cfg["run"], cfg["stages"], cfg["disabled"], where=str(args.config))
        log.info("build: %s", " -> ".join(s.stage.name for s in steps) or "nothing to run")
        run_plan(atlas, steps, resources.client_for(n_cells=atlas.n_cells))
    if cfg["report"]["enabled"]:
        folder = report_out or str(Path(store).with_suffix("")) + "-report"
        for p in write_report(atlas, folder):
            print(f"picture: {p}")
    print(atlas.info())


def cmd_info(args) -> int:
    from .store import Atlas

    print(Atlas.open(args.store).info())
    return 0


def cmd_stages(args) -> int:
    from .stages.docs import stages_markdown, stages_text

    print(stages_markdown() if args.markdown else stages_text())
    return 0


def cmd_upgrade(args) -> int:
    import zarr

    from .errors import StoreError
    from .store.format import upgrade

    if not (Path(args.store) / "zarr.json").exists():
        raise StoreError(f"no atlas store at {args.store} (no zarr.json)")
    done = upgrade(zarr.open_group(args.store, mode="r+", zarr_format=3, use_consolidated=False), args.store)
    print("\n".join(f"upgraded {d}" for d in done) if done else f"{args.store} is already in the current format")
    return 0


def cmd_export(args) -> int:
    from .export import export
    from .store import Atlas

    atlas = Atlas.open(args.store)
    sections = args.sections.split(",") if args.sections else None
    genes = args.genes.split(",") if args.genes else None
    if args.format is None and not args.images:
        raise ConfigError("lamina export: give --format csv|parquet|anndata|spatialdata (or --images)")
    if args.enhanced:
        from .export_enhance import export_enhanced

        if args.format not in ("parquet", "anndata"):
            raise ConfigError("--enhanced exports the enhanced maps as parquet or anndata")
        suffix = "-enhanced.parquet" if args.format == "parquet" else "-enhanced.h5ad"
        if args.cells:
            from .enhance_cells import export_enhanced_cells

            out = args.out or str(Path(args.store).with_suffix("")) + "-cells" + suffix
            opts = {"frame": args.cells_frame, "radius_um": args.cell_radius, "genes": genes}
            print(f"wrote {export_enhanced_cells(atlas, args.cells, out, args.format, sections, **opts)}")
            return 0
        out = args.out or str(Path(args.store).with_suffix("")) + suffix
        print(f"wrote {export_enhanced(atlas, out, args.format, genes, sections)}")
        return 0
    if args.cells:
        raise ConfigError("--cells goes with --enhanced: the enhanced expression of the given cells")
    if args.images:
        from .atlas_image import export_image

        if args.volume or args.enhanced:
            raise ConfigError("--images exports the sections' images alone (no --volume or --enhanced)")
        folder = Path(args.out or str(Path(args.store).with_suffix("")) + "-images")
        folder.mkdir(parents=True, exist_ok=True)
        wanted = sections or atlas.images()
        for sid in wanted:
            print(f"wrote {export_image(atlas, sid, folder / f'{sid}.tif', pixel_size_um=args.pixel_size)}")
        return 0
    if args.volume:
        from .stages import export_expression_parquet

        if args.format != "parquet" or sections:
            raise ConfigError(
                "--volume exports the expression volume as Parquet only (use --format parquet, no --sections)"
            )
        out = args.out or str(Path(args.store).with_suffix("")) + "-volume.parquet"
        print(f"wrote {export_expression_parquet(atlas, out, genes):,} voxels to {out}")
        return 0
    default = {"csv": ".csv.gz", "parquet": ".parquet", "anndata": ".h5ad", "spatialdata": ".spatialdata.zarr"}[
        args.format
    ]
    out = args.out or str(Path(args.store).with_suffix("")) + default
    print(f"wrote {export(atlas, args.format, out, sections, genes)}")
    return 0


def cmd_domains(args) -> int:
    from .domains import domains
    from .store import Atlas

    counts = domains(Atlas.open(args.store, mode="r+"), k=args.k, key=args.key, column=args.column, seed=args.seed)
    print(f"/cells/{args.column}: {len(counts)} domains of /embeddings/{args.key}")
    print("\n".join(f"  {name}: {int(c):,} cells" for name, c in counts.items()))
    return 0


def cmd_phantom(args) -> int:
    from .datasets import phantom

    ph = phantom(n_cells=args.cells, n_sections=args.sections, n_genes=args.genes, seed=args.seed)
    print(ph.describe())
    paths = ph.write_parquet(args.out)
    print(f"wrote {len(paths)} Parquet files to {args.out}")
    if args.truth:
        print(f"ground truth: {ph.write_truth(args.truth)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="lamina", description="3D single-cell atlases from serial sections, on Dask")
    p.add_argument("--version", action="version", version=f"lamina {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="also log each computation and training step")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    def scheduler(sp):
        sp.add_argument(
            "--scheduler", metavar="ADDRESS", help="Dask scheduler (tcp://host:port); default: local cluster"
        )
        sp.add_argument("--workers", type=int, help="worker processes of the local cluster (default: per core)")
        sp.add_argument(
            "--cluster",
            choices=["auto", "threads", "processes"],
            help="where to compute: threads in this process, a local cluster of processes, or auto (default: "
            "threads under 1M cells, a cluster above)",
        )

    d = sub.add_parser("demo", help="synthetic phantom -> atlas store -> every stage -> summary and pictures")
    d.add_argument("--out", default="lamina-demo", help="output folder (default: ./lamina-demo)")
    d.add_argument("--cells", type=int, default=200_000)
    d.add_argument("--sections", type=int, default=12)
    d.add_argument("--genes", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--dz",
        type=float,
        default=None,
        help="layer spacing and voxel size of the reconstruction (um); default: a quarter of the median section gap",
    )
    d.add_argument("--flow-steps", type=int, default=60, help="training steps of the z-flow")
    d.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the 3D reconstruction (--no-reconstruct: registration only)",
    )
    scheduler(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("build", help="build an atlas from a YAML config")
    b.add_argument("config")
    b.add_argument("--overwrite", action="store_true", help="replace a store built from other input")
    b.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="when another process is writing the store, wait this long for it (default: fail at once)",
    )
    scheduler(b)
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("info", help="summary of a store: sections, cells, genes, stages, sizes")
    i.add_argument("store")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="export cells (and expression) to csv, parquet, anndata or spatialdata")
    e.add_argument("store")
    e.add_argument("--format", choices=["csv", "parquet", "anndata", "spatialdata"])
    e.add_argument("--out", help="output file (default: beside the store)")
    e.add_argument("--sections", help="comma-separated section ids")
    e.add_argument("--genes", help="comma-separated gene names")
    e.add_argument(
        "--volume", action="store_true", help="export the voxel expression volume (x, y, z, genes) instead of cells"
    )
    e.add_argument(
        "--enhanced",
        action="store_true",
        help="export the enhanced maps (one row per superpixel of the measured tissue: x, y, z, metagenes, genes)",
    )
    e.add_argument(
        "--cells",
        metavar="TABLE",
        help="with --enhanced: one row per cell of this CSV / Parquet table (columns section, x, y; a cell_id or "
        "cell column names the cells), each measured spot's cells averaging to its measurement (lamina.enhance_cells)",
    )
    e.add_argument(
        "--cells-frame",
        choices=["section", "image"],
        default="section",
        help="with --cells: x, y in the section's um (default) or in pixels of its image",
    )
    e.add_argument(
        "--cell-radius",
        type=float,
        help="with --cells: the cells' radius (um); default the superpixel under each centre",
    )
    e.add_argument(
        "--images",
        action="store_true",
        help="export the sections' images in the atlas frame: one tiled BigTIFF per section in --out (a folder)",
    )
    e.add_argument("--pixel-size", type=float, help="with --images: output pixel (um); default the image's own")
    e.set_defaults(func=cmd_export)

    st = sub.add_parser("stages", help="the stages lamina knows, their options and defaults")
    st.add_argument("--markdown", action="store_true", help="as the README's Markdown tables")
    st.set_defaults(func=cmd_stages)

    u = sub.add_parser("upgrade", help="bring a store written by an older lamina format to the current one")
    u.add_argument("store")
    u.set_defaults(func=cmd_upgrade)

    dm = sub.add_parser("domains", help="spatial domains: k-means of an embedding, written to /cells/<column>")
    dm.add_argument("store")
    dm.add_argument("-k", type=int, required=True, help="number of domains")
    dm.add_argument("--key", default="niche", help="embedding of /embeddings (default: niche)")
    dm.add_argument("--column", default="domain", help="cell column to write (default: domain)")
    dm.add_argument("--seed", type=int, default=0)
    dm.set_defaults(func=cmd_domains)

    ph = sub.add_parser("phantom", help="write a synthetic phantom as Parquet files (one per section)")
    ph.add_argument("out")
    ph.add_argument("--cells", type=int, default=100_000)
    ph.add_argument("--sections", type=int, default=10)
    ph.add_argument("--genes", type=int, default=50)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--truth", help="also write the ground truth Zarr here")
    ph.set_defaults(func=cmd_phantom)
    return p


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (tests and notebooks replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _logging(verbose: bool, quiet: bool) -> None:
    """One line per stage (start, end, seconds, what it wrote) on stderr, terminal or not; ``-v`` adds each
    computation, ``-q`` keeps warnings only. Only lamina's logger: Dask's own INFO lines stay quiet."""
    logger = logging.getLogger("lamina")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "_lamina", False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s lamina %(message)s", "%H:%M:%S"))
        handler._lamina = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args.verbose, args.quiet)
    from .cluster import set_progress

    set_progress(sys.stderr.isatty() and not args.quiet)
    try:
        return args.func(args)
    except LaminaError as exc:
        print(f"lamina: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lamina: interrupted; completed stages are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

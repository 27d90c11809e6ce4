"""Niche embeddings against the peers, 3D against 2D, and the cost at atlas scale.

    python benchmarks/embed.py                  # osmFISH (lamina and peers), the 3D phantom, 1M and 3M cells
    python benchmarks/embed.py --sizes 1e6 3e6 1e7 --write
    python benchmarks/embed.py --smoke          # tiny (seconds; used by the tests)

osmFISH (../shared/data/osmfish: 5,328 cells, 33 genes; scored on the 4,839 cells with a region): spatial
domains by k-means with k = 11 regions on each embedding as it is (ARI, NMI, mean of 3 seeds), and linear
probes (logistic regression, C = 1, on standardised dimensions; 5 spatially blocked folds of 5 k-means
patches each; macro-F1) for the region and the cell type. No method sees a label: lamina's composition block
uses k-means clusters of the PCs (``cell_types=auto``). Every method gets the same log1p(10^4 counts / total)
genes (GraphST its raw counts, for its own preprocessing). lamina runs in a child process on the threaded
scheduler; each peer in a child process of its own virtual environment (``--peers-python``: scanpy 1.11.5,
pybanksy 1.3.5, squidpy 1.8.2, cellcharter 0.3.7, stagate-modern 1.0.0.post1, graphst-modern 1.1.1.post3,
torch-geometric 2.8.1, as benchmarks/embed_peers.requirements.txt lists; ``--make-peers-env DIR`` creates
it). Wall time and peak RSS of each child.

Phantom: 12 stacks (``--phantom-seeds``, 20-31: seeds not used while the niche's 3D design was chosen) cut
without transforms (raw = true positions), 4 curved layers and a tube constant in z, sparse sections (300
cells each) and noisy expression: the niche with 0, 1, 2 adjacent sections on each side (``z_sections``;
pooled into the disks, and the separate z block). Scores: k-means layer ARI (k = 5, 3 seeds) and a layer
probe fitted on the even sections and scored on the odd ones (held out), each paired with the 2D niche of
the same stack.

Scale: phantoms of 1M / 3M (/ 10M) cells in 32 sections, positions taken as aligned, 10 PCs, the niche with
its defaults (5 radii to 480 um, gradient, composition of 16 k-means types, the adjacent sections) on a
local cluster of 2 workers; peak RSS of the child and its workers.
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
from _embed_eval import OSMFISH, OSMFISH_UM_PER_PX, osmfish_table, score  # noqa: E402
from _measure import child_result, run_measured  # noqa: E402
from ingest import write_results  # noqa: E402

PEERS = ("banksy_0.2", "banksy_0.8", "cellcharter", "stagate", "graphst")
TARGETS = {"ari": 0.55, "region_f1": 0.70, "type_f1": 0.56}


def default_peers_python() -> str | None:
    env = os.environ.get("LAMINA_PEERS_PYTHON")
    for cand in (env, str(HERE.parent.parent / "peers-venv" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return None


# ---------------------------------------------------------------------------------------------- children
def child_osmfish(args) -> dict:
    import lamina

    work = Path(args.work)
    genes = json.loads((work / "genes.json").read_text())
    times = {}
    t = time.perf_counter()
    atlas = lamina.ingest(
        work / "osmfish.parquet",
        work / "osmfish.lamina.zarr",
        x="x",
        y="y",
        section="section",
        genes=genes,
        cell_id="cell_id",
        overwrite=True,
    )
    lamina.pca(atlas, n_pcs=30)
    times["ingest + pca"] = time.perf_counter() - t
    if args.variant == "pca":
        emb = np.asarray(atlas.root["pca/pcs"][...])
    else:
        t = time.perf_counter()
        lamina.niche(atlas, seed=args.seed)
        times["niche"] = time.perf_counter() - t
        emb = np.asarray(atlas.embedding("niche")[0])
        if args.variant == "encoder":
            t = time.perf_counter()
            lamina.encoder(atlas, seed=args.seed)
            times["encoder"] = time.perf_counter() - t
            emb = np.asarray(atlas.embedding("encoder")[0])
    np.save(work / f"{args.variant}-{args.seed}.npy", emb)
    return {"times": times, "dim": int(emb.shape[1])}


def child_scale(args) -> dict:
    import lamina
    from lamina.stages.warp import mark_aligned

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    with lamina.connect() as client:
        t = time.perf_counter()
        ph = lamina.datasets.phantom(n_cells=args.cells, n_sections=args.sections, n_genes=20, seed=0)
        atlas = lamina.ingest(ph, work / "s.lamina.zarr", overwrite=True, client=client)
        mark_aligned(atlas, client=client)
        lamina.pca(atlas, n_pcs=10, client=client)
        times["ingest + pca"] = time.perf_counter() - t
        t = time.perf_counter()
        lamina.niche(atlas, client=client)
        times["niche"] = time.perf_counter() - t
        rec = atlas.stage_records()["niche"]
        sample = np.asarray(atlas.root["embeddings/niche/values"][: min(atlas.n_cells, 100_000)])
    return {
        "times": times,
        "cells": atlas.n_cells,
        "finite": float(np.isfinite(sample).mean()),
        "exact_um": rec["exact_um"],
        "sampled_radii": rec["sampled_radii"],
        "dim": int(sample.shape[1]),
    }


# ----------------------------------------------------------------------------------------------- parts
def run_osmfish(args, peers_python: str | None) -> list[dict]:
    work = Path(args.work) / "osmfish"
    work.mkdir(parents=True, exist_ok=True)
    table, counts = osmfish_table(with_counts=True)
    genes = [c for c in table.columns if c not in ("cell_id", "x", "y", "ClusterName", "Region")]
    table.assign(section="osmfish").drop(columns=["ClusterName", "Region"]).to_parquet(work / "osmfish.parquet")
    (work / "genes.json").write_text(json.dumps(genes))
    np.savez(
        work / "input.npz",
        counts=counts,
        logn=table[genes].to_numpy(np.float32),
        xy=table[["x", "y"]].to_numpy(),
        genes=np.array(genes),
    )
    rows = []
    variants = [("pca", 0, "lamina: own PCs only (30)")]
    variants += [("niche", s, f"lamina niche (defaults, seed {s})") for s in (0, 1, 2)]
    variants += [("encoder", 0, "lamina encoder (defaults, seed 0)")]
    for variant, seed, name in variants:
        cmd = [sys.executable, __file__, "--child", "osmfish", "--variant", variant, "--seed", str(seed)]
        m = run_measured([*cmd, "--work", str(work)])
        info = child_result(m)
        emb = np.load(work / f"{variant}-{seed}.npy")
        rows.append(
            {
                "method": name,
                "wall": m["seconds"],
                "peak": m["peak_rss"],
                "dim": info["dim"],
                "own": sum(info["times"].values()),
                **score(emb, table),
            }
        )
        print(rows[-1], flush=True)
    if peers_python is None:
        print("peers skipped: no peers environment (--peers-python or LAMINA_PEERS_PYTHON)", flush=True)
        return rows
    for peer in args.peers:
        out = work / f"{peer}.npy"
        try:
            m = run_measured([peers_python, str(HERE / "embed_peers.py"), peer, str(work / "input.npz"), str(out)])
        except RuntimeError as exc:
            rows.append({"method": peer, "error": str(exc).splitlines()[-1][:120]})
            print(rows[-1], flush=True)
            continue
        info = child_result(m)
        rows.append(
            {
                "method": peer,
                "wall": m["seconds"],
                "peak": m["peak_rss"],
                "dim": info["dim"],
                "own": info["seconds"],
                **score(np.load(out), table),
            }
        )
        print(rows[-1], flush=True)
    return rows


PHANTOM_VARIANTS = (
    ("niche, z_sections=0 (2D)", {"z_sections": 0}),
    ("niche, z_sections=1", {"z_sections": 1}),
    ("niche, z_sections=1, z_mode=block", {"z_sections": 1, "z_mode": "block"}),
    ("niche, z_sections=2", {"z_sections": 2}),
)


def run_phantom(args) -> list[dict]:
    """One row per (phantom seed, embedding): layer ARI (k-means, 3 seeds) and the held-out-section probe."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score

    import lamina
    from lamina.stages.warp import mark_aligned

    n, S = (1_200, 4) if args.smoke else (4_800, 16)
    rows = []
    for seed in args.phantom_seeds:
        work = Path(args.work) / f"phantom-{seed}"
        ph = lamina.datasets.phantom(
            n_cells=n,
            n_sections=S,
            n_genes=16,
            seed=seed,
            max_rotation_deg=0,
            max_translation_um=0,
            scale_range=0,
            warp_um=0,
            noise=1.5,
        )
        atlas = lamina.ingest(ph, work / "p.lamina.zarr", cell_chunk=1000, overwrite=True)
        mark_aligned(atlas)
        lamina.pca(atlas, n_pcs=10)
        layers = np.asarray(atlas.root["cells/cell_type"][...])
        train = np.asarray(atlas.root["cells/section"][...]) % 2 == 0

        def scores(v, layers=layers, train=train):
            ari = np.mean(
                [adjusted_rand_score(layers, KMeans(5, n_init=5, random_state=s).fit_predict(v)) for s in range(3)]
            )
            acc = LogisticRegression(max_iter=2000).fit(v[train], layers[train]).score(v[~train], layers[~train])
            return {"ari": float(ari), "probe": float(acc)}

        own = scores(np.asarray(atlas.root["pca/pcs"][...]))
        rows.append({"seed": seed, "what": "own PCs (10)", "seconds": 0.0, **own})
        for what, kw in PHANTOM_VARIANTS:
            t = time.perf_counter()
            lamina.niche(atlas, radii_um=[30.0, 60.0, 120.0], **kw)
            seconds = time.perf_counter() - t
            found = scores(np.asarray(atlas.embedding("niche")[0]))
            rows.append({"seed": seed, "what": what, "seconds": seconds, **found})
            print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run_scale(args) -> list[dict]:
    rows = []
    for n in args.sizes:
        work = Path(args.work) / f"s{int(n)}"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "scale",
            "--cells",
            str(int(n)),
            "--sections",
            str(args.sections),
            "--work",
            str(work),
        ]
        m = run_measured(cmd)
        info = child_result(m)
        rows.append(
            {
                "cells": info["cells"],
                "wall": m["seconds"],
                "peak": m["peak_rss"],
                "niche": info["times"]["niche"],
                "exact_um": info["exact_um"],
                "sampled": info["sampled_radii"],
                "finite": info["finite"],
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------------ table
def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def render(osm: list[dict], argv, peers_python) -> str:
    lines = [
        "## Niche embeddings (benchmarks/embed.py)",
        "",
        f"{dt.date.today()} · {platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU · Python "
        f"{platform.python_version()} · command: `python benchmarks/embed.py {' '.join(argv)}`",
        "",
        f"osmFISH (Codeluppi 2018; {OSMFISH_UM_PER_PX} um per pixel assumed, the source gives none): k-means "
        "domains with k = 11 on each embedding as it is (ARI / NMI vs the 11 regions, mean of 3 seeds); linear "
        "probes, 5 spatially blocked folds (macro-F1). No method sees a label. Targets: ARI >= 0.55, region F1 >= "
        "0.70, type F1 >= 0.56. Peers with their documented defaults (BANKSY k_geom 15, its PCA to 20; CellCharter "
        "Delaunay graph, 3 layers over the same 30 PCs; STAGATE 40 um radius graph, 200 epochs of its 1000; "
        "GraphST 200 epochs of its 600: the defaults run for tens of minutes on 2 CPU cores). Time: the method's "
        "own (lamina: its stages; peers: after imports) and the child's wall. lamina's niche is listed for 3 "
        "seeds (its k-means types and fit subset); the targets are judged on their mean.",
        "",
        "| method | dim | ARI | NMI | region F1 | type F1 | own time (s) | wall (s) | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in osm:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['dim']} | {_fmt(r['ari'])} | {_fmt(r['nmi'])} | {_fmt(r['region_f1'])} | "
            f"{_fmt(r['type_f1'])} | {r['own']:.1f} | {r['wall']:.1f} | {r['peak'] / 2**30:.2f} |"
        )
    niches = [r for r in osm if r["method"].startswith("lamina niche") and "error" not in r]
    if niches:
        mean = {k: float(np.mean([r[k] for r in niches])) for k in TARGETS}
        met = [
            f"{k.replace('_', ' ')} {mean[k]:.3f} {'meets' if mean[k] >= v else 'misses'} {v}"
            for k, v in TARGETS.items()
        ]
        lines += ["", f"Targets (lamina niche, mean of {len(niches)} seeds): " + "; ".join(met) + "."]
    if peers_python is None:
        lines += ["", "Peers not run: no peers environment on this machine."]
    return "\n".join(lines) + "\n"


def render_phantom(phantom: list[dict], argv, smoke: bool) -> str:
    """Per embedding: mean (sd) over the phantom seeds, and the paired change against the 2D niche."""
    seeds = sorted({r["seed"] for r in phantom})
    n, S = (1_200, 4) if smoke else (4_800, 16)
    lines = [
        "## Niche embeddings in 3D: the layered phantom (benchmarks/embed.py)",
        "",
        f"{dt.date.today()} · {platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU · Python "
        f"{platform.python_version()} · command: `python benchmarks/embed.py {' '.join(argv)}`",
        "",
        f"{len(seeds)} phantom stacks (seeds {', '.join(map(str, seeds))}; each {n:,} cells in {S} sections 35 um "
        f"apart, {n // S} per section, noise sd 1.5, no transforms; 4 curved layers and a tube, constant in z): "
        "layers by k-means with k = 5 (ARI, mean of 3 k-means seeds) and a layer probe fitted on the even "
        "sections, scored on the odd (held-out) ones; radii 30 / 60 / 120 um, other options at their defaults.",
        "",
        "| embedding | ARI, mean (sd) | ARI - 2D, mean (sd) | stacks above 2D | held-out probe accuracy | "
        "probe - 2D | niche (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in phantom:
        by.setdefault(r["what"], {})[r["seed"]] = r
    flat = by.get(PHANTOM_VARIANTS[0][0], {})
    for what, rs in by.items():
        ari = np.array([rs[s]["ari"] for s in seeds])
        probe = np.array([rs[s]["probe"] for s in seeds])
        d = ari - np.array([flat[s]["ari"] for s in seeds])
        dp = probe - np.array([flat[s]["probe"] for s in seeds])
        sd = lambda x: f"{x.std(ddof=1):.3f}" if len(x) > 1 else "-"  # noqa: E731
        lines.append(
            f"| {what} | {ari.mean():.3f} ({sd(ari)}) | {d.mean():+.3f} ({sd(d)}) | {int((d > 0).sum())} / "
            f"{len(seeds)} | {probe.mean():.3f} | {dp.mean():+.3f} | "
            f"{np.mean([rs[s]['seconds'] for s in seeds]):.1f} |"
        )
    return "\n".join(lines) + "\n"


def render_scale(scale: list[dict], argv, sections: int) -> str:
    lines = [
        "## Niche embeddings at scale (benchmarks/embed.py)",
        "",
        f"{dt.date.today()} · {platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU · Python "
        f"{platform.python_version()} · command: `python benchmarks/embed.py {' '.join(argv)}`",
    ]
    if scale:
        lines += [
            "",
            f"Scale: phantoms in {sections} sections taken as aligned, 10 PCs, the niche's defaults on 2 local "
            "workers (two neighbourhood passes: the PCA fit on a fixed subset of <= 200k cells, then every cell). "
            "Disks expected to hold more than 200 cells are summarised from a fixed random subset of about 200.",
            "",
            "| cells | niche (s) | per 1M cells (s) | wall, whole child (s) | peak RSS (GiB) | exact lists to (um) | "
            "sampled radii (um) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['cells']:,} | {r['niche']:.1f} | {r['niche'] / r['cells'] * 1e6:.1f} | {r['wall']:.1f} | "
            f"{r['peak'] / 2**30:.2f} | {r['exact_um']:.0f} | {', '.join(f'{x:g}' for x in r['sampled'])} |"
            for r in scale
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 3e6], help="cells of the scale phantoms")
    p.add_argument("--sections", type=int, default=32)
    p.add_argument("--peers", nargs="*", default=list(PEERS), help="peers to run (none: no peers)")
    p.add_argument("--peers-python", default=None, help="python of the peers' environment")
    p.add_argument("--make-peers-env", metavar="DIR", help="create the peers' environment in DIR, then exit")
    p.add_argument("--skip", nargs="*", default=[], choices=["osmfish", "phantom", "scale"])
    p.add_argument("--work", default=str(HERE / "out" / "embed"))
    p.add_argument("--write", action="store_true")
    p.add_argument("--scale-section", default="embed-scale", help="RESULTS.md section of the scale table")
    p.add_argument("--smoke", action="store_true")
    p.add_argument(
        "--phantom-seeds", nargs="+", type=int, default=list(range(20, 32)), help="seeds of the 3D phantom stacks"
    )
    p.add_argument("--child", choices=["osmfish", "scale"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="niche", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child_osmfish(args) if args.child == "osmfish" else child_scale(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    argv = argv if argv is not None else sys.argv[1:]
    if args.make_peers_env:
        import subprocess

        env = Path(args.make_peers_env)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build first, as for lamina
        subprocess.run([*pip, "-r", str(HERE / "embed_peers.requirements.txt")], check=True)
        print(f"peers environment ready: --peers-python {env / 'bin' / 'python'}")
        return 0
    if args.smoke:
        args.sizes, args.sections, args.peers, args.phantom_seeds = [20_000], 4, [], [5]
    peers_python = args.peers_python or default_peers_python()
    osm, phantom, scale = [], [], []
    try:
        if "osmfish" not in args.skip and not args.smoke:
            if OSMFISH.exists():
                osm = run_osmfish(args, peers_python if args.peers else None)
            else:
                print(f"osmFISH skipped: {OSMFISH} is not present (see ../shared/data/README.md)")
        if "phantom" not in args.skip:
            phantom = run_phantom(args)
        if "scale" not in args.skip:
            scale = run_scale(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    if osm:
        text = render(osm, argv, peers_python if args.peers else None)
        print(text)
        if args.write and not args.smoke:
            write_results(text, section="embed")
    if phantom:
        text = render_phantom(phantom, argv, args.smoke)
        print(text)
        if args.write and not args.smoke:
            write_results(text, section="embed-3d")
    if scale:
        text = render_scale(scale, argv, args.sections)
        print(text)
        if args.write and not args.smoke:
            write_results(text, section=args.scale_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Platform readers at scale: one instrument folder per platform, ingested in a fresh process, wall and peak RSS.

    python benchmarks/platforms.py                      # 1M cells x 200 genes per folder, print the table
    python benchmarks/platforms.py --cells 200000 --write   # also update benchmarks/RESULTS.md

Each folder (one section, written by ``lamina.datasets.layouts.write_layout``) is ingested by its own process
(``lamina.ingest(folder, store, platform=...)``, no client: threads), once with both files in the same cell
order (read side by side) and once with the positions shuffled (joined by lookup: the section's positions are
held). Peak RSS is the process's; the dense expression of the folder is given for scale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = """
import sys, lamina
atlas = lamina.ingest(sys.argv[1], sys.argv[2], platform=sys.argv[3], images=False)
print(atlas.n_cells)
"""


def _write(platform: str, folder: Path, n: int, genes: int, shuffle: bool, seed: int) -> None:
    import numpy as np
    import pandas as pd

    from lamina.datasets.layouts import write_layout

    rng = np.random.default_rng(seed)
    names = [f"g{i:04d}" for i in range(genes)]
    frame = pd.DataFrame(
        {"x": rng.uniform(0, 8000, n), "y": rng.uniform(0, 8000, n), "cell_id": np.arange(n).astype(str)}
    )
    frame = pd.concat([frame, pd.DataFrame(rng.poisson(0.3, (n, genes)).astype(np.float32), columns=names)], axis=1)
    write_layout(platform, folder, frame, names, shuffle=shuffle, image=False, seed=seed)


def main(argv=None) -> int:
    from _measure import run_measured

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--platforms", nargs="+", default=["xenium", "merscope", "cosmx", "visium_hd"])
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="2,000 cells x 20 genes (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes = 2_000, 20
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lamina-platforms-"))
    try:
        for platform in args.platforms:
            for shuffle in (False, True):
                folder = work / f"{platform}-{int(shuffle)}" / "section"
                _write(platform, folder, args.cells, args.genes, shuffle, 0)
                size = sum(f.stat().st_size for f in folder.parent.rglob("*") if f.is_file())
                cmd = [sys.executable, "-c", CHILD, str(folder), str(work / "s.lamina.zarr"), platform]
                m = run_measured(cmd)
                assert int(m["stdout"].split()[-1]) == args.cells, m["stdout"]
                rows.append((platform, "lookup" if shuffle else "side by side", size, m["seconds"], m["peak_rss"]))
                print(rows[-1], flush=True)
                shutil.rmtree(work / "s.lamina.zarr", ignore_errors=True)
                shutil.rmtree(folder.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dense = args.cells * args.genes * 4 / 2**20
    lines = [
        f"## Platform readers: one folder of {args.cells:,} cells x {args.genes} genes, fresh process, no client",
        "",
        f"CPU, 2 cores; `python benchmarks/platforms.py --cells {args.cells} --genes {args.genes}`. Dense expression "
        f"of the folder: {dense:,.0f} MiB. Wall includes interpreter start and imports.",
        "",
        "| platform | join | folder MiB | wall s | cells/s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for platform, join, size, wall, peak in rows:
        rate, mib = args.cells / wall, 2**20
        lines.append(f"| {platform} | {join} | {size / mib:,.0f} | {wall:.1f} | {rate:,.0f} | {peak / mib:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        from ingest import write_results

        write_results(text, "platforms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

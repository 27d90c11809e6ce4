"""QC pictures: a grid of sections (PNG) and a 3D view of the stack (self-contained plotly HTML).

Only a bounded subsample per section is read (strided rows), so pictures cost the same at any atlas size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UnknownGeneError
from .store.atlas import Atlas


def _sample(atlas: Atlas, i: int, max_cells: int, use_aligned: bool = False) -> dict:
    sec = atlas.sections
    lo, hi = int(sec.cell_start.iloc[i]), int(sec.cell_stop.iloc[i])
    step = max(1, (hi - lo) // max_cells)
    root = atlas.root
    if use_aligned:
        x, y = (np.asarray(root[f"aligned/{k}"][lo:hi:step]) for k in ("x", "y"))
        z = np.asarray(root["aligned/z"][lo:hi:step])
    else:
        x, y = (np.asarray(root[f"cells/{k}"][lo:hi:step]) for k in ("x", "y"))
        z = np.full(len(x), float(sec.z.iloc[i]), dtype=np.float32)
    out = {"x": x, "y": y, "z": z}
    if "cell_type" in atlas.cell_columns:
        out["type"] = np.asarray(root["cells/cell_type"][lo:hi:step]).astype(np.int64)
    return out


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` and free it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def section_grid(atlas: Atlas, path: str | Path, max_cells: int = 4000) -> Path:
    """Small multiples of every section in its own (raw) coordinates, coloured by cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = atlas.n_sections
    cols = min(6, S)
    rows = int(np.ceil(S / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    cats = atlas.categories("cell_type") if "cell_type" in atlas.cell_columns else None
    cmap = plt.get_cmap("tab10" if len(cats or []) <= 10 else "tab20")
    sec = atlas.sections
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= S:
            continue
        d = _sample(atlas, i, max_cells)
        color = cmap(d["type"] % cmap.N) if "type" in d else "k"
        ax.scatter(d["x"], d["y"], s=0.5, c=color, linewidths=0)
        ax.set_aspect("equal")
        ax.set_title(f"{sec.id.iloc[i]}  z={sec.z.iloc[i]:g} um\n{sec.n_cells.iloc[i]:,} cells", fontsize=8)
    if cats:
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=cmap(k % cmap.N), label=c) for k, c in enumerate(cats[:20])
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.suptitle(f"{Path(atlas.path).name}: sections as acquired (raw coordinates, um)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return _save(fig, path, 110)


def stack_html(atlas: Atlas, path: str | Path, max_points: int = 60_000) -> Path:
    """Interactive 3D scatter of the stack (aligned coordinates when registration has run, raw otherwise)."""
    import plotly.graph_objects as go

    aligned = "aligned" in atlas.root and atlas.group_is_complete("aligned")
    S = atlas.n_sections
    parts = [_sample(atlas, i, max(1, max_points // S), aligned) for i in range(S)]
    d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cats = atlas.categories("cell_type") if "type" in d else None
    traces = []
    if cats:
        for k, name in enumerate(cats):
            m = d["type"] == k
            traces.append(
                go.Scatter3d(x=d["x"][m], y=d["y"][m], z=d["z"][m], mode="markers", name=name, marker={"size": 1.5})
            )
    else:
        traces.append(go.Scatter3d(x=d["x"], y=d["y"], z=d["z"], mode="markers", marker={"size": 1.5}))
    title = "aligned atlas" if aligned else "stack before registration (raw x, y; section z)"
    fig = go.Figure(
        traces,
        layout={
            "title": f"{Path(atlas.path).name}: {title}",
            "scene": {"aspectmode": "data", "xaxis_title": "x (um)", "yaxis_title": "y (um)", "zaxis_title": "z (um)"},
        },
    )
    path = Path(path)
    fig.write_html(path, include_plotlyjs=True)
    return path


def _composite(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """RGB overlay: fixed in magenta, moving in green (white where both have tissue)."""
    f = fixed / max(np.percentile(fixed, 99), 1e-9)
    m = moving / max(np.percentile(moving, 99), 1e-9)
    return np.clip(np.stack([f, m, f], -1), 0, 1)


def pair_overlays(atlas: Atlas, path: str | Path, max_pairs: int = 12) -> Path:
    """Registration QC: each adjacent pair before (section-centred) and after its affine, with its QC numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .kernels.image_align import warp_image
    from .stages.rasterize import pixel_to_um
    from .store.arrays import as_text

    raster, pairs = atlas.root["raster"], atlas.root["transforms/pairs"]
    P = pixel_to_um(raster)
    moving, fixed = pairs["moving"][...], pairs["fixed"][...]
    adjacent = [i for i in range(len(moving)) if abs(int(moving[i]) - int(fixed[i])) == 1][:max_pairs]
    flags, methods = as_text(pairs["flag"][...]), as_text(pairs["method"][...])
    ncc0, ncc1 = pairs["ncc_before"][...], pairs["ncc_after"][...]
    ids = atlas.sections.id.tolist()
    fig, axes = plt.subplots(len(adjacent), 2, figsize=(6, 3 * len(adjacent)), squeeze=False)
    for row, i in enumerate(adjacent):
        k, j = int(moving[i]), int(fixed[i])
        m = np.asarray(raster["cells"][k]).sum(0)
        f = np.asarray(raster["cells"][j]).sum(0)
        A_px = np.linalg.inv(P) @ pairs["affine_um"][i] @ P
        warped = warp_image(torch.from_numpy(m)[None, None].double(), torch.from_numpy(A_px)[None])[0, 0].numpy()
        for col, (img, title) in enumerate(
            [(m, f"before  ncc {ncc0[i]:.2f}"), (warped, f"after ({methods[i]})  ncc {ncc1[i]:.2f}")]
        ):
            ax = axes[row, col]
            ax.imshow(_composite(f, img), origin="lower")
            ax.set_title(f"{ids[k]} -> {ids[j]}: {title}", fontsize=7)
            ax.set_axis_off()
        if flags[i]:
            axes[row, 1].text(0.01, 0.01, flags[i][:60], color="yellow", fontsize=6, transform=axes[row, 1].transAxes)
    fig.suptitle("registration QC: fixed magenta, moving green", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 100)


def stack_view(atlas: Atlas, path: str | Path) -> Path:
    """Orthogonal views of the section stack on the atlas canvas, before and after refinement.

    Each panel row is one section; the columns are the total cell density along the canvas's middle row
    (x-z view) or middle column (y-z view). A well-aligned stack shows continuous vertical structures, and a
    structure that curves through the tissue stays curved. Reads the per-section canvases only (small).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = atlas.root["deformation"]
    S, C, H, W = g["canvas"].shape
    views = {}
    for name in ("canvas", "current"):
        xz, yz = np.zeros((S, W)), np.zeros((S, H))
        for k in range(S):
            total = np.asarray(g[name][k]).sum(0)
            xz[k], yz[k] = total[H // 2 - 1 : H // 2 + 2].mean(0), total[:, W // 2 - 1 : W // 2 + 2].mean(1)
        views[name] = (xz, yz)
    fig, axes = plt.subplots(2, 2, figsize=(9, 4 + 0.1 * S), squeeze=False)
    for r, (name, title) in enumerate([("canvas", "affine stage"), ("current", "refined")]):
        for c, (img, axis) in enumerate(zip(views[name], ("x", "y"))):
            ax = axes[r, c]
            ax.imshow(img, aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_title(f"{title}: {axis}-z through the canvas centre", fontsize=9)
            ax.set_xlabel(f"{axis} (canvas px)", fontsize=8)
            ax.set_ylabel("section", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


def volume_slices(atlas: Atlas, path: str | Path, gene: str | None = None) -> Path:
    """Orthogonal slices (x-y at the middle z, x-z at the middle y, y-z at the middle x) through the
    expression volume of ``gene`` (default: the gene with the largest spread over the middle x-y slice) and
    through the cell-density volume. Reads three planes per volume, never the volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .store.arrays import as_text

    dens = atlas.root["volume/density"]
    Z, Y, X = dens.shape
    v, origin = float(dens.attrs["voxel_um"]), dens.attrs["origin"]
    planes = [
        ("x-y", np.s_[Z // 2, :, :], ("x", "y")),
        ("x-z", np.s_[:, Y // 2, :], ("x", "z")),
        ("y-z", np.s_[:, :, X // 2], ("y", "z")),
    ]
    rows = [("cells per voxel", lambda sl: np.asarray(dens[sl]), "magma")]
    if atlas.group_is_complete("expression"):
        values = atlas.root["expression/values"]
        names = list(as_text(atlas.root["expression/gene"][...]))
        if gene is None:
            mid = np.asarray(values[:, Z // 2, :, :])
            gene = (
                names[int(np.nanargmax(np.nanstd(mid.reshape(len(names), -1), axis=1)))]
                if np.isfinite(mid).any()
                else names[0]
            )
        if gene not in names:
            raise UnknownGeneError(
                f"gene {gene!r} not in the expression volume of {atlas.path}; it has "
                f"{', '.join(names[:5])} ... ({len(names)} genes)"
            )
        gi = names.index(gene)
        rows.insert(0, (f"{gene} expression", lambda sl: np.asarray(values[(gi,) + sl]), "viridis"))
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.6 * len(rows)), squeeze=False)
    axis_um = {"x": (origin[0], X), "y": (origin[1], Y), "z": (origin[2], Z)}
    for r, (label, read, cmap) in enumerate(rows):
        for c, (name, sl, (h, w)) in enumerate(planes):
            img = read(sl)
            (h0, nh), (w0, nw) = axis_um[h], axis_um[w]
            ax = axes[r, c]
            im = ax.imshow(
                img,
                origin="lower",
                cmap=cmap,
                interpolation="nearest",
                aspect="equal",
                extent=(h0, h0 + nh * v, w0, w0 + nw * v),
            )
            ax.set_title(f"{label}: {name} slice", fontsize=9)
            ax.set_xlabel(f"{h} (um)", fontsize=8)
            ax.set_ylabel(f"{w} (um)", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, path, 100)


def write_report(atlas: Atlas, folder: str | Path) -> list[Path]:
    """All pictures that apply to the stages done so far, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [section_grid(atlas, folder / "sections.png"), stack_html(atlas, folder / "stack3d.html")]
    if atlas.group_is_complete("transforms") and atlas.group_is_complete("raster"):
        out.append(pair_overlays(atlas, folder / "registration_pairs.png"))
    if atlas.group_is_complete("deformation"):
        out.append(stack_view(atlas, folder / "stack_views.png"))
    if atlas.group_is_complete("volume"):
        out.append(volume_slices(atlas, folder / "volume_slices.png"))
    return out

"""QC pictures: a grid of sections (PNG) and a 3D view of the stack (self-contained plotly HTML).

Only a bounded subsample per section is read (strided rows), so pictures cost the same at any atlas size.
"""

from __future__ import annotations

import textwrap
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


def palette(n: int) -> list[str]:
    """``n`` distinct colours as hex, the same in every picture (PNG and HTML): matplotlib's tab10, then the
    lighter half of tab20, then hues spaced by the golden angle at alternating lightness (no repeats past 20)."""
    import colorsys

    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    base = [mcolors.to_hex(c) for c in colormaps["tab10"].colors] + [mcolors.to_hex(c) for c in tab20[1::2]]
    out = base[:n]
    k = 0
    while len(out) < n:
        hue = (0.13 + k * 0.381966) % 1.0  # golden-angle steps never land on the same hue twice
        light, sat = (0.45, 0.75) if k % 2 == 0 else (0.65, 0.55)
        out.append(mcolors.to_hex(colorsys.hls_to_rgb(hue, light, sat)))
        k += 1
    return out


def nice_length(span: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k) near a fifth of ``span``."""
    target = max(float(span), 1e-9) / 5
    exp = np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return float(m * 10**exp)
    return float(10**exp)


def scale_bar(ax, span_um: float, x0: float, y0: float, unit: str = "um", color: str = "k") -> str:
    """Draw a scale bar of a round length from data point (x0, y0) on ``ax``; returns its label."""
    length = nice_length(span_um)
    label = f"{length:g} {unit}" if length < 1000 or unit != "um" else f"{length / 1000:g} mm"
    ax.plot([x0, x0 + length], [y0, y0], color=color, lw=2, solid_capstyle="butt")
    ax.text(x0 + length / 2, y0, label, ha="center", va="bottom", fontsize=6, color=color)
    return label


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` and free it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _unit(atlas: Atlas) -> str:
    return "px" if atlas.attrs.get("units") == "px" else "um"


def section_grid_figure(atlas: Atlas, max_cells: int = 4000):
    """Small multiples of every section in its own (raw) coordinates, in z order, coloured by cell type (one
    legend entry and one distinct colour per type), each with a scale bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = atlas.n_sections
    cols = min(6, S)
    rows = int(np.ceil(S / cols))
    cats = list(atlas.categories("cell_type")) if "cell_type" in atlas.cell_columns else []
    colors = np.array(palette(len(cats)) + ["#b0b0b0"])  # the last: cells without a label
    legend_rows = int(np.ceil(len(cats) / 6))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.25 * legend_rows + 0.6), squeeze=False)
    sec, unit = atlas.sections, _unit(atlas)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= S:
            continue
        d = _sample(atlas, i, max_cells)
        color = colors[np.where(d["type"] >= 0, d["type"], len(cats))] if "type" in d else "k"
        ax.scatter(d["x"], d["y"], s=0.5, c=color, linewidths=0)
        ax.set_aspect("equal")
        ax.set_title(f"{sec.id.iloc[i]}  z={sec.z.iloc[i]:g} {unit}\n{sec.n_cells.iloc[i]:,} cells", fontsize=8)
        if len(d["x"]):
            x0, x1, y0, y1 = float(d["x"].min()), float(d["x"].max()), float(d["y"].min()), float(d["y"].max())
            scale_bar(ax, x1 - x0, x0, y0 - 0.06 * (y1 - y0 + 1), unit)
    if cats:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colors[k], label=c) for k, c in enumerate(cats)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    bottom = (0.25 * legend_rows + 0.1) / fig.get_figheight()
    fig.suptitle(f"{Path(atlas.path).name}: sections as acquired, in z order (raw coordinates, {unit})", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def section_grid(atlas: Atlas, path: str | Path, max_cells: int = 4000) -> Path:
    """:func:`section_grid_figure` as a PNG."""
    return _save(section_grid_figure(atlas, max_cells), path, 110)


def stack_figure(atlas: Atlas, max_points: int = 60_000, z_scale: float = 1.0, interpolated: bool = True):
    """Interactive 3D scatter of the stack (aligned coordinates when registration has run, raw otherwise), in
    the true aspect of the data (``z_scale`` stretches z, and says so in the title), with a camera that frames
    the whole atlas; the interpolated layers as one more trace (hidden until clicked) when they exist."""
    import plotly.graph_objects as go

    aligned = "aligned" in atlas.root and atlas.group_is_complete("aligned")
    S = atlas.n_sections
    parts = [_sample(atlas, i, max(1, max_points // S), aligned) for i in range(S)]
    d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cats = list(atlas.categories("cell_type")) if "type" in d else []
    colors = palette(len(cats))
    traces = []
    if cats:
        for k, name in enumerate(cats + ["no label"]):
            m = d["type"] == (k if k < len(cats) else -1)
            if k == len(cats) and not m.any():
                continue
            color = colors[k] if k < len(cats) else "#b0b0b0"
            traces.append(
                go.Scatter3d(
                    x=d["x"][m], y=d["y"][m], z=d["z"][m] * z_scale, mode="markers", name=name,
                    marker={"size": 1.5, "color": color},
                )
            )  # fmt: skip
    else:
        traces.append(
            go.Scatter3d(x=d["x"], y=d["y"], z=d["z"] * z_scale, mode="markers", name="cells", marker={"size": 1.5})
        )
    if interpolated and atlas.group_is_complete("interpolated"):
        g = atlas.root["interpolated"]
        step = max(1, g["x"].shape[0] // max(1, max_points // 4))
        traces.append(
            go.Scatter3d(
                x=np.asarray(g["x"][::step]), y=np.asarray(g["y"][::step]), z=np.asarray(g["z"][::step]) * z_scale,
                mode="markers", name="interpolated layers", visible="legendonly",
                marker={"size": 1.0, "color": "#808080", "opacity": 0.5},
            )
        )  # fmt: skip
    span = np.array([np.ptp(d["x"]), np.ptp(d["y"]), np.ptp(d["z"]) * z_scale], np.float64)
    span = np.maximum(span, 1e-6 * max(span.max(), 1e-9))
    ratio = span / span.max()
    # the eye at a fixed distance from the scene's centre, oblique from above: the whole box stays in view
    eye = np.array([1.2, -1.6, 1.0]) / np.linalg.norm([1.2, -1.6, 1.0]) * 2.2
    unit = _unit(atlas)
    title = "aligned atlas" if aligned else "stack before registration (raw x, y; section z)"
    title += " (true aspect)" if z_scale == 1 else f"; z stretched {z_scale:g}x"
    return go.Figure(
        traces,
        layout={
            "title": f"{Path(atlas.path).name}: {title}",
            "scene": {
                "aspectmode": "manual",
                "aspectratio": {"x": float(ratio[0]), "y": float(ratio[1]), "z": float(ratio[2])},
                "camera": {"eye": {"x": float(eye[0]), "y": float(eye[1]), "z": float(eye[2])}},
                "xaxis_title": f"x ({unit})",
                "yaxis_title": f"y ({unit})",
                "zaxis_title": f"z ({unit})",
            },
            "legend": {"itemsizing": "constant"},
        },
    )


def stack_html(atlas: Atlas, path: str | Path, max_points: int = 60_000) -> Path:
    """:func:`stack_figure` as a self-contained HTML file."""
    path = Path(path)
    stack_figure(atlas, max_points).write_html(path, include_plotlyjs=True)
    return path


def _composite(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """RGB overlay: fixed in magenta, moving in green (white where both have tissue)."""
    f = fixed / max(np.percentile(fixed, 99), 1e-9)
    m = moving / max(np.percentile(moving, 99), 1e-9)
    return np.clip(np.stack([f, m, f], -1), 0, 1)


def _label_map(img: np.ndarray, colors: list[str]) -> np.ndarray:
    """RGB of ``[C, H, W]`` channels: each pixel in the colour of its strongest channel, as bright as its
    total (the channels that drive the fit, side by side)."""
    import matplotlib.colors as mcolors

    rgb = np.array([mcolors.to_rgb(c) for c in colors])
    total = img.sum(0)
    out = rgb[img.argmax(0)] * np.clip(total / max(np.percentile(total, 99), 1e-9), 0, 1)[..., None]
    return out


def pair_overlays_figure(atlas: Atlas, max_pairs: int = 12):
    """Registration QC: each adjacent pair, in z order, before (section-centred) and after its affine, with its
    QC numbers and flag, and the raster channels (cell types, or density / PCs) that drove the fit: fixed and
    moving after alignment, each pixel in the colour of its strongest channel. Scale bars in um."""
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
    adjacent = sorted(
        (i for i in range(len(moving)) if abs(int(moving[i]) - int(fixed[i])) == 1),
        key=lambda i: min(int(moving[i]), int(fixed[i])),
    )[:max_pairs]
    flags, methods = as_text(pairs["flag"][...]), as_text(pairs["method"][...])
    ncc0, ncc1 = pairs["ncc_before"][...], pairs["ncc_after"][...]
    ids, z = atlas.sections.id.tolist(), atlas.sections.z.to_numpy()
    names = list(raster["cells"].attrs.get("channels", []))
    colors = palette(len(names))
    n = max(1, len(adjacent))
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.9 * n + 1.0), squeeze=False)
    spacing, N = float(raster.attrs["spacing"]), raster["cells"].shape[-1]
    unit = _unit(atlas)
    for row, i in enumerate(adjacent):
        k, j = int(moving[i]), int(fixed[i])
        mc = np.asarray(raster["cells"][k], np.float64)
        fc = np.asarray(raster["cells"][j], np.float64)
        A_px = np.linalg.inv(P) @ pairs["affine_um"][i] @ P
        warped = warp_image(torch.from_numpy(mc)[None].double(), torch.from_numpy(A_px)[None])[0].numpy()
        panels = [
            (_composite(fc.sum(0), mc.sum(0)), f"before  ncc {ncc0[i]:.2f}"),
            (_composite(fc.sum(0), warped.sum(0)), f"after ({methods[i]})  ncc {ncc1[i]:.2f}"),
            (_label_map(fc, colors), f"{ids[j]} channels"),
            (_label_map(warped, colors), f"{ids[k]} aligned, channels"),
        ]
        for col, (img, title) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, origin="lower", extent=(0, N * spacing, 0, N * spacing))
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
        axes[row, 0].text(
            -0.08, 0.5, f"{ids[k]} (z {z[k]:g}) ->\n{ids[j]} (z {z[j]:g})", fontsize=7, rotation=90,
            ha="right", va="center", transform=axes[row, 0].transAxes,
        )  # fmt: skip
        scale_bar(axes[row, 0], N * spacing, 0.05 * N * spacing, 0.05 * N * spacing, unit, color="w")
        if flags[i]:
            axes[row, 1].text(0.01, 0.01, flags[i][:80], color="yellow", fontsize=6, transform=axes[row, 1].transAxes)
    if names:
        handles = [plt.Line2D([], [], marker="s", ls="", color=colors[c], label=nm) for c, nm in enumerate(names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 8), fontsize=7, frameon=False)
    legend_rows = int(np.ceil(len(names) / 8))
    fig.suptitle(
        "registration QC in z order: fixed magenta, moving green; right: the channels the fit used", fontsize=9
    )
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.05) / fig.get_figheight(), 1, 1 - 0.4 / fig.get_figheight()))
    return fig


def pair_overlays(atlas: Atlas, path: str | Path, max_pairs: int = 12) -> Path:
    """:func:`pair_overlays_figure` as a PNG."""
    return _save(pair_overlays_figure(atlas, max_pairs), path, 100)


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


def deformation_figure(atlas: Atlas, max_sections: int = 24):
    """Where the fine stage moved tissue: per section (z order, at most ``max_sections``, evenly picked) the
    displacement magnitude ``|d|`` (um) and the Jacobian determinant ``det(I + grad d)`` of the map
    ``a -> a + d(a)`` on the atlas canvas (1: area kept, < 1 compressed, > 1 stretched, <= 0 would be a fold,
    which refine never keeps), inside the tissue only. A section that keeps its affine says so, with the
    reason refine recorded in ``/deformation/sections``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .kernels.lddmm import jacobian_det

    g = atlas.root["deformation"]
    S, _, N, _ = g["displacement"].shape
    spacing = float(g.attrs["spacing"])
    qc = g["sections"] if "sections" in g else None
    refined = np.asarray(qc["refined"][...], bool) if qc is not None and "refined" in qc else np.ones(S, bool)
    reasons = list(qc.attrs.get("reasons", [""] * S)) if qc is not None else [""] * S
    pick = np.unique(np.linspace(0, S - 1, min(S, max_sections)).round().astype(int))
    per_row = 4
    rows = int(np.ceil(len(pick) / per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.1 * 2 * per_row, 2.5 * rows + 1.3), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    ids, extent = atlas.sections.id.tolist(), (0, N * spacing, 0, N * spacing)
    vmax = max(1e-6, max(float(np.linalg.norm(g["displacement"][k], axis=0).max()) for k in pick))
    mag_im = det_im = None
    for i, k in enumerate(pick):
        a_mag, a_det = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
        d = np.asarray(g["displacement"][k], np.float64)
        tissue = np.asarray(g["current"][k], np.float64).sum(0)
        inside = tissue > 0.05 * tissue.max() if tissue.max() > 0 else np.ones_like(tissue, bool)
        mag = np.where(inside, np.linalg.norm(d, axis=0), np.nan)
        det = np.where(inside, jacobian_det(torch.from_numpy(d / spacing)).numpy(), np.nan)
        mag_im = a_mag.imshow(mag, origin="lower", extent=extent, cmap="viridis", vmin=0, vmax=vmax)
        det_im = a_det.imshow(det, origin="lower", extent=extent, cmap="RdBu_r", vmin=0.5, vmax=1.5)
        state = f"max {np.nanmax(mag):.1f} um" if refined[k] and np.isfinite(mag).any() else "keeps its affine"
        a_mag.set_title(f"{ids[k]}: |d|, {state}", fontsize=7)
        span = f"{np.nanmin(det):.2f}-{np.nanmax(det):.2f}" if np.isfinite(det).any() else "-"
        a_det.set_title(f"det J {span}", fontsize=7)
        if not refined[k] and reasons[k]:
            words = reasons[k].split(" (")[0]
            a_mag.text(0.0, -0.02, textwrap.fill(words, 40), fontsize=5, va="top", transform=a_mag.transAxes)
        scale_bar(a_mag, N * spacing, 0.05 * N * spacing, 0.02 * N * spacing, _unit(atlas))
    bottom = 0.9 / fig.get_figheight()
    if mag_im is not None:
        cax = fig.add_axes((0.12, 0.5 * bottom, 0.3, 0.15 * bottom))
        fig.colorbar(mag_im, cax=cax, orientation="horizontal").set_label(f"|displacement| ({_unit(atlas)})", size=7)
        cax = fig.add_axes((0.58, 0.5 * bottom, 0.3, 0.15 * bottom))
        fig.colorbar(det_im, cax=cax, orientation="horizontal").set_label("Jacobian determinant", size=7)
    fig.suptitle(
        f"fine stage: where it moved tissue ({int(refined.sum())} of {S} sections warped; the rest keep the affine)",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=bottom + 0.02, top=1 - 0.45 / fig.get_figheight())
    return fig


def deformation_qc(atlas: Atlas, path: str | Path, max_sections: int = 24) -> Path:
    """:func:`deformation_figure` as a PNG."""
    return _save(deformation_figure(atlas, max_sections), path, 100)


def flow_training_figure(atlas: Atlas):
    """What training the flow bought: left, the fit's divergence beyond its noise floor per step (summed over the
    two directions; the raw loss is dominated by the floor); right, the error of the prediction of the held-out
    section after every task, with the untrained flow's (the blend's) as a line, and which state was kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = atlas.root["flow"]
    rec = dict(g.attrs.get("training", {}))
    excess = np.asarray(g["excess"][...]) if "excess" in g else np.zeros(0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    if len(excess):
        a.plot(np.arange(1, len(excess) + 1), excess, lw=0.6, color="0.6", label="per step")
        win = max(1, len(excess) // 20)
        smooth = np.convolve(excess, np.ones(win) / win, mode="valid")
        a.plot(np.arange(win, len(excess) + 1), smooth, color="C0", label=f"mean of {win}")
        a.axhline(0, color="k", lw=0.5)
        a.legend(fontsize=7)
    a.set(xlabel="step", ylabel="Sinkhorn divergence - noise floor", title="fit beyond sampling noise")
    a.title.set_size(9)
    if "heldout" in g and "heldout_section" in rec:
        held = np.asarray(g["heldout"][...])
        per_task = int(atlas.stage_records()["train_flow"]["params"]["steps_per_task"])
        steps = np.minimum(np.arange(1, len(held) + 1) * per_task, rec["steps_run"])
        b.plot(steps, held, "o-", ms=3, color="C1", label="trained flow")
        b.axhline(rec["heldout_untrained"], color="k", ls="--", lw=0.8, label="untrained flow (blend)")
        if rec["best_step"]:
            b.axvline(rec["best_step"], color="C2", lw=0.8, label=f"kept: step {rec['best_step']}")
        b.legend(fontsize=7)
        kept = f"trained flow kept (step {rec['best_step']})" if rec["trained"] else "untrained flow kept"
        b.set_title(f"held-out section {rec['heldout_section']}: {kept}", fontsize=9)
        b.set(xlabel="step", ylabel="map error - noise floor")
    else:
        b.set_axis_off()
        b.text(0.5, 0.5, "no held-out section (validate=false or < 4 sections)", ha="center", fontsize=8)
    fig.tight_layout()
    return fig


def flow_training(atlas: Atlas, path: str | Path) -> Path:
    """:func:`flow_training_figure` as a PNG."""
    return _save(flow_training_figure(atlas), path, 100)


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


def enhance_figure(atlas: Atlas, path: str | Path, genes: list[str] | None = None, max_genes: int = 3) -> Path:
    """Per enhanced section (a row each): its H&E (the pyramid level nearest the superpixel grid), the measured
    spots and the enhanced map of each of a few genes side by side, in the section's um, framed on the spots (the
    map is drawn within one spot pitch of a spot, as the export). ``genes``: default the
    gene maps the stage wrote, else the model genes of largest loading. Reads one coarse image level and the
    [metagene, y, x] embedding per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.spatial import cKDTree

    from .store.arrays import as_text, read_columns

    g = atlas.root["enhance"]
    names = list(as_text(g["model/gene"][...]))
    H = np.asarray(g["model/loadings"][...], np.float64)
    if genes is None:
        first = g[str(g.attrs["sections"][0])]
        genes = list(as_text(first["gene"][...])) if "gene" in first else [names[i] for i in np.argsort(-H.max(0))]
    unknown = [x for x in genes if x not in names]
    if unknown:
        raise UnknownGeneError(f"gene(s) {unknown} are not model genes of {atlas.path}/enhance (re-run with genes=)")
    genes = list(genes)[:max_genes]
    cols = [names.index(x) for x in genes]
    sections = [str(s) for s in g.attrs["sections"]]
    fig, axes = plt.subplots(
        len(sections), 1 + 2 * len(genes), figsize=(3.2 * (1 + 2 * len(genes)), 3.2 * len(sections))
    )
    axes = np.atleast_2d(axes)
    secs = atlas.sections
    gene_idx = [list(atlas.genes).index(x) for x in genes]
    for r, sid in enumerate(sections):
        grp = g[sid]
        emb = np.asarray(grp["embedding"][...], np.float64)
        A = np.asarray(grp.attrs["grid_to_section"])
        h, w = emb.shape[1:]
        extent = (A[0, 2], A[0, 2] + A[0, 0] * w, A[1, 2] + A[1, 1] * h, A[1, 2])
        img = atlas.image(sid)
        lvl = img["levels"][min(int(grp.attrs["image_level"]) + 1, len(img["levels"]) - 1)]
        rgb = np.moveaxis(np.asarray(lvl), 0, -1)
        rgb = rgb[..., :3] if rgb.shape[-1] >= 3 else np.repeat(rgb, 3, -1)
        ax = axes[r, 0]
        ax.imshow(rgb, extent=extent)
        ax.set_title(f"{sid}: image", fontsize=9)
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        x, y = np.asarray(atlas.root["cells/x"][a:b]), np.asarray(atlas.root["cells/y"][a:b])
        measured = read_columns(atlas.root["X"], a, b, gene_idx)
        # the tissue the spots cover (within one pitch of a spot, as the export), framed with a pitch of margin
        pitch = float(g.attrs["spot_pitch_um"])
        rr, cc = np.mgrid[0:h, 0:w]
        centres = np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5, np.ones(h * w)], 1) @ A.T
        near = np.isfinite(cKDTree(np.c_[x, y]).query(centres[:, :2], distance_upper_bound=pitch)[0]).reshape(h, w)
        frame = (x.min() - pitch, x.max() + pitch, y.max() + pitch, y.min() - pitch)
        for k, (gene, col) in enumerate(zip(genes, cols)):
            gmap = np.where(near, np.einsum("r,ryx->yx", H[:, col], emb), np.nan)
            lo, hi = np.nanpercentile(measured[:, k], [2, 98])
            ax = axes[r, 1 + 2 * k]
            ax.scatter(x, y, c=measured[:, k], s=6, cmap="viridis", vmin=lo, vmax=hi)
            ax.set_aspect("equal")
            ax.set_title(f"{gene}: measured spots", fontsize=9)
            ax = axes[r, 2 + 2 * k]
            ax.imshow(gmap, extent=extent, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{gene}: enhanced ({float(grp.attrs['superpixel_um']):.0f} um)", fontsize=9)
        for ax in axes[r]:
            ax.set_xlim(frame[0], frame[1])
            ax.set_ylim(frame[2], frame[3])
            ax.set_xticks([])
            ax.set_yticks([])
        scale_bar(axes[r, 0], frame[1] - frame[0], frame[0] + pitch / 4, frame[2] - pitch / 4, color="k")
    fig.tight_layout()
    return _save(fig, path, 90)


def write_report(atlas: Atlas, folder: str | Path) -> list[Path]:
    """All pictures that apply to the stages done so far, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [section_grid(atlas, folder / "sections.png"), stack_html(atlas, folder / "stack3d.html")]
    if atlas.group_is_complete("transforms") and atlas.group_is_complete("raster"):
        out.append(pair_overlays(atlas, folder / "registration_pairs.png"))
    if atlas.group_is_complete("deformation"):
        out.append(stack_view(atlas, folder / "stack_views.png"))
        out.append(deformation_qc(atlas, folder / "deformation.png"))
    if atlas.group_is_complete("flow"):
        out.append(flow_training(atlas, folder / "flow_training.png"))
    if atlas.group_is_complete("volume"):
        out.append(volume_slices(atlas, folder / "volume_slices.png"))
    if atlas.group_is_complete("enhance"):
        out.append(enhance_figure(atlas, folder / "enhance.png"))
    return out

"""Stage ``histology``: weight-free image features of each section's histology on a superpixel grid, and each
spot's (cell's) mean of them over its footprint -> ``/histology``. What ``enhance`` fits and maps from.

Data flow, per section with an image in ``/images``::

    image level (pixel <= superpixel / 4) --map_tiles(image_features, halo from the filter bank)--> scratch
        [F, h, w] per superpixel --map_tiles(context_features, halo 4 sigma)--> /histology/<section>/features
        [3F, h, w]: each superpixel's features and their Gaussian means at 1x and 3x the spot radius
    features tiles + the spots whose centres fall in them --footprint_means--> /histology/cells/features [cell, 3F]
        and the features' mean and sd over the superpixels of all footprints (feature_mean, feature_scale: the
        scale at which enhance applies its head)

A separate stage because the features depend only on the images, the superpixel size and the spot radius:
refitting ``enhance`` (other genes, rank, held-out spots) reuses them. Its hash includes a token of every image
it reads, so a replaced image (``lamina.add_image``) re-runs it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import dask
import numpy as np

from ..errors import InputError, MissingInputError, ensure
from ..store import arrays
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

log = logging.getLogger("lamina")

#: superpixels per side of a feature chunk (and of the enhance maps)
TILE = 256
#: context scales, in spot radii
CONTEXT_RADII = (1.0, 3.0)
#: spots of a section outside its image above which the image is taken not to match them
MAX_OUTSIDE = 0.05
#: the encoder's principal directions are fitted on this many windows per section, of this many superpixels a side
BASIS_WINDOWS = 4
BASIS_SP = 32


@dataclass(frozen=True)
class HistologyOptions(Options):
    superpixel_um: float = option(16.0, "side of a superpixel (um): the grid of the features and enhanced maps", gt=0)
    spot_diameter_um: float | None = option(
        None, "spot diameter (um); null: half the median distance between neighbouring spots (Visium 55 / 100)", gt=0
    )
    sections: tuple[str, ...] = option((), "sections to read; empty: every section with an image")
    encoder: str | None = option(
        None,
        "local path of a pathology foundation model's weights (a ViT in timm's layout, e.g. UNI: .safetensors or a "
        "weights-only .pt / .bin; nothing is downloaded); its patch tokens, at one patch per superpixel, are added "
        "to the features; null: weight-free features only",
    )
    encoder_heads: int | None = option(None, "attention heads of the encoder; null: its embedding dim / 64", ge=1)
    encoder_dims: int = option(16, "principal components of the encoder's tokens kept as features", ge=1)


# ------------------------------------------------------------------------------------------- checks
def sections_with_images(atlas: Atlas, wanted: tuple[str, ...]) -> list[str]:
    have = atlas.images()
    ids = [str(s) for s in atlas.sections.id]
    if not wanted:
        return [s for s in ids if s in have]
    missing = [s for s in wanted if s not in ids]
    if missing:
        raise InputError(f"section(s) {missing} are not in {atlas.path}; sections: {', '.join(ids)}")
    lacking = [s for s in wanted if s not in have]
    if lacking:
        raise MissingInputError(
            f"section(s) {lacking} of {atlas.path} have no image; add one with "
            f"lamina.add_image(atlas, section, path, pixel_size_um=...)"
        )
    return list(wanted)


def _check(atlas: Atlas, opts: HistologyOptions) -> None:
    if opts.encoder is not None:  # a bad weights file is named before anything is computed
        from ..encoders import vit_encoder

        model = vit_encoder(opts.encoder, opts.encoder_heads)
        if opts.encoder_dims > model.dim:
            raise InputError(f"histology: encoder_dims={opts.encoder_dims} exceeds the encoder's {model.dim} dims")
    sections = sections_with_images(atlas, opts.sections)
    if not sections:
        raise MissingInputError(
            f"histology: no section of {atlas.path} has an image; ingest with images={{section: path}} or "
            f"lamina.add_image(atlas, section, path, pixel_size_um=...)"
        )
    secs = atlas.sections
    empty = [s for s in sections if int(secs[secs.id == s].n_cells.iloc[0]) == 0]
    if empty:
        raise InputError(f"histology: section(s) {empty} of {atlas.path} have no spots; leave them out with sections=")


def _spot_geometry(atlas: Atlas, sections: list[str], diameter: float | None) -> tuple[float, float]:
    """(spot diameter, spot pitch) in um: the pitch is the median distance to the nearest other spot."""
    from scipy.spatial import cKDTree

    secs = atlas.sections
    d = []
    for sid in sections:
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        if b - a >= 2:
            xy = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64)
            dist, _ = cKDTree(xy).query(xy, k=2)
            d.append(dist[:, 1])
    pitch = float(np.median(np.concatenate(d))) if d else float("nan")
    if not (np.isfinite(pitch) and pitch > 0):
        if diameter is None:
            raise InputError(
                f"histology: the spots of {atlas.path} have no neighbours to measure their pitch from; "
                f"give spot_diameter_um"
            )
        pitch = 2.0 * float(diameter)
    return (float(diameter) if diameter is not None else 0.5 * pitch), pitch


def _prepare(atlas: Atlas, opts: HistologyOptions) -> dict:
    sections = sections_with_images(atlas, opts.sections)
    diameter, pitch = _spot_geometry(atlas, sections, opts.spot_diameter_um)
    images = {}
    for sid in sections:
        g = atlas.root[f"images/{sid}"]
        images[sid] = str(g.attrs.get("written", "")) or f"{g.attrs.get('source', '')}:{g['0'].shape}"
    prepared = {"sections": sections, "spot_diameter_um": diameter, "spot_pitch_um": pitch, "images": images}
    if opts.encoder is not None:  # replaced weights re-run the stage
        from ..encoders import fingerprint

        prepared["encoder"] = fingerprint(opts.encoder)
    return prepared


# ------------------------------------------------------------------------------------------ geometry
@dataclass
class Grid:
    """One section's superpixel grid: the image level it is read from and the map grid (col, row) -> um."""

    section: str
    level: int
    factor: int
    px_um: float
    h: int
    w: int
    grid_to_um: np.ndarray

    @property
    def sp_um(self) -> float:
        return self.px_um * self.factor

    @classmethod
    def of(cls, group) -> Grid:
        """The grid a ``/histology/<section>`` group was computed on."""
        _, h, w = group["features"].shape
        return cls(
            str(group.attrs["section"]),
            int(group.attrs["image_level"]),
            int(group.attrs["pixels_per_superpixel"]),
            float(group.attrs["superpixel_um"]) / int(group.attrs["pixels_per_superpixel"]),
            h,
            w,
            np.asarray(group.attrs["grid_to_section"], np.float64),
        )

    def centres(self, xy_um: np.ndarray) -> np.ndarray:
        """Points ``[n, 2]`` in the section's um -> grid coordinates (col, row) in superpixels."""
        return (np.c_[xy_um, np.ones(len(xy_um))] @ np.linalg.inv(self.grid_to_um).T)[:, :2]


def _grid(atlas: Atlas, sid: str, superpixel_um: float) -> Grid:
    img = atlas.image(sid)
    levels, px0 = img["levels"], img["pixel_size_um"]
    level = 0
    while level + 1 < len(levels) and px0 * 2 ** (level + 1) <= superpixel_um / 4:
        level += 1
    px = px0 * 2**level
    factor = max(1, int(round(superpixel_um / px)))
    _, H, W = levels[level].shape
    to_um = img["image_to_section"] @ np.diag([2.0**level * factor, 2.0**level * factor, 1.0])
    return Grid(sid, level, factor, px, -(-H // factor), -(-W // factor), to_um)


def grid_map(
    ctx: StageContext,
    grid: Grid,
    g,
    fn,
    source: str,
    name: str,
    channels: int,
    dim: str,
    channel_chunk: int | None = None,
    **kw,
) -> None:
    """``g/<name>`` ``[channels, h, w]`` on the section's superpixel grid (chunks of ``TILE`` superpixels and of
    ``channel_chunk`` channels, default all; ``fn`` then takes ``channels=(c0, c1)``), filled from ``source`` by
    :func:`lamina.map_tiles` (``kw``: its halo, factor, kwargs, ...)."""
    from ..maps import map_tiles

    split = channel_chunk is not None and channel_chunk < channels
    chunks = (min(channel_chunk, channels) if split else channels, min(TILE, grid.h), min(TILE, grid.w))
    arrays.create(g, name, (channels, grid.h, grid.w), np.float32, chunks, (dim, "y", "x"))
    if split:
        kw["split_channels"] = True
    label = f"{ctx.stage.name}: {name} {grid.section}"
    map_tiles(fn, ctx.atlas.path, source, f"{g.path}/{name}", batch_dims=0, client=ctx.client, label=label, **kw)


# ------------------------------------------------------------------------------------------- tasks
def superpixel_features(block: np.ndarray, origin=(0, 0), *, px_um: float, factor: int, encoder: dict | None = None):
    """The weight-free features of an image block (:func:`lamina.kernels.enhance.image_features`) and, with
    ``encoder`` (kwargs of :func:`lamina.encoders.encoder_features`), the foundation model's projected tokens
    after them: ``[N_FEATURES (+ k), ceil(H / factor), ceil(W / factor)]``."""
    from ..kernels.enhance import image_features

    feats = image_features(block, px_um, factor)
    if encoder is None:
        return feats
    from ..encoders import encoder_features

    return np.concatenate([feats, encoder_features(block, origin, factor=factor, **encoder)])


def _token_sample(store: str, image: str, corner_sp: tuple[int, int], size_sp: int, encoder: dict, factor: int):
    """The encoder's tokens ``[n, D]`` of the central ``size_sp`` x ``size_sp`` superpixels of a window."""
    from ..encoders import encoder_features

    arr = arrays.open_root(store, "r")[image]
    halo = encoder["halo_sp"]
    r0, c0 = max(0, corner_sp[0] - halo), max(0, corner_sp[1] - halo)
    r1, c1 = corner_sp[0] + size_sp + halo, corner_sp[1] + size_sp + halo
    block = np.asarray(arr[:, r0 * factor : r1 * factor, c0 * factor : c1 * factor])
    tokens = encoder_features(block, (r0 * factor, c0 * factor), factor=factor, **encoder)
    a, b = corner_sp[0] - r0, corner_sp[1] - c0
    core = tokens[:, a : a + size_sp, b : b + size_sp]
    return core.reshape(core.shape[0], -1).T


def _encoder_basis(ctx: StageContext, grids: list, spots_sp: list[np.ndarray], encoder: dict, k: int):
    """Mean ``[D]`` and the top ``k`` principal directions ``[k, D]`` of the encoder's tokens over windows of
    ``BASIS_SP`` superpixels centred on ``BASIS_WINDOWS`` random spots of each section (seeded)."""
    rng = np.random.default_rng(0)
    tasks = []
    for grid, centres in zip(grids, spots_sp):
        kw = {**encoder, "shape_sp": (grid.h, grid.w)}
        for i in rng.choice(len(centres), min(BASIS_WINDOWS, len(centres)), replace=False):
            col, row = centres[i]
            corner = (int(np.clip(row - BASIS_SP // 2, 0, max(grid.h - BASIS_SP, 0))),
                      int(np.clip(col - BASIS_SP // 2, 0, max(grid.w - BASIS_SP, 0))))  # fmt: skip
            size = min(BASIS_SP, grid.h, grid.w)
            image = f"images/{grid.section}/{grid.level}"
            tasks.append(dask.delayed(_token_sample)(ctx.atlas.path, image, corner, size, kw, grid.factor))
    tokens = np.concatenate(ctx.compute(*tasks)).astype(np.float64)
    mean = tokens.mean(0)
    _, sv, vt = np.linalg.svd(tokens - mean, full_matrices=False)
    share = float((sv[:k] ** 2).sum() / max((sv**2).sum(), 1e-30))
    log.info("histology: encoder tokens from %d superpixels; %d components hold %.1f%% of their variance",
             len(tokens), k, 100 * share)  # fmt: skip
    return mean, vt[:k], share


def _footprint_task(store: str, source: str, centres_sp: np.ndarray, pick: np.ndarray, tile, halo, radius_sp):
    from ..kernels.enhance import footprint_means

    arr = arrays.open_root(store, "r")[source]
    _, h, w = arr.shape
    (y0, y1), (x0, x1) = tile
    a0, a1, b0, b1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
    block = np.asarray(arr[:, a0:a1, b0:b1], np.float64)
    means, count = footprint_means(block, centres_sp, radius_sp, origin=(a0, b0))
    squares, _ = footprint_means(block * block, centres_sp, radius_sp, origin=(a0, b0))
    return pick, means, squares, count


def footprint_grid_means(ctx: StageContext, source: str, centres_sp: np.ndarray, radius_sp: float):
    """Footprint means ``[n, C]`` of the grid array ``source`` ``[C, h, w]`` and of its squares at ``centres_sp``
    (col, row), one task per ``TILE`` tile holding centres (read with a halo that holds the footprints), and the
    superpixels counted ``[n]``."""
    halo = int(math.ceil(radius_sp)) + 2
    ty = np.floor(centres_sp[:, 1] / TILE).astype(np.int64)
    tx = np.floor(centres_sp[:, 0] / TILE).astype(np.int64)
    tasks = []
    for key in sorted(set(zip(ty.tolist(), tx.tolist()))):
        pick = np.flatnonzero((ty == key[0]) & (tx == key[1]))
        tile = ((key[0] * TILE, (key[0] + 1) * TILE), (key[1] * TILE, (key[1] + 1) * TILE))
        tasks.append(
            dask.delayed(_footprint_task, pure=False)(
                ctx.atlas.path, source, centres_sp[pick], pick, tile, halo, radius_sp
            )
        )
    C = ctx.atlas.root[source].shape[0]
    out = np.full((len(centres_sp), C), np.nan)
    sq = np.full((len(centres_sp), C), np.nan)
    count = np.zeros(len(centres_sp), np.int64)
    for pick, means, squares, cnt in ctx.compute(*tasks):
        out[pick], sq[pick], count[pick] = means, squares, cnt
    return out, sq, count


# -------------------------------------------------------------------------------------------- build
def _build(ctx: StageContext) -> dict:
    from ..kernels.enhance import N_FEATURES, context_features, feature_halo
    from ..store.elements import HistologySectionV1

    atlas, opts, group, prep = ctx.atlas, ctx.options, ctx.group, ctx.prepared
    sections = list(prep["sections"])
    radius_um = float(prep["spot_diameter_um"]) / 2
    secs = atlas.sections
    grids = [_grid(atlas, sid, opts.superpixel_um) for sid in sections]
    encoder, k, share = None, 0, None
    if opts.encoder is not None:
        from ..encoders import vit_encoder
        from ..kernels.vit import token_halo

        model = vit_encoder(opts.encoder, opts.encoder_heads)
        encoder = {"path": opts.encoder, "heads": opts.encoder_heads, "halo_sp": token_halo(model.grid)}
        spots_sp = []
        for grid in grids:
            row = secs[secs.id == grid.section].iloc[0]
            a, b = int(row.cell_start), int(row.cell_stop)
            spots_sp.append(grid.centres(np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]]))
        k = int(opts.encoder_dims)
        mean_t, comps, share = _encoder_basis(ctx, grids, spots_sp, encoder, k)
        encoder.update(mean=mean_t, components=comps)
    n_base = N_FEATURES + k
    n_ctx = n_base * (1 + len(CONTEXT_RADII))
    n, chunk = atlas.n_cells, atlas.cell_chunk
    cells = group.create_group("cells")
    spot = arrays.create(cells, "features", (n, n_ctx), np.float32, (chunk, n_ctx), ("cell", "feature"))
    spots = 0
    moments, superpixels = np.zeros((2, n_ctx)), 0  # sums of the features and their squares over the footprints
    for sid, grid in zip(sections, grids):
        g = group.create_group(sid)
        image, kw = f"images/{sid}/{grid.level}", {"px_um": grid.px_um, "factor": grid.factor}
        halo = feature_halo(grid.px_um)
        if encoder is not None:
            kw["encoder"] = {**encoder, "shape_sp": (grid.h, grid.w)}
            halo = max(halo, encoder["halo_sp"] * grid.factor)
        grid_map(
            ctx, grid, g, superpixel_features, image, "pixels", n_base, "feature",
            factor=grid.factor, halo=halo, with_origin=True, kwargs=kw,
        )  # fmt: skip
        sig_sp = {"sigmas_sp": tuple(k * radius_um / grid.sp_um for k in CONTEXT_RADII)}
        grid_map(ctx, grid, g, context_features, f"{g.path}/pixels", "features", n_ctx, "feature", kwargs=sig_sp)
        del g["pixels"]
        row = secs[secs.id == sid].iloc[0]
        a, b = int(row.cell_start), int(row.cell_stop)
        xy = np.c_[atlas.root["cells/x"][a:b], atlas.root["cells/y"][a:b]].astype(np.float64)
        means, squares, count = footprint_grid_means(
            ctx, f"{g.path}/features", grid.centres(xy), radius_um / grid.sp_um
        )
        inside = count > 0
        moments += np.stack(
            [(means[inside] * count[inside, None]).sum(0), (squares[inside] * count[inside, None]).sum(0)]
        )
        superpixels += int(count[inside].sum())
        outside = count == 0
        if outside.mean() > MAX_OUTSIDE:
            src = atlas.image(sid)["source"] or f"images/{sid}"
            raise InputError(
                f"histology: {int(outside.sum())} of {b - a} spots of section {sid!r} lie outside its image ({src}, "
                f"{grid.w * grid.factor} x {grid.h * grid.factor} px at level {grid.level}): the image or its pixel "
                f"size / image_to_section does not match the spots; fix them with lamina.add_image(atlas, {sid!r}, "
                f"path, pixel_size_um=... | image_to_section=...)"
            )
        # whole chunks over the section's rows; a chunk it shares with a neighbouring section is read back and
        # completed (sections are written one after another here, never concurrently)
        for c0 in range(a // chunk * chunk, b, chunk):
            c1 = min(n, c0 + chunk)
            block = np.asarray(spot[c0:c1]) if c0 < a or c1 > b else np.full((c1 - c0, n_ctx), np.nan, np.float32)
            lo, hi = max(a, c0), min(b, c1)
            block[lo - c0 : hi - c0] = means[lo - a : hi - a]
            spot[c0:c1] = block
        spots += int((~outside).sum())
        g.attrs.update(
            {
                "section": sid,
                "superpixel_um": grid.sp_um,
                "grid_to_section": grid.grid_to_um.tolist(),
                "image_level": grid.level,
                "pixels_per_superpixel": grid.factor,
                "spot_radius_um": radius_um,
            }
        )
        HistologySectionV1.stamp(g)
    ensure(superpixels > 0, "histology: no spot lies inside an image")
    mean = moments[0] / superpixels
    arrays.write_small(group, "feature_mean", mean, ("feature",))
    arrays.write_small(group, "feature_scale", np.sqrt(np.maximum(moments[1] / superpixels - mean**2, 0)), ("feature",))
    group.attrs.update(
        {
            "sections": sections,
            "spot_diameter_um": float(prep["spot_diameter_um"]),
            "spot_pitch_um": float(prep["spot_pitch_um"]),
            "feature_names": feature_names(k),
        }
    )
    out = {"sections": len(sections), "spots_inside_images": spots, "features": n_ctx}
    if share is not None:
        out["encoder_variance_kept"] = round(share, 4)
    return out


def feature_names(encoder_dims: int = 0) -> list[str]:
    """Names of the features: the weight-free ones, the encoder's components, then both at each context scale."""
    from ..kernels.enhance import CHANNELS, N_FEATURES

    base = []
    for c in CHANNELS:
        base += [f"{c}_gauss{k}" for k in range(3)] + [f"{c}_grad{k}" for k in range(2)]
        base += [f"{c}_log{k}" for k in range(2)]
    base += ["haematoxylin_sd", "eosin_sd", "grey_sd"]
    ensure(len(base) == N_FEATURES, "histology: feature names out of step with the kernel")
    base += [f"encoder_pc{i}" for i in range(encoder_dims)]
    return base + [f"{f}@{r:g}r" for r in CONTEXT_RADII for f in base]


STAGE = Stage(
    name="histology",
    output="histology",
    inputs=(),
    options=HistologyOptions,
    version=1,
    summary=(
        "Weight-free H&E features per superpixel (colour deconvolution, a filter bank at 2-8 um, context at 1x and "
        "3x the spot radius) -> /histology/<section>/features [feature, y, x] and each spot's footprint mean "
        "/histology/cells/features."
    ),
    build=_build,
    element="lamina.histology",
    pipeline="enhance",
    check=_check,
    prepare=_prepare,
)
histology = STAGE.function

"""A section's image in the atlas frame: its histology resampled through the same transforms as its cells.

``image_in_atlas`` gives a lazy ``xarray.DataArray`` ``[c, y, x]`` on a regular grid of the atlas frame (um
coordinates, the atlas's z in the attrs): each dask chunk maps its pixel centres back to the section
(``transforms.invert_stored``: the refined displacement's inverse grid, then the affine's inverse), then to the
image pyramid's level whose pixel is the finest not finer than half the requested one, reads only the pixels
under the chunk and samples them bilinearly (``kernels.resample.bilinear``). Nothing is decoded whole, so a
whole slide can be viewed (napari, matplotlib on a slice) or written (``export_image``: a tiled, pyramid-less
BigTIFF, tile row by tile row) at any size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .kernels.geometry import apply_affine
from .kernels.resample import bilinear
from .store.arrays import open_root
from .store.atlas import Atlas
from .transforms import STAGES, apply_stored, invert_stored, transform_group

#: points per image edge mapped to the atlas to find the image's extent there (a warp bends the edges)
EDGE_POINTS = 65


def _level(pixel_size_um: float, px0: float, n_levels: int) -> int:
    """The coarsest level whose pixel is at most the requested one (no level is shrunk more than 2x)."""
    level = 0
    while level + 1 < n_levels and px0 * 2 ** (level + 1) <= pixel_size_um * (1 + 1e-9):
        level += 1
    return level


def _extent(src, k: int, image_to_section: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """(xmin, ymin, xmax, ymax) um of the level-0 image's outline in the atlas frame."""
    H, W = shape_yx
    t = np.linspace(0.0, 1.0, EDGE_POINTS)
    edge = np.concatenate([np.c_[t * W, 0 * t], np.c_[t * W, H + 0 * t], np.c_[0 * t, t * H], np.c_[W + 0 * t, t * H]])
    pts = apply_stored(src, k, apply_affine(image_to_section, edge))
    return np.r_[pts.min(0), pts.max(0)]


def _block(
    store: str,
    level_path: str,
    transforms: str,
    k: int,
    section_to_level: np.ndarray,
    x0: float,
    y0: float,
    pixel_size_um: float,
    fill: float,
    dtype,
    block_info=None,
) -> np.ndarray:
    """One output chunk: atlas pixel centres -> section um -> level pixel centres -> bilinear samples."""
    (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    root = open_root(store, "r")
    image = root[level_path]
    C, H, W = image.shape
    rows, cols = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    atlas_xy = np.c_[x0 + (cols.ravel() + 0.5) * pixel_size_um, y0 + (rows.ravel() + 0.5) * pixel_size_um]
    # corner-based pixel coordinates of the level (image_to_section's convention) -> centre-based (the kernel's)
    uv = apply_affine(section_to_level, invert_stored(root[transforms], k, atlas_xy)) - 0.5
    out_shape = (C, r1 - r0, c1 - c0)
    inside = (uv[:, 0] >= -0.5) & (uv[:, 0] <= W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= H - 0.5)
    if not inside.any():
        return np.full(out_shape, fill, dtype)
    lo = np.maximum(np.floor(uv[inside].min(0)).astype(np.int64) - 1, 0)
    hi = np.minimum(np.ceil(uv[inside].max(0)).astype(np.int64) + 2, (W, H))
    region = np.asarray(image[:, lo[1] : hi[1], lo[0] : hi[0]])
    u, v = uv[:, 0] - lo[0], uv[:, 1] - lo[1]
    u[~inside] = -1.0  # outside the whole image, not only outside the region read
    sampled = bilinear(region, u.reshape(out_shape[1:]), v.reshape(out_shape[1:]), fill)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        sampled = np.clip(np.rint(sampled), info.min, info.max)
    return sampled.astype(dtype)


def image_in_atlas(
    atlas: Atlas | str | os.PathLike,
    section,
    *,
    pixel_size_um: float | None = None,
    stage: str = "auto",
    bounds=None,
    chunk: int = 1024,
    fill: float = 0,
):
    """``section``'s image (index or id) in the atlas frame, lazily: an ``xarray.DataArray`` ``[c, y, x]``
    (dask-backed, chunks of ``chunk`` px) whose ``x`` / ``y`` coordinates are atlas um at the pixel centres.

    ``pixel_size_um``: the output pixel (default: the image's own level-0 pixel); ``stage``: the transforms
    (``auto``: refined when refine ran, else affine; ``refined``; ``affine``); ``bounds``: (xmin, ymin, xmax,
    ymax) atlas um (default: the warped image's outline); ``fill``: the value outside the image. Integer images
    stay integer (rounded). Attrs: ``section``, ``z_um``, ``pixel_size_um``, ``stage``, ``image_level``.
    """
    import dask.array as da
    import xarray as xr

    atlas = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    k = atlas.section_index(section)
    sid = str(atlas.sections.id.iloc[k])
    img = atlas.image(sid)
    src = transform_group(atlas, stage)
    px0 = img["pixel_size_um"]
    pixel = px0 if pixel_size_um is None else float(pixel_size_um)
    if not (np.isfinite(pixel) and pixel > 0):
        raise InputError(f"image_in_atlas: pixel_size_um must be a positive number of um, got {pixel_size_um!r}")
    if int(chunk) < 16:
        raise InputError(f"image_in_atlas: chunk must be at least 16 px, got {chunk}")
    levels = img["levels"]
    level = _level(pixel, px0, len(levels))
    image_to_section = np.asarray(img["image_to_section"], np.float64)
    if bounds is None:
        bounds = _extent(src, k, image_to_section, levels[0].shape[1:])
    b = np.asarray(bounds, np.float64)
    if b.shape != (4,) or not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        raise InputError(f"image_in_atlas: bounds must be finite (xmin, ymin, xmax, ymax) with max > min, got {bounds}")
    x0, y0 = np.floor(b[:2] / pixel) * pixel
    nx, ny = int(np.ceil((b[2] - x0) / pixel)), int(np.ceil((b[3] - y0) / pixel))
    C, dtype = levels[level].shape[0], np.dtype(levels[level].dtype)
    section_to_level = np.diag([2.0**-level, 2.0**-level, 1.0]) @ np.linalg.inv(image_to_section)
    chunks = ((C,), da.core.normalize_chunks(int(chunk), (ny,))[0], da.core.normalize_chunks(int(chunk), (nx,))[0])
    name = next(key for key, group in STAGES.items() if group == src.basename)
    data = da.map_blocks(
        _block,
        atlas.path,
        f"images/{sid}/{level}",
        src.path,
        k,
        section_to_level,
        float(x0),
        float(y0),
        pixel,
        float(fill),
        dtype,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype),
        name=f"image-in-atlas-{sid}-{name}",
    )
    return xr.DataArray(
        data,
        dims=("c", "y", "x"),
        coords={"y": y0 + (np.arange(ny) + 0.5) * pixel, "x": x0 + (np.arange(nx) + 0.5) * pixel},
        name=f"image_{sid}",
        attrs={
            "section": sid,
            "z_um": float(atlas.sections.z.iloc[k]),
            "pixel_size_um": pixel,
            "stage": name,
            "image_level": level,
            "units": "um",
        },
    )


def export_image(atlas: Atlas | str | os.PathLike, section, out, *, tile: int = 512, **kwargs) -> Path:
    """Write ``section``'s image in the atlas frame (:func:`image_in_atlas`, ``kwargs`` passed on) to ``out``, a
    tiled BigTIFF (RGB when it has 3 uint8 channels), one row of tiles in memory at a time; the pixel size is
    in the resolution tags (um) and ``ImageDescription``. Written to a temporary name, renamed when complete."""
    import tifffile

    if int(tile) % 16 or int(tile) < 16:
        raise InputError(f"export_image: tile must be a multiple of 16 px, got {tile}")
    tile = int(tile)
    arr = image_in_atlas(atlas, section, chunk=tile, **kwargs)
    C, ny, nx = arr.shape
    rgb = C == 3 and arr.dtype == np.uint8

    def tiles():
        for r in range(0, ny, tile):
            row = np.asarray(arr.data[:, r : r + tile].compute())
            for c in range(0, nx, tile):
                block = np.zeros((C, tile, tile), arr.dtype)
                part = row[:, :, c : c + tile]
                block[:, : part.shape[1], : part.shape[2]] = part
                yield np.moveaxis(block, 0, -1) if rgb else block

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    per_cm = 1e4 / arr.attrs["pixel_size_um"]
    tifffile.imwrite(
        tmp,
        tiles(),
        shape=(ny, nx, C) if rgb else (C, ny, nx),
        dtype=arr.dtype,
        tile=(tile, tile),
        photometric="rgb" if rgb else "minisblack",
        planarconfig="contig" if rgb else "separate",
        bigtiff=True,
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
        description=(
            f"lamina image of section {arr.attrs['section']} in the atlas frame ({arr.attrs['stage']}); "
            f"pixel {arr.attrs['pixel_size_um']} um; origin x {float(arr.x[0])} um, y {float(arr.y[0])} um "
            f"(first pixel's centre); z {arr.attrs['z_um']} um"
        ),
        metadata=None,
    )
    os.replace(tmp, out)
    return out

"""Cells -> density images on a regular grid (NumPy).

Grid convention everywhere in lamina: pixel ``(i, j)`` of an ``[.., H, W]`` image has its centre at
``(x, y) = origin + (j * spacing, i * spacing)`` in micrometres; x runs along columns, y along rows.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def splat(
    x: np.ndarray,
    y: np.ndarray,
    channel: np.ndarray | None,
    n_channels: int,
    origin,
    spacing: float,
    shape: tuple[int, int],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Bilinear scatter-add of one unit of mass per cell onto a ``[C, H, W]`` float32 grid.

    Each cell at ``f = (p - origin) / spacing`` (pixel units) spreads its mass over the 4 surrounding pixel
    centres with weights ``(1 - fx)(1 - fy)``, ``fx (1 - fy)``, ... so the image integrates to the number of
    cells inside the grid and the centre of mass is exact. Cells with ``channel < 0`` or outside are dropped.
    ``weights`` ``[n, C]`` (instead of ``channel``) splits each cell's mass over the channels: channel ``c``
    gets ``weights[:, c]`` of it (rows summing to 1 keep the total image a cell density).
    """
    H, W = shape
    fx = (np.asarray(x, np.float64) - origin[0]) / spacing
    fy = (np.asarray(y, np.float64) - origin[1]) / spacing
    c = np.zeros(len(fx), np.int64) if channel is None else np.asarray(channel, np.int64)
    j0, i0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    wx, wy = fx - j0, fy - i0
    out = np.zeros(n_channels * H * W, np.float64)
    for di, dj, w in ((0, 0, (1 - wx) * (1 - wy)), (0, 1, wx * (1 - wy)), (1, 0, (1 - wx) * wy), (1, 1, wx * wy)):
        i, j = i0 + di, j0 + dj
        ok = (i >= 0) & (i < H) & (j >= 0) & (j < W) & (c >= 0)
        pixel = i[ok] * W + j[ok]
        if weights is None:
            out += np.bincount(c[ok] * H * W + pixel, weights=w[ok], minlength=out.size)
        else:
            for k in range(n_channels):
                out[k * H * W : (k + 1) * H * W] += np.bincount(pixel, weights=w[ok] * weights[ok, k], minlength=H * W)
    return out.reshape(n_channels, H, W).astype(np.float32)


def expression_channels(pcs: np.ndarray, sd: np.ndarray, share: float = 0.75) -> np.ndarray:
    """Channel shares ``[n, 2k]`` of cells from their first ``k`` principal components ``[n, k]``.

    With ``z = pcs / sd`` (``sd`` ``[k]``: each component's spread), ``share`` of each cell's unit of mass
    is split over the channels ``(z_1+, z_1-, ..., z_k+, z_k-)`` in proportion to ``max(z, 0)`` and
    ``max(-z, 0)``: ``w = share * [z+, z-] / sum|z|`` (a cell exactly at ``z = 0`` is spread evenly). The
    remaining ``1 - share`` goes to the cell's identity channels (its type, or one density channel), so that
    like one-hot types the shares are non-negative and sum to 1 and the summed image stays the cell density.
    """
    z = np.asarray(pcs, np.float64) / np.maximum(np.asarray(sd, np.float64), 1e-12)
    w = np.empty((len(z), 2 * z.shape[1]))
    w[:, 0::2], w[:, 1::2] = np.maximum(z, 0.0), np.maximum(-z, 0.0)
    total = w.sum(1, keepdims=True)
    return share * np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / w.shape[1])


def normalise_density(img: np.ndarray) -> np.ndarray:
    """``img`` ``[C, H, W]`` divided by its mean total density over tissue, so rasters whose densities differ
    10x weigh alike: tissue = pixels whose channel sum exceeds a tenth of the maximum (all non-zero pixels
    when the image is empty or flat). Same shape and dtype."""
    total = img.sum(0)
    tissue = total > 0.1 * total.max() if total.max() > 0 else total > 0
    level = total[tissue].mean() if tissue.any() else 1.0
    return img / max(level, 1e-12)


def tissue_points(img: np.ndarray, px_to_um: np.ndarray, max_points: int = 400) -> np.ndarray:
    """Up to ``max_points`` (x, y) um ``[n, 2]`` of tissue pixels of ``img`` ``[C, H, W]``: pixels whose
    channel sum exceeds a fifth of the maximum, strided evenly in raster order, mapped by ``px_to_um``
    (3x3, pixel (col, row) -> um)."""
    from .geometry import apply_affine

    total = img.sum(0)
    rows, cols = np.nonzero(total > 0.2 * total.max()) if total.max() > 0 else (np.array([]), np.array([]))
    step = max(1, len(rows) // max_points)
    return apply_affine(px_to_um, np.stack([cols[::step], rows[::step]], 1).astype(np.float64))


TRUNCATE = 4.0


def smooth(images: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of each ``[.., H, W]`` image plane with standard deviation ``sigma_px`` pixels.

    Convention: the image is zero outside; the kernel is cut at ``TRUNCATE`` standard deviations, so an
    output pixel depends on the input within :func:`smooth_halo` pixels of it and on nothing further.
    Shape ``[.., H, W]`` -> ``[.., H, W]`` float32.
    """
    if sigma_px <= 0:
        return images
    sigma = (0,) * (images.ndim - 2) + (sigma_px, sigma_px)
    return ndimage.gaussian_filter(images, sigma=sigma, mode="constant", truncate=TRUNCATE).astype(np.float32)


def smooth_halo(sigma_px: float) -> int:
    """Pixels of input around an output pixel that :func:`smooth` reads: scipy's kernel radius
    ``int(TRUNCATE * sigma + 0.5)`` (0 for no blur). A tiled blur with this halo equals the untiled one."""
    return int(TRUNCATE * float(sigma_px) + 0.5) if sigma_px > 0 else 0

"""Per-group reductions over cells, as partial sums that add across chunks (tree-reducible)."""

from __future__ import annotations

import numpy as np


def group_moments(groups: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Partial sums per group for centroids and spreads.

    groups ``[n]`` int in ``[0, n_groups)``; x, y ``[n]`` um. Returns ``[n_groups, 5]`` float64 with columns
    ``(count, sum x, sum y, sum x^2, sum y^2)``; add the results of several chunks to combine them.
    """
    g = np.asarray(groups, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cols = [np.ones_like(x), x, y, x * x, y * y]
    return np.stack([np.bincount(g, weights=c, minlength=n_groups) for c in cols], axis=1)


def group_extents(groups: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    """Bounding box per group: ``[n_groups, 4]`` (xmin, xmax, ymin, ymax); +inf/-inf for empty groups.

    Combine chunks with an element-wise min on columns 0, 2 and max on 1, 3.
    """
    out = np.empty((n_groups, 4))
    out[:, [0, 2]] = np.inf
    out[:, [1, 3]] = -np.inf
    g = np.asarray(groups, dtype=np.int64)
    np.minimum.at(out[:, 0], g, x)
    np.maximum.at(out[:, 1], g, x)
    np.minimum.at(out[:, 2], g, y)
    np.maximum.at(out[:, 3], g, y)
    return out


def group_category_counts(groups: np.ndarray, codes: np.ndarray, n_groups: int, n_categories: int) -> np.ndarray:
    """Counts of each category code per group: ``[n_groups, n_categories]`` int64 (codes < 0 are missing)."""
    g = np.asarray(groups, dtype=np.int64)
    c = np.asarray(codes, dtype=np.int64)
    ok = c >= 0
    flat = np.bincount(g[ok] * n_categories + c[ok], minlength=n_groups * n_categories)
    return flat.reshape(n_groups, n_categories)

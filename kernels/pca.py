"""PCA projection and inversion: the two linear maps between gene space and PC space.

With per-gene mean ``mu`` [G], scale ``s`` [G] and orthonormal components ``C`` [P, G] (rows = PCs)::

    project:  pcs = ((X - mu) / s) C^T          X [n, G]  ->  pcs [n, P]
    invert:   X^  = (pcs C) * s + mu            pcs [n, P] ->  X^ [n, G]

``invert_volume`` is the same map applied to a voxel block ``[P, z, y, x]`` -> ``[G, z, y, x]`` as one
tensordot (a block matmul), so a volume chunk never needs reshaping into per-voxel rows.
"""

from __future__ import annotations

import numpy as np


def project(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``[n, G]`` expression -> ``[n, P]`` PCs (float32)."""
    Z = (np.asarray(X, np.float32) - mean.astype(np.float32)) / scale.astype(np.float32)
    return (Z @ components.astype(np.float32).T).astype(np.float32)


def invert(pcs: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``[n, P]`` PCs -> ``[n, G]`` expression (float32)."""
    return (
        (np.asarray(pcs, np.float32) @ components.astype(np.float32)) * scale.astype(np.float32)
        + mean.astype(np.float32)
    ).astype(np.float32)


def invert_volume(pcs: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``[P, z, y, x]`` mean PCs per voxel -> ``[G, z, y, x]`` expression (float32); NaN voxels stay NaN.

    ``components`` may be a gene slice ``[P, g]`` with the matching ``mean``/``scale`` slices ``[g]``.
    """
    out = np.tensordot(components.astype(np.float32).T, np.asarray(pcs, np.float32), axes=(1, 0))
    shape = (-1,) + (1,) * (out.ndim - 1)
    out *= scale.astype(np.float32).reshape(shape)
    out += mean.astype(np.float32).reshape(shape)
    return out


def safe_scale(std: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Per-gene scale for standardisation: the std, with constant genes given scale 1 (not 0 -> inf)."""
    std = np.asarray(std, np.float64)
    return np.where(std > floor, std, 1.0)

"""Planar geometry: affine maps and smooth analytic displacement fields (NumPy, float64).

Coordinates are micrometres in every function here. Points are ``[n, 2]`` arrays of (x, y).
"""

from __future__ import annotations

import numpy as np


def affine_matrix(
    rotation_rad: float, scale: float, translation, center=(0.0, 0.0), reflect: bool = False
) -> np.ndarray:
    """Homogeneous 3x3 matrix of ``p -> s R (p - c) + c + t`` (optionally reflected in x first).

    ``R`` is the counter-clockwise rotation by ``rotation_rad``; ``s`` an isotropic scale; ``c`` the
    rotation centre and ``t`` the translation, both in um.
    """
    c, s = np.cos(rotation_rad), np.sin(rotation_rad)
    linear = scale * np.array([[c, -s], [s, c]])
    if reflect:
        linear = linear @ np.diag([-1.0, 1.0])
    center = np.asarray(center, dtype=np.float64)
    out = np.eye(3)
    out[:2, :2] = linear
    out[:2, 2] = center - linear @ center + np.asarray(translation, dtype=np.float64)
    return out


def grid_to_um(spacing: float, origin) -> np.ndarray:
    """3x3 map from grid pixel (col, row, 1) to (x, y, 1) um of a grid with pixel ``spacing`` um whose pixel
    (0, 0) is centred at ``origin`` (the grid convention of :mod:`lamina.kernels.raster`)."""
    return np.array([[float(spacing), 0.0, float(origin[0])], [0.0, float(spacing), float(origin[1])], [0.0, 0.0, 1.0]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``q = A[:2, :2] p + A[:2, 2]`` for points ``[n, 2]``; returns ``[n, 2]`` in the dtype of ``points``."""
    points = np.asarray(points)
    out = points @ matrix[:2, :2].T.astype(points.dtype) + matrix[:2, 2].astype(points.dtype)
    return out


def fourier_displacement(
    points: np.ndarray, wavevectors: np.ndarray, phases: np.ndarray, amplitudes: np.ndarray
) -> np.ndarray:
    """Smooth displacement ``u(p) = sum_m a_m sin(k_m . p + phi_m)``.

    points ``[n, 2]`` um; wavevectors ``[M, 2]`` rad/um; phases ``[M]`` rad; amplitudes ``[M, 2]`` um.
    Returns ``[n, 2]`` um. Its Lipschitz constant is at most ``sum_m |k_m| |a_m|``.
    """
    return np.sin(points @ wavevectors.T + phases) @ amplitudes


def fourier_lipschitz(wavevectors: np.ndarray, amplitudes: np.ndarray) -> float:
    """Upper bound ``sum_m |k_m| |a_m|`` of the Lipschitz constant of :func:`fourier_displacement`."""
    return float(np.sum(np.linalg.norm(wavevectors, axis=1) * np.linalg.norm(amplitudes, axis=1)))


def invert_displacement(
    targets: np.ndarray,
    wavevectors: np.ndarray,
    phases: np.ndarray,
    amplitudes: np.ndarray,
    tol_um: float = 1e-9,
    max_iter: int = 200,
) -> np.ndarray:
    """Solve ``p + u(p) = q`` for ``p`` given targets ``q`` ``[n, 2]`` (um).

    Fixed-point iteration ``p <- q - u(p)``; it contracts because ``Lip(u) < 1`` (checked), so the error
    shrinks by at least that factor per step. Stops when every point moved less than ``tol_um``.
    """
    lip = fourier_lipschitz(wavevectors, amplitudes)
    if lip >= 1.0:
        raise ValueError(f"displacement is not invertible by fixed point: Lipschitz bound {lip:.3f} >= 1")
    targets = np.asarray(targets, dtype=np.float64)
    p = targets.copy()
    for _ in range(max_iter):
        nxt = targets - fourier_displacement(p, wavevectors, phases, amplitudes)
        step = np.max(np.abs(nxt - p)) if len(p) else 0.0
        p = nxt
        if step < tol_um:
            break
    return p

"""Globally consistent section transforms from redundant pairwise estimates (NumPy, small dense solve)."""

from __future__ import annotations

import numpy as np

from .geometry import apply_affine


def _design(p: np.ndarray) -> np.ndarray:
    """``[m, 2]`` points -> ``[2m, 6]`` so that ``design(p) @ theta`` stacks ``A p`` for affine rows ``theta``."""
    m = len(p)
    out = np.zeros((2 * m, 6))
    out[0::2, 0:2], out[0::2, 2] = p, 1.0
    out[1::2, 3:5], out[1::2, 5] = p, 1.0
    return out


def _theta(A: np.ndarray) -> np.ndarray:
    return A[:2, :].reshape(-1)


def joint_affines(
    n: int,
    reference: int,
    pairs: list[tuple[int, int, np.ndarray, float, np.ndarray]],
    prior: np.ndarray,
    prior_weight: float = 1e-4,
) -> np.ndarray:
    """Section affines ``G_k`` (``[n, 3, 3]``, ``G_reference = I``) that best agree with all pairwise estimates.

    Each pair ``(k, j, A_kj, w, P_k)`` says that section k's points ``P_k`` ``[m, 2]`` land, in section j's
    frame, at ``A_kj P_k``; consistency asks ``G_k p = G_j A_kj p``. We minimise
    ``sum_pairs w sum_p |G_k p - G_j A_kj p|^2 + prior_weight sum_k |theta_k - theta(prior_k)|^2 * m``, a linear
    least-squares problem in the 6 affine parameters of every section (normal equations, ``6n x 6n``).
    Pairs of non-adjacent sections pull independent pair errors back, so they do not add up along z; a bias
    that every pair shares (a structure moving steadily through the stack) is shared by them too and stays.
    """
    dim = 6 * n
    N = np.zeros((dim, dim))
    b = np.zeros(dim)
    ref_theta = _theta(np.eye(3))
    scale = 0.0
    for k, j, A, w, P in pairs:
        if w <= 0 or len(P) == 0:
            continue
        Q = apply_affine(A, P)
        Dk, Dj = _design(P), -_design(Q)
        blocks = [(k, Dk), (j, Dj)]
        for a, Da in blocks:
            for c, Dc in blocks:
                N[6 * a : 6 * a + 6, 6 * c : 6 * c + 6] += w * Da.T @ Dc
        scale = max(scale, w * len(P))
    reg = prior_weight * max(scale, 1.0)
    for k in range(n):
        N[6 * k : 6 * k + 6, 6 * k : 6 * k + 6] += reg * np.eye(6)
        b[6 * k : 6 * k + 6] += reg * _theta(prior[k])
    # the reference is fixed: move its columns to the right-hand side and drop its rows
    free = np.array([i for i in range(dim) if i // 6 != reference])
    fixed = np.arange(6 * reference, 6 * reference + 6)
    rhs = b[free] - N[np.ix_(free, fixed)] @ ref_theta
    theta = np.linalg.solve(N[np.ix_(free, free)], rhs)
    out = np.repeat(np.eye(3)[None], n, axis=0)
    full = np.zeros(dim)
    full[free], full[fixed] = theta, ref_theta
    out[:, :2, :] = full.reshape(n, 2, 3)
    return out


def chain(n: int, reference: int, step: dict) -> np.ndarray:
    """Compose adjacent transforms middle-out: ``G_k = G_{k -+ 1} A_{k -> k -+ 1}`` from ``G_reference = I``.

    ``step[k]`` is ``A_{k -> neighbour towards the reference}`` (3x3).
    """
    G = np.repeat(np.eye(3)[None], n, axis=0)
    for k in range(reference + 1, n):
        G[k] = G[k - 1] @ step[k]
    for k in range(reference - 1, -1, -1):
        G[k] = G[k + 1] @ step[k]
    return G

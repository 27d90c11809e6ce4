"""Robust planar transform estimation from point correspondences (NumPy, vectorised over hypotheses).

Transforms are 3x3 homogeneous matrices mapping ``src`` points to ``dst`` points (same units as the points).
"""

from __future__ import annotations

import numpy as np

from .geometry import apply_affine


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine ``dst ~ A src`` from ``n >= 3`` pairs ``[n, 2]``."""
    X = np.column_stack([src, np.ones(len(src))])
    M, *_ = np.linalg.lstsq(X, dst, rcond=None)
    out = np.eye(3)
    out[:2, :] = M.T
    return out


def fit_similarity(src: np.ndarray, dst: np.ndarray, reflect: bool = False) -> np.ndarray:
    """Least-squares similarity (rotation, isotropic scale, translation; optionally a reflection) by Umeyama.

    Minimises ``sum |s R src_i + t - dst_i|^2``; with ``reflect`` the rotation is replaced by a reflection.
    """
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    if reflect:
        a = a * np.array([-1.0, 1.0])
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    D = np.diag([1.0, d])
    R = U @ D @ Vt
    var = (a**2).sum() / len(src)
    s = (S * np.diag(D)).sum() / var if var > 0 else 1.0
    lin = s * R @ (np.diag([-1.0, 1.0]) if reflect else np.eye(2))
    out = np.eye(3)
    out[:2, :2] = lin
    out[:2, 2] = mu_d - lin @ mu_s
    return out


def _similarity_hypotheses(src, dst, pairs, reflect):
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    if reflect:
        z = np.conj(z)
    z1, z2, w1, w2 = z[pairs[:, 0]], z[pairs[:, 1]], w[pairs[:, 0]], w[pairs[:, 1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (w2 - w1) / (z2 - z1)
    b = w1 - a * z1
    lin = np.stack([np.stack([a.real, -a.imag], -1), np.stack([a.imag, a.real], -1)], -2)  # [M, 2, 2]
    if reflect:
        lin = lin @ np.diag([1.0, -1.0])  # conj(z) mirrors y
    return lin, np.stack([b.real, b.imag], -1)


def ransac(
    src: np.ndarray,
    dst: np.ndarray,
    threshold: float,
    model: str = "similarity",
    reflect: bool = False,
    hypotheses: int = 2000,
    scale_range: tuple = (0.5, 2.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC over ``hypotheses`` minimal samples at once; returns (transform refitted on inliers, inlier mask).

    ``model``: ``similarity`` (2-point samples; with ``reflect`` mirrored similarities are tried as well) or
    ``affine`` (3-point samples). Hypotheses whose scale lies outside ``scale_range`` are discarded (tissue
    does not shrink 2x between sections). ``threshold``: inlier residual in point units.
    """
    n = len(src)
    if n < (2 if model == "similarity" else 3):
        return np.eye(3), np.zeros(n, bool)
    rng = np.random.default_rng(seed)
    k = 2 if model == "similarity" else 3
    idx = np.argsort(rng.random((hypotheses, n)), axis=1)[:, :k] if n < 64 else rng.integers(0, n, (hypotheses, k))
    idx = idx[np.all(np.diff(np.sort(idx, 1), axis=1) > 0, axis=1)]
    cands = []
    if model == "similarity":
        for r in [False, True] if reflect else [False]:
            lin, t = _similarity_hypotheses(src, dst, idx, r)
            cands.append((lin, t, r))
    else:
        X = np.concatenate([src[idx], np.ones((len(idx), 3, 1))], axis=2)  # [M, 3, 3]
        ok = np.abs(np.linalg.det(X)) > 1e-9
        M = np.linalg.solve(X[ok], dst[idx][ok])  # [M, 3, 2]
        lin, t = M[:, :2, :].transpose(0, 2, 1), M[:, 2, :]
        dets = np.linalg.det(lin)
        keep = dets > 0 if not reflect else np.ones(len(dets), bool)
        cands.append((lin[keep], t[keep], bool(reflect)))
    best, best_count, best_reflect = None, -1, False
    for lin, t, r in cands:
        good = np.all(np.isfinite(lin.reshape(len(lin), -1)), axis=1)
        scale = np.sqrt(np.abs(np.linalg.det(lin)))
        good &= (scale > scale_range[0]) & (scale < scale_range[1])
        if not good.any():
            continue
        lin, t = lin[good], t[good]
        pred = np.einsum("mij,nj->mni", lin, src) + t[:, None, :]
        count = (np.linalg.norm(pred - dst[None], axis=2) < threshold).sum(1)
        m = int(np.argmax(count))
        if count[m] > best_count:
            best_count, best_reflect = int(count[m]), bool(r)
            best = np.eye(3)
            best[:2, :2], best[:2, 2] = lin[m], t[m]
    if best is None:
        return np.eye(3), np.zeros(n, bool)
    inliers = lambda T: np.linalg.norm(apply_affine(T, src) - dst, axis=1) < threshold  # noqa: E731
    for _ in range(2):  # refit on inliers, re-collect inliers
        inl = inliers(best)
        if inl.sum() < k:
            break
        best = (
            fit_similarity(src[inl], dst[inl], best_reflect)
            if model == "similarity"
            else fit_affine(src[inl], dst[inl])
        )
    return best, inliers(best)


def rigid_align(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``points`` ``[n, 2]`` moved by the one rigid transform (rotation + translation, least squares, scale
    not removed) that best maps them onto ``truth`` ``[n, 2]``: rotated as the similarity fit says, centroids
    matched."""
    T = fit_similarity(points, truth)
    R = T[:2, :2] / np.sqrt(abs(np.linalg.det(T[:2, :2])))
    return (points - points.mean(0)) @ R.T + truth.mean(0)


def rigid_residuals(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-point distance ``[n]`` between ``points`` and ``truth`` ``[n, 2]`` after :func:`rigid_align`."""
    return np.linalg.norm(rigid_align(points, truth) - truth, axis=1)

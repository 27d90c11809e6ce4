"""Whole-image alignment of multi-channel rasters (torch, any device).

Images are ``[C, H, W]`` tensors on the grid convention of :mod:`lamina.kernels.raster`. Transforms returned
here map *moving pixel coordinates* ``(col, row)`` to *fixed pixel coordinates* as 3x3 float64 NumPy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

from .geometry import affine_matrix


def _pix_to_norm(H: int, W: int, device, dtype) -> torch.Tensor:
    """3x3 map from pixel (col, row) to grid_sample's normalised coordinates (align_corners=True)."""
    return torch.tensor(
        [[2.0 / max(W - 1, 1), 0, -1], [0, 2.0 / max(H - 1, 1), -1], [0, 0, 1]], device=device, dtype=dtype
    )


def warp_image(moving: torch.Tensor, A: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample ``moving`` ``[B, C, H, W]`` into the fixed frame: ``out(p) = moving(A^{-1} p)``.

    ``A`` ``[B, 3, 3]`` maps moving pixels to fixed pixels; bilinear, zero outside. Differentiable in ``A``.
    """
    B, C, H, W = moving.shape
    Hf, Wf = shape or (H, W)
    Nm, Nf = _pix_to_norm(H, W, A.device, A.dtype), _pix_to_norm(Hf, Wf, A.device, A.dtype)
    theta = (Nm @ torch.linalg.inv(A) @ torch.linalg.inv(Nf))[:, :2, :]
    grid = F.affine_grid(theta.to(moving.dtype), [B, C, Hf, Wf], align_corners=True)
    return F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised cross-correlation of two images of one shape (any number of channels), in [-1, 1]:
    ``sum (a - mean a)(b - mean b) / (|a - mean a| |b - mean b|)``, 0 when either is flat."""
    a, b = a.reshape(-1), b.reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-12))


def _search(fixed: torch.Tensor, moving: torch.Tensor, options: list, batch: int) -> dict:
    C, H, W = fixed.shape
    ctr = ((W - 1) / 2.0, (H - 1) / 2.0)
    # at least twice the image (no wrap-around), rounded up to a length FFTs are fast at (122 = 2 x 61 is not)
    ph, pw = next_fast_len(2 * H, real=True), next_fast_len(2 * W, real=True)
    Ff = torch.fft.rfft2(fixed.double(), s=(ph, pw))
    fnorm = torch.linalg.vector_norm(fixed.double())
    best = {"score": -1.0}
    for start in range(0, len(options), batch):
        opts = options[start : start + batch]
        A = torch.tensor(
            np.stack([affine_matrix(math.radians(a), 1.0, (0.0, 0.0), ctr, r) for a, r in opts]),
            dtype=torch.float64,
            device=fixed.device,
        )
        rot = warp_image(moving[None].double().expand(len(opts), -1, -1, -1), A)
        # the inverse transform is linear: summing the channels' spectra first takes one inverse per angle
        corr = torch.fft.irfft2((Ff[None] * torch.conj(torch.fft.rfft2(rot, s=(ph, pw)))).sum(1), s=(ph, pw))
        norm = fnorm * torch.linalg.vector_norm(rot.reshape(len(opts), -1), dim=1)
        peak, where = corr.reshape(len(opts), -1).max(1)
        score = (peak / norm.clamp_min(1e-12)).cpu().numpy()
        k = int(np.argmax(score))
        if score[k] > best["score"]:
            r_, c_ = divmod(int(where[k]), pw)
            T = np.eye(3)
            T[:2, 2] = (c_ if c_ < pw // 2 else c_ - pw, r_ if r_ < ph // 2 else r_ - ph)
            best = {
                "score": float(score[k]),
                "angle_deg": float(opts[k][0]),
                "reflect": bool(opts[k][1]),
                "transform": T @ A[k].cpu().numpy(),
            }
    return best


def rotation_search(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    step_deg: float = 4.0,
    reflect: bool = False,
    max_side: int = 64,
    batch: int = 32,
) -> dict:
    """Exhaustive rotation (x optional mirror) search with FFT cross-correlation for the translation.

    For every angle ``theta`` in ``[0, 360)`` (step ``step_deg``, then 1-degree steps around the best) the
    moving image is rotated about its centre and correlated with the fixed image over all translations at
    once: ``corr(s) = IFFT(sum_c FFT(f_c) conj(FFT(m_c)))(s)`` (zero-padded: no wrap-around). Runs on images
    average-pooled to at most ``max_side`` pixels (the refinement that follows recovers the detail).
    Returns ``transform`` (moving -> fixed pixels at full resolution), ``angle_deg``, ``reflect`` and
    ``score`` (normalised correlation peak in [0, 1]).
    """
    f = max(1, int(math.ceil(max(fixed.shape[-2:]) / max_side)))
    fc, mc = _blur_down(fixed[None].double(), f)[0], _blur_down(moving[None].double(), f)[0]
    mirrors = [False, True] if reflect else [False]
    best = _search(fc, mc, [(a, r) for r in mirrors for a in np.arange(0, 360, step_deg)], batch)
    fine = np.arange(best["angle_deg"] - step_deg, best["angle_deg"] + step_deg + 1e-9, 1.0) % 360
    best = max(best, _search(fc, mc, [(a, best["reflect"]) for a in fine], batch), key=lambda b: b["score"])
    S = _full_to_pooled(f)
    best["transform"] = np.linalg.inv(S) @ best["transform"] @ S
    return best


def _full_to_pooled(f: int) -> np.ndarray:
    """Pixel map full -> pooled by ``f``: pooled pixel i covers full pixels ``f i .. f i + f - 1``."""
    return np.array([[1.0 / f, 0, -(f - 1) / (2.0 * f)], [0, 1.0 / f, -(f - 1) / (2.0 * f)], [0, 0, 1.0]])


def _blur_down(img: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return img
    return F.avg_pool2d(img, factor, ceil_mode=True)


def _linear(D: torch.Tensor, rigid: bool) -> torch.Tensor:
    """The 2x2 change of the refinement: ``I + D`` (``D`` ``[..., 2, 2]``), or for ``rigid`` the rotation by
    ``D[..., 0, 0]`` radians (the other entries unused), so that neither scale nor shear can appear."""
    if not rigid:
        return torch.eye(2, dtype=D.dtype, device=D.device) + D
    th = D[..., 0, 0]
    c, s = torch.cos(th), torch.sin(th)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def nearest_rigid(A: np.ndarray) -> np.ndarray:
    """The rotation (or reflection) + translation nearest to the affine ``A`` ``[..., 3, 3]``: its 2x2 part
    ``U S V^T`` becomes ``U V^T`` (polar decomposition), the translation is kept."""
    A = np.array(A, dtype=np.float64, copy=True)
    U, _, Vt = np.linalg.svd(A[..., :2, :2])
    A[..., :2, :2] = U @ Vt
    return A


def _perturbed(A: torch.Tensor, D: torch.Tensor, t: torch.Tensor, c: torch.Tensor, rigid: bool = False) -> torch.Tensor:
    """``T(c + t) L T(-c) A``: a small change about the image centre ``c`` applied after ``A`` (``A``
    ``[..., 3, 3]``, ``D`` ``[..., 2, 2]``, ``t`` ``[..., 2]``; ``L`` from :func:`_linear`)."""
    L = _linear(D, rigid)
    top = torch.cat([L, (c + t - (L @ c[:, None])[..., 0])[..., None]], -1)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=A.dtype, device=A.device).expand(*top.shape[:-2], 1, 3)
    return torch.cat([top, bottom], -2) @ A


def refine_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init: np.ndarray,
    scales=(4, 2, 1),
    iterations=(120, 60, 25),
    lr: float = 0.01,
) -> tuple[np.ndarray, float]:
    """Refine all 6 affine parameters by Adam on the multi-channel MSE, coarse to fine.

    ``iterations`` gives the Adam steps per scale (fewer where pixels are many; a scale stops early when
    the loss changes by less than 1e-7 relative).

    Parametrisation: ``A = T(c + t) L T(-c) A0`` with ``L = I + D`` (``D`` 2x2) and ``t`` in pixels of the
    current scale, ``c`` the image centre, so the parameters are well scaled. Returns (transform moving ->
    fixed pixels at full resolution, final loss).
    """
    A, loss = refine_affine_batch(fixed[None], moving[None], np.asarray(init)[None], scales, iterations, lr)
    return A[0], float(loss[0])


def refine_affine_batch(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init: np.ndarray,
    scales=(4, 2, 1),
    iterations=(120, 60, 25),
    lr: float = 0.01,
    rigid: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`refine_affine` of ``B`` independent pairs at once: ``fixed``, ``moving`` ``[B, C, H, W]``, ``init``
    ``[B, 3, 3]``; returns transforms ``[B, 3, 3]`` and final losses ``[B]``. ``rigid``: the init is made rigid
    (:func:`nearest_rigid`) and only a rotation and a translation are refined (data of known pixel size).

    The losses are summed only so that one backward pass serves all (pair b's gradient depends on pair b
    alone, Adam is element-wise), and a pair that has converged is frozen while the others go on: each pair
    gets what it would get alone, with every tensor operation run once per batch.
    """
    dev = fixed.device
    B = fixed.shape[0]
    A = torch.as_tensor(nearest_rigid(init) if rigid else np.asarray(init), dtype=torch.float64).to(dev)
    losses = torch.full((B,), float("nan"), dtype=torch.float64)
    for f, n_iter in zip(scales, iterations):
        fx, mv = _blur_down(fixed.double(), f), _blur_down(moving.double(), f)
        S = torch.tensor(_full_to_pooled(f), dtype=torch.float64, device=dev)
        A_s = S @ A @ torch.linalg.inv(S)
        H, W = fx.shape[-2:]
        c = torch.tensor([(W - 1) / 2.0, (H - 1) / 2.0], dtype=torch.float64, device=dev)
        D = torch.zeros(B, 2, 2, dtype=torch.float64, device=dev, requires_grad=True)
        t = torch.zeros(B, 2, dtype=torch.float64, device=dev, requires_grad=True)
        opt = torch.optim.Adam([{"params": [D], "lr": lr}, {"params": [t], "lr": lr * max(H, W) / 4}])
        prev = torch.full((B,), float("nan"), dtype=torch.float64)
        active = torch.ones(B, dtype=torch.bool)
        for it in range(n_iter):
            opt.zero_grad()
            loss = ((warp_image(mv, _perturbed(A_s, D, t, c, rigid), (fx.shape[-2], fx.shape[-1])) - fx) ** 2).mean(
                dim=(1, 2, 3)
            )
            loss.sum().backward()
            if active.all():
                opt.step()
            else:  # a converged pair keeps its parameters (Adam's momentum would move them on)
                kept = (D.detach()[~active].clone(), t.detach()[~active].clone())
                opt.step()
                with torch.no_grad():
                    D[~active], t[~active] = kept
            value = loss.detach().cpu()
            if it > 20:
                active &= ~((prev - value).abs() < 1e-7 * prev.abs().clamp_min(1e-12))
                if not active.any():
                    break
            prev = torch.where(active, value, prev)
        with torch.no_grad():
            A = torch.linalg.inv(S) @ _perturbed(A_s, D, t, c, rigid) @ S
            losses = ((warp_image(moving.double(), A) - fixed.double()) ** 2).mean(dim=(1, 2, 3)).cpu()
    return A.detach().cpu().numpy(), losses.numpy()

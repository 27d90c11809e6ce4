"""Keypoint matching between two rasters: kornia's SIFT (no weights), or a LoFTR model given by the caller.

Points are returned in pixel coordinates ``(col, row)`` of their own image.
"""

from __future__ import annotations

import numpy as np
import torch


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` -> ``[H, W]`` in [0, 1]: channels scaled to their 99th percentile, then mixed with distinct
    weights ``w_c = (c + 1) / C`` so that different cell types give different grey levels (texture for SIFT)."""
    C = images.shape[0]
    flat = images.reshape(C, -1)
    hi = torch.quantile(flat.float(), 0.99, dim=1).clamp_min(1e-6)
    w = torch.arange(1, C + 1, dtype=images.dtype, device=images.device) / C
    gray = (images / hi[:, None, None]).clamp(max=1.0).mul(w[:, None, None]).sum(0)
    return gray / gray.max().clamp_min(1e-6)


def sift_keypoints(gray: torch.Tensor, num_features: int = 1500) -> tuple[np.ndarray, torch.Tensor]:
    """SIFT keypoint centres ``[N, 2]`` (col, row) and RootSIFT descriptors ``[N, 128]`` of a ``[H, W]`` image."""
    from kornia.feature import SIFTFeature, get_laf_center

    sift = SIFTFeature(num_features=num_features, upright=False, rootsift=True, device=gray.device)
    with torch.no_grad():
        lafs, _, desc = sift(gray[None, None].float())
    return get_laf_center(lafs)[0].cpu().numpy().astype(np.float64), desc[0]


def match(desc_a: torch.Tensor, desc_b: torch.Tensor, ratio: float = 0.9) -> np.ndarray:
    """Mutual nearest neighbours that also pass Lowe's ratio test: index pairs ``[n, 2]`` into (a, b)."""
    from kornia.feature import match_smnn

    if len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros((0, 2), np.int64)
    with torch.no_grad():
        _, idx = match_smnn(desc_a, desc_b, th=ratio)
    return idx.cpu().numpy().astype(np.int64)


def correspondences(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    reflect: bool = False,
    num_features: int | None = None,
    ratio: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Matched points (moving ``[n, 2]``, fixed ``[n, 2]``) between two ``[C, H, W]`` rasters.

    With ``reflect`` the moving image is also matched mirrored (SIFT is not mirror invariant); those matches
    are mapped back to the unmirrored moving frame so one RANSAC can choose. ``num_features`` (keypoints
    per image) defaults to one per 32 pixels, 256-1500: the detector keeps the strongest responses, and
    beyond what an image holds the extra ones are weak and cost descriptors (on a 93 x 93 DLPFC raster 300
    keypoints give the same 14 RANSAC inliers as 1500, in a sixth of the time).
    """
    if num_features is None:
        num_features = int(np.clip(fixed.shape[-2] * fixed.shape[-1] / 32, 256, 1500))
    gf, gm = to_gray(fixed), to_gray(moving)
    pf, df = sift_keypoints(gf, num_features)
    src, dst = [], []
    variants = [False, True] if reflect else [False]
    W = gm.shape[1]
    for mirrored in variants:
        img = torch.flip(gm, dims=[1]) if mirrored else gm
        pm, dm = sift_keypoints(img, num_features)
        if mirrored:
            pm = pm.copy()
            pm[:, 0] = (W - 1) - pm[:, 0]
        idx = match(dm, df, ratio)
        src.append(pm[idx[:, 0]])
        dst.append(pf[idx[:, 1]])
    return np.concatenate(src), np.concatenate(dst)


def loftr_correspondences(
    fixed: torch.Tensor, moving: torch.Tensor, model, reflect: bool = False, min_confidence: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Matched points (moving ``[n, 2]``, fixed ``[n, 2]``) between two ``[C, H, W]`` rasters by ``model``, a
    kornia ``LoFTR`` (dense transformer matching) on their device, keeping matches of confidence at least
    ``min_confidence``. Images are the grey mixes of :func:`to_gray`, zero-padded to a multiple of 8 pixels
    (LoFTR's coarse grid); matches in the padding are dropped. With ``reflect`` the mirrored moving image
    is matched too, as in :func:`correspondences`.
    """

    def padded(img):
        H, W = img.shape
        return torch.nn.functional.pad(img, (0, -W % 8, 0, -H % 8))[None, None].float()

    gf, gm = to_gray(fixed), to_gray(moving)
    W = gm.shape[1]
    src, dst = [], []
    for mirrored in [False, True] if reflect else [False]:
        img = torch.flip(gm, dims=[1]) if mirrored else gm
        with torch.no_grad():
            out = model({"image0": padded(img), "image1": padded(gf)})
        pm, pf = (out[k].cpu().numpy().astype(np.float64) for k in ("keypoints0", "keypoints1"))
        inside = lambda p: (p >= 0).all(1) & (p[:, 0] <= W - 1) & (p[:, 1] <= gm.shape[0] - 1)  # noqa: E731
        keep = (out["confidence"] >= min_confidence).cpu().numpy() & inside(pm) & inside(pf)
        pm, pf = pm[keep], pf[keep]
        if mirrored:
            pm[:, 0] = (W - 1) - pm[:, 0]
        src.append(pm)
        dst.append(pf)
    return np.concatenate(src), np.concatenate(dst)

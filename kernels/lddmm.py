"""Large-deformation diffeomorphic registration (LDDMM) of multi-channel 2D images, in torch.

Model: a time-varying velocity field ``v_t`` (``t = 0 .. T-1``, step ``dt = 1/T``) on the fixed image's pixel
grid generates the flow ``d/dt phi_t = v_t o phi_t``. The moving image is deformed by the inverse flow,
``M o phi_1^{-1}``, and we minimise

    E(v) = 1/2 sum_t ||v_t||_L^2 dt + 1/(2 sigma^2) sum_x rho(M(phi_1^{-1}(x)) - F(x))

with the Sobolev norm ``||v||_L^2 = sum_k |v_hat(k)|^2 / K_hat(k)``, ``K_hat(k) = (1 + alpha^2 lambda(k))^-p``
(``lambda`` = eigenvalues of the discrete negative Laplacian, i.e. ``K = (1 - alpha^2 Laplacian)^-p``), and a
robust penalty ``rho`` (Geman-McClure) so that tissue missing in one section does not pull the flow. With
``mass=True`` the deformed image is ``M(phi_1^{-1}(x)) det D phi_1^{-1}(x)``: raster images are cell
densities, and a density carried by a map keeps its cell count (a region stretched by 20% gets 20% sparser).
Plain resampling would let the flow explain density differences by moving tissue. We
optimise ``u`` with ``v = K * u`` (a preconditioned, Beg-style Sobolev gradient) by Adam, coarse to fine.

Units: pixels of the grid the images are given on; displacements are returned in pixels.
:func:`register_batch` fits several independent pairs at once (a leading batch dimension on every field).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sobolev_kernel(shape: tuple[int, int], alpha: float, power: float, device=None) -> torch.Tensor:
    """``K_hat`` ``[H, W//2 + 1]`` of ``(1 - alpha^2 Laplacian)^-power`` on an ``H x W`` periodic pixel grid."""
    H, W = shape
    ky = 2 - 2 * torch.cos(2 * math.pi * torch.fft.fftfreq(H, device=device, dtype=torch.float64))
    kx = 2 - 2 * torch.cos(2 * math.pi * torch.fft.rfftfreq(W, device=device, dtype=torch.float64))
    return (1 + alpha**2 * (ky[:, None] + kx[None, :])) ** (-power)


def smooth(u: torch.Tensor, K_hat: torch.Tensor) -> torch.Tensor:
    """``K * u`` for fields ``[..., H, W]`` (FFT convolution)."""
    H, W = u.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(u) * K_hat, s=(H, W))


def _grid(H: int, W: int, device, dtype) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack([xs, ys])  # [2, H, W] (x, y) pixel coordinates


def sample(field: torch.Tensor, points: torch.Tensor, origin=(0.0, 0.0)) -> torch.Tensor:
    """Bilinear sample of ``field`` ``[K, H, W]`` at pixel points ``[2, ...]`` (x, y), clamped at the borders;
    or, batched, of ``field`` ``[B, K, H, W]`` at ``points`` ``[B, 2, ...]`` (item b samples its own field).

    ``origin`` is the pixel coordinate of ``field[..., 0, 0]`` (for crops of a larger grid). Returns
    ``[K, ...]`` (``[B, K, ...]``). One ``grid_sample`` (border padding, pixel centres at the corners of its
    [-1, 1] range): its fused backward is several times cheaper than that of gathers with advanced indexing,
    and the LDDMM calls this ``2 x time steps`` times per iteration.
    """
    batched = field.dim() == 4
    if not batched:
        field, points = field[None], points[None]
    B, K, H, W = field.shape
    shape = points.shape[2:]
    x = (points[:, 0].reshape(B, -1) - origin[0]) * (2.0 / max(W - 1, 1)) - 1.0
    y = (points[:, 1].reshape(B, -1) - origin[1]) * (2.0 / max(H - 1, 1)) - 1.0
    grid = torch.stack([x, y], -1).to(field.dtype)[:, None]  # [B, 1, P, 2]
    out = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = out.reshape(B, K, *shape)
    return out if batched else out[0]


def integrate_inverse(v: torch.Tensor) -> torch.Tensor:
    """Displacement ``d`` ``[2, H, W]`` with ``phi_1^{-1}(x) = x + d(x)`` for velocities ``v`` ``[T, 2, H, W]``
    (batched: ``[B, 2, H, W]`` for ``[B, T, 2, H, W]``).

    Semi-Lagrangian: ``phi_{t+dt}^{-1}(x) = phi_t^{-1}(x - v_t(x) dt)``, i.e. ``d <- d(x - v dt) - v dt``.
    """
    T, H, W = v.shape[-4], v.shape[-2], v.shape[-1]
    dt = 1.0 / T
    x = _grid(H, W, v.device, v.dtype)
    d = torch.zeros_like(v[..., 0, :, :, :])
    for t in range(T - 1, -1, -1):
        step = v[..., t, :, :, :] * dt
        d = sample(d, x - step) - step
    return d


def integrate_forward(v: torch.Tensor, points: torch.Tensor, origin=(0.0, 0.0)) -> torch.Tensor:
    """Flow points ``[2, ...]`` (pixels) forward: ``y <- y + v_t(y) dt`` for ``t = 0 .. T-1`` (``phi_1(y)``).

    ``v`` may be a crop of the full velocity grid whose pixel ``[0, 0]`` sits at ``origin``.
    """
    T = v.shape[0]
    y = points
    for t in range(T):
        y = y + sample(v[t], y, origin) / T
    return y


def required_halo(v: torch.Tensor) -> int:
    """Pixels around a tile that :func:`forward_displacement_tiled` must read for velocities ``v``
    ``[T, 2, H, W]``: a point moves at most ``max |v|`` pixels in unit time, plus one pixel for the bilinear
    stencil and one for rounding."""
    return int(math.ceil(float(v.abs().max()))) + 2


def forward_displacement_tiled(v: torch.Tensor, tile: int, halo: int | None = None) -> torch.Tensor:
    """``phi_1(y) - y`` on the whole grid, computed tile by tile.

    Each tile reads velocities only in the tile grown by ``halo`` pixels (default :func:`required_halo`);
    with ``halo`` >= the largest displacement + 1 every sampled point stays inside its crop, so the result
    equals the untiled one.
    """
    halo = required_halo(v) if halo is None else halo
    T, _, H, W = v.shape
    out = torch.empty((2, H, W), dtype=v.dtype, device=v.device)
    for r0 in range(0, H, tile):
        for c0 in range(0, W, tile):
            r1, c1 = min(H, r0 + tile), min(W, c0 + tile)
            R0, C0, R1, C1 = max(0, r0 - halo), max(0, c0 - halo), min(H, r1 + halo), min(W, c1 + halo)
            crop = v[:, :, R0:R1, C0:C1]
            ys, xs = torch.meshgrid(
                torch.arange(r0, r1, dtype=v.dtype, device=v.device),
                torch.arange(c0, c1, dtype=v.dtype, device=v.device),
                indexing="ij",
            )
            pts = torch.stack([xs, ys])
            out[:, r0:r1, c0:c1] = integrate_forward(crop, pts, origin=(C0, R0)) - pts
    return out


def _pool(img: torch.Tensor, f: int) -> torch.Tensor:
    """``[B, C, H, W]`` images averaged over ``f x f`` pixel blocks."""
    return img if f == 1 else F.avg_pool2d(img, f, ceil_mode=True)


def resize_velocity(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Velocities ``[..., T, 2, h, w]`` (pixels per unit time) resampled onto an ``H x W`` grid covering the
    same area; their values scale with the grid so that they still move the same tissue by the same distance."""
    if tuple(v.shape[-2:]) == tuple(shape):
        return v
    ratio = shape[1] / v.shape[-1]
    flat = v.reshape(-1, *v.shape[-3:])
    out = F.interpolate(flat, size=shape, mode="bilinear", align_corners=False) * ratio
    return out.reshape(*v.shape[:-2], *shape)


def jacobian_det(d: torch.Tensor) -> torch.Tensor:
    """``det(I + grad d)`` ``[..., H, W]`` of the map ``x -> x + d(x)`` for a displacement ``d`` ``[..., 2, H, W]``
    (pixels); central differences inside, one-sided at the borders."""
    dxx, dxy = torch.gradient(d[..., 0, :, :], dim=(-1, -2))
    dyx, dyy = torch.gradient(d[..., 1, :, :], dim=(-1, -2))
    return (1 + dxx) * (1 + dyy) - dxy * dyx


def deform(moving: torch.Tensor, d: torch.Tensor, mass: bool, grid: torch.Tensor | None = None) -> torch.Tensor:
    """``moving`` ``[C, H, W]`` (batched ``[B, C, H, W]``, with ``d`` ``[B, 2, H, W]``) carried by the inverse map
    ``x -> x + d(x)``: ``M(x + d(x))``, times
    ``det(I + grad d)`` when ``mass`` (a density pushed forward keeps its cell count: a stretched region gets
    sparser instead of staying as dense and growing). ``grid``: the pixel grid ``[2, H, W]`` when the caller
    already holds it (an optimisation loop)."""
    if grid is None:
        H, W = moving.shape[-2:]
        grid = _grid(H, W, moving.device, moving.dtype)
    out = sample(moving, grid + d)
    return out * jacobian_det(d).clamp_min(0.0).unsqueeze(-3) if mass else out


def register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    steps: int = 5,
    alpha: float = 4.0,
    power: float = 2.0,
    sigma: float = 0.05,
    iterations=(150, 75),
    scales=(2, 1),
    lr: float = 0.5,
    robust_scale: float | None = 0.5,
    init: torch.Tensor | None = None,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    mass: bool = False,
) -> tuple[torch.Tensor, dict]:
    """LDDMM of ``moving`` onto ``fixed`` (both ``[C, H, W]``, already affinely aligned).

    Returns velocities ``v`` ``[steps, 2, H, W]`` (pixels per unit time at full resolution) and a report
    (energy per scale, iterations run, data term before/after, both on the images scaled by their joint 99th
    percentile). ``alpha`` (pixels) sets the smoothness scale, ``power`` its order; ``sigma`` weighs the data
    term (in those scaled units); ``robust_scale`` is where the Geman-McClure penalty saturates (None: plain
    squares). ``scales`` are pooling factors, coarse to fine; the last need not be 1 (the velocity found on a
    coarse grid is resampled to full resolution). ``init`` warm-starts from earlier velocities. A scale
    stops early when the energy changes by less than ``tol`` relative over 10 iterations. ``mass``: the
    moving image is a density and is carried with its Jacobian (see :func:`deform`).
    """
    v, reports = register_batch(
        fixed[None],
        moving[None],
        steps,
        alpha,
        power,
        sigma,
        iterations,
        scales,
        lr,
        robust_scale,
        None if init is None else init[None],
        tol,
        dtype,
        mass,
    )
    return v[0], reports[0]


def register_batch(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    steps: int = 5,
    alpha: float = 4.0,
    power: float = 2.0,
    sigma: float = 0.05,
    iterations=(150, 75),
    scales=(2, 1),
    lr: float = 0.5,
    robust_scale: float | None = 0.5,
    init: torch.Tensor | None = None,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    mass: bool = False,
) -> tuple[torch.Tensor, list[dict]]:
    """:func:`register` of ``B`` independent pairs at once: ``fixed``, ``moving`` ``[B, C, H, W]``, ``init``
    ``[B, steps, 2, h, w]`` or None; returns ``v`` ``[B, steps, 2, H, W]`` and one report per pair.

    Each pair has its own intensity scale, energy and stopping rule; the energies are summed only so that one
    backward pass serves all (pair b's gradient depends on pair b alone, and Adam is element-wise), and a
    pair that has converged is frozen while the others go on. So each pair gets what :func:`register` would
    give it alone, while every tensor operation runs once per batch instead of once per pair: on a GPU, and
    on a CPU for the small coarse grids where per-operation overhead dominates.
    """
    B = fixed.shape[0]
    # intensities on a common [0, 1] scale per pair, so that sigma means the same for any density of cells
    both = torch.cat([fixed.reshape(B, -1), moving.reshape(B, -1)], 1).double()
    level = torch.quantile(both, 0.99, dim=1).clamp_min(1e-12).reshape(B, 1, 1, 1)
    fixed, moving = (fixed.double() / level).to(dtype), (moving.double() / level).to(dtype)
    before = ((moving - fixed) ** 2).mean(dim=(1, 2, 3))
    reports: list[dict] = [{"data_before": float(before[b]), "energy": [], "iterations": []} for b in range(B)]
    u: torch.Tensor | None = None
    for f, n_iter in zip(scales, iterations):
        fx, mv = _pool(fixed, f), _pool(moving, f)
        H, W = fx.shape[-2:]
        K_hat = sobolev_kernel((H, W), alpha / f, power, fx.device).to(dtype)
        if u is not None:
            u = resize_velocity(u.detach(), (H, W))
        elif init is not None:  # v = K u, so u = K^-1 v; K_hat > 0 everywhere
            v0 = resize_velocity(init.to(device=fx.device, dtype=dtype), (H, W))
            u = torch.fft.irfft2(torch.fft.rfft2(v0) / K_hat, s=(H, W))
        else:
            u = torch.zeros((B, steps, 2, H, W), dtype=dtype, device=fx.device)
        u = u.detach().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        grid = _grid(H, W, fx.device, dtype)
        history = torch.empty((n_iter, B), dtype=torch.float64)
        active = torch.ones(B, dtype=torch.bool)
        ran = torch.zeros(B, dtype=torch.long)
        for it in range(n_iter):
            opt.zero_grad()
            u_hat = torch.fft.rfft2(u)  # shared by v = K * u and the norm of v
            v = torch.fft.irfft2(u_hat * K_hat, s=(H, W))
            warped = deform(mv, integrate_inverse(v), mass, grid)
            r = warped - fx
            if robust_scale:  # Geman-McClure: residuals beyond ~robust_scale (tissue missing on one side) saturate
                c2 = robust_scale**2
                data = (r**2 / (r**2 + c2) * c2).sum(dim=(1, 2, 3))
            else:
                data = (r**2).sum(dim=(1, 2, 3))
            reg = (u_hat.abs() ** 2 * K_hat).sum(dim=(1, 2, 3, 4)) / (H * W) / steps
            energy = 0.5 * reg + 0.5 * data / sigma**2
            energy.sum().backward()
            if active.all():
                opt.step()
            else:  # a converged pair keeps its u (Adam's momentum would move it on)
                kept = u.detach()[~active].clone()
                opt.step()
                with torch.no_grad():
                    u[~active] = kept
            history[it] = energy.detach().double().cpu()
            ran += active
            if it > 20:
                settled = (history[it - 10] - history[it]).abs() < tol * history[it - 10].abs()
                active &= ~settled
                if not active.any():
                    break
        for b in range(B):
            n = int(ran[b])
            reports[b]["energy"].append(float(history[n - 1, b]) if n else float("nan"))
            reports[b]["iterations"].append(n)
    if u is None:
        raise ValueError("lddmm.register_batch needs at least one scale")
    with torch.no_grad():
        v = resize_velocity(smooth(u.detach(), K_hat), (fixed.shape[-2], fixed.shape[-1]))
        warped = deform(moving, integrate_inverse(v), mass)
        after = ((warped - fixed) ** 2).mean(dim=(1, 2, 3))
    for b in range(B):
        reports[b]["data_after"] = float(after[b])
    return v, reports

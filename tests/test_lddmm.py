import math

import numpy as np
import torch

from lamina.kernels import lddmm
from lamina.kernels.raster import smooth as blur
from lamina.kernels.raster import splat


def _image(seed=0, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(12, 52, (60, 2))
    img = splat(pts[:, 0], pts[:, 1], rng.integers(0, 2, 60), 2, (0.0, 0.0), 1.0, shape)
    return torch.from_numpy(blur(img, 2.0)).double()


def _smooth_velocity(shape=(64, 64), steps=4, amp=2.5, seed=1):
    """A smooth, time-varying velocity whose flow moves points by up to about ``amp`` pixels."""
    g = torch.Generator().manual_seed(seed)
    base, drift = (torch.randn((1, 2, *shape), generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None, None, None]
    v = lddmm.smooth(base + 0.5 * t * drift, lddmm.sobolev_kernel(shape, alpha=6.0, power=2.0))
    return v * (amp / v.abs().max())


def test_sample_is_bilinear_and_clamped_at_the_borders_of_a_crop():
    """``sample`` against bilinear interpolation written out, at points inside, between pixels and outside the
    grid (clamped to its border), on a crop whose pixel [0, 0] sits at ``origin``; and its gradient in the
    points is the bilinear slope."""
    rng = np.random.default_rng(3)
    field = rng.normal(size=(3, 7, 9))
    origin = (4.0, -2.0)
    pts = np.stack([rng.uniform(origin[0] - 3, origin[0] + 11, 50), rng.uniform(origin[1] - 3, origin[1] + 9, 50)])
    x = np.clip(pts[0] - origin[0], 0, 8)
    y = np.clip(pts[1] - origin[1], 0, 6)
    x0, y0 = np.minimum(np.floor(x), 7).astype(int), np.minimum(np.floor(y), 5).astype(int)
    wx, wy = x - x0, y - y0
    expected = (1 - wy) * ((1 - wx) * field[:, y0, x0] + wx * field[:, y0, x0 + 1]) + wy * (
        (1 - wx) * field[:, y0 + 1, x0] + wx * field[:, y0 + 1, x0 + 1]
    )
    points = torch.tensor(pts.reshape(2, 5, 10), requires_grad=True)
    got = lddmm.sample(torch.from_numpy(field), points, origin)
    assert got.shape == (3, 5, 10)
    np.testing.assert_allclose(got.detach().numpy().reshape(3, 50), expected, atol=1e-12)
    got[0].sum().backward()
    inside = (x > 0) & (x < 8) & (wx > 1e-6) & (wx < 1 - 1e-6)
    slope_x = (1 - wy) * (field[0, y0, x0 + 1] - field[0, y0, x0]) + wy * (
        field[0, y0 + 1, x0 + 1] - field[0, y0 + 1, x0]
    )
    np.testing.assert_allclose(points.grad[0].numpy().reshape(50)[inside], slope_x[inside], atol=1e-9)


def test_sobolev_kernel_is_a_low_pass_with_unit_dc():
    K = lddmm.sobolev_kernel((32, 32), alpha=3.0, power=2.0)
    assert K[0, 0] == 1.0 and K.max() == 1.0 and K[16, 16] < 1e-3
    f = torch.randn(32, 32, dtype=torch.float64)
    np.testing.assert_allclose(float(lddmm.smooth(f, K).mean()), float(f.mean()), atol=1e-12)


def test_forward_and_inverse_flows_are_inverse_of_each_other():
    v = _smooth_velocity()
    H, W = v.shape[-2:]
    grid = lddmm._grid(H, W, v.device, v.dtype)
    fwd = lddmm.forward_displacement_tiled(v, tile=64, halo=0)
    inv = lddmm.integrate_inverse(v)
    # phi^{-1}(phi(y)) = y away from the borders, up to the integrators' discretisation
    back = grid + fwd + lddmm.sample(inv, grid + fwd)
    err = (back - grid)[:, 8:-8, 8:-8].abs().max()
    assert 1.0 < fwd.abs().max() < 5.0 and err < 0.1


def test_tiled_forward_integration_equals_untiled():
    v = _smooth_velocity(shape=(70, 90), amp=4.0)
    whole = lddmm.forward_displacement_tiled(v, tile=10_000, halo=0)
    halo = int(math.ceil(float(whole.abs().max()))) + 2
    tiled = lddmm.forward_displacement_tiled(v, tile=16, halo=halo)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)
    # a halo smaller than the displacement is not enough: the result differs somewhere
    short = lddmm.forward_displacement_tiled(v, tile=16, halo=0)
    assert (short - whole).abs().max() > 1e-3


def test_lddmm_recovers_a_known_diffeomorphism():
    fixed = _image()
    v_true = _smooth_velocity(amp=2.0, seed=3)
    H, W = fixed.shape[-2:]
    grid = lddmm._grid(H, W, fixed.device, fixed.dtype)
    # moving = fixed o phi_true: registering moving back to fixed must find phi_true^{-1}'s effect
    moving = lddmm.sample(fixed, grid + lddmm.forward_displacement_tiled(v_true, 10_000, 0))
    v, report = lddmm.register(fixed, moving, steps=4, alpha=4.0, iterations=(120, 80), lr=0.3)
    assert report["data_after"] < 0.1 * report["data_before"]
    warped = lddmm.sample(moving, grid + lddmm.integrate_inverse(v))
    tissue = fixed.sum(0) > 0.2 * fixed.sum(0).max()
    assert float(((warped - fixed) ** 2).sum(0)[tissue].mean()) < 0.1 * float(
        ((moving - fixed) ** 2).sum(0)[tissue].mean()
    )


def test_lddmm_flow_matches_the_true_flow_on_tissue():
    fixed = _image(seed=5)
    v_true = _smooth_velocity(amp=2.0, seed=6)
    H, W = fixed.shape[-2:]
    grid = lddmm._grid(H, W, fixed.device, fixed.dtype)
    true_fwd = lddmm.forward_displacement_tiled(v_true, 10_000, 0)
    moving = lddmm.sample(fixed, grid + true_fwd)  # moving = fixed o phi_true
    v, _ = lddmm.register(fixed, moving, steps=4)
    found = lddmm.forward_displacement_tiled(v, 10_000, 0)  # should be phi_true (moving o phi^-1 = fixed)
    tissue = fixed.sum(0) > 0.3 * fixed.sum(0).max()
    err = (found - true_fwd).norm(dim=0)[tissue]
    assert true_fwd.norm(dim=0)[tissue].median() > 0.8  # the flow moves tissue by about a pixel or more
    assert float(err.median()) < 0.5 * float(true_fwd.norm(dim=0)[tissue].median())


def test_a_batch_of_pairs_gives_each_pair_what_it_gets_alone():
    """``register_batch`` on three pairs with different warps, intensities, stopping iterations and warm starts
    equals three calls of ``register`` (float64; differences are only the order of floating-point sums)."""
    grid = lddmm._grid(64, 64, "cpu", torch.float64)
    fixed, moving, inits = [], [], []
    for i, (amp, gain) in enumerate([(2.0, 1.0), (0.5, 7.0), (2.5, 0.2)]):
        f = _image(seed=10 + i)
        fixed.append(f)
        moving.append(
            gain
            * lddmm.sample(
                f, grid + lddmm.forward_displacement_tiled(_smooth_velocity(amp=amp, seed=20 + i), 10_000, 0)
            )
        )
        inits.append(0.3 * _smooth_velocity(shape=(32, 32), steps=4, amp=1.0, seed=30 + i))
    kw = dict(steps=4, alpha=4.0, iterations=(80, 40), scales=(2, 1), lr=0.3, tol=1e-4, mass=True)
    v, reports = lddmm.register_batch(torch.stack(fixed), torch.stack(moving), init=torch.stack(inits), **kw)
    alone = [lddmm.register(f, m, init=i, **kw) for f, m, i in zip(fixed, moving, inits)]
    assert len({tuple(r["iterations"]) for r in reports}) > 1  # the pairs stop at different iterations
    for b, (v_b, rep_b) in enumerate(alone):
        assert reports[b]["iterations"] == rep_b["iterations"]
        np.testing.assert_allclose(reports[b]["data_after"], rep_b["data_after"], rtol=1e-6)
        np.testing.assert_allclose(v[b].numpy(), v_b.numpy(), atol=1e-6 * float(v_b.abs().max()))

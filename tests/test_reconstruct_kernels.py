"""Kernels of the isotropic reconstruction: PCA maps, entropic OT, graph SDE, voxel sums."""

import numpy as np
import pytest
import torch

from lamina.kernels import ot, pca, sde, voxel


def test_pca_project_invert_round_trip_and_volume_form():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
    mean, scale = X.mean(0), X.std(0)
    _, _, vt = np.linalg.svd((X - mean) / scale, full_matrices=False)
    pcs = pca.project(X, mean, scale, vt)
    np.testing.assert_allclose(pca.invert(pcs, mean, scale, vt), X, atol=1e-4)  # all components: exact
    vol = pcs[:24].T.reshape(6, 2, 3, 4)
    out = pca.invert_volume(vol, mean, scale, vt)
    np.testing.assert_allclose(out.reshape(6, -1).T, X[:24], atol=1e-4)
    vol[:, 0, 0, 0] = np.nan
    assert np.isnan(pca.invert_volume(vol, mean, scale, vt)[:, 0, 0, 0]).all()
    assert pca.safe_scale(np.array([0.0, 2.0])).tolist() == [1.0, 2.0]


def test_sinkhorn_divergence_zero_for_equal_clouds_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    assert abs(float(ot.sinkhorn_divergence(x, x.clone(), 0.01))) < 1e-4
    d = [float(ot.sinkhorn_divergence(x, x + s, 0.01)) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]
    np.testing.assert_allclose(d[2], 3.0, rtol=0.1)  # a rigid shift s costs |s|^2 = 3 (three dims)


def test_sinkhorn_gradient_moves_the_cloud_onto_the_target():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(200, 2, generator=g) + torch.tensor([2.0, -1.0])
    x = torch.randn(200, 2, generator=g).requires_grad_(True)
    start = float(ot.sinkhorn_divergence(x.detach(), y, 0.01))
    opt = torch.optim.SGD([x], lr=25.0)  # the envelope gradient is per point, ~1/n in size
    for _ in range(60):
        opt.zero_grad()
        ot.sinkhorn_loss(x, y, 0.01).backward()
        opt.step()
    assert start > 4.0 and float(ot.sinkhorn_divergence(x.detach(), y, 0.01)) < 0.03 * start
    np.testing.assert_allclose(x.detach().mean(0).numpy(), y.mean(0).numpy(), atol=0.12)


def test_knn_graph_matches_brute_force():
    from scipy.spatial import cKDTree

    pos = torch.rand(500, 2, generator=torch.Generator().manual_seed(2)) * 100
    idx = sde.knn_graph(pos, 6, block=64)
    _, ref = cKDTree(pos.numpy()).query(pos.numpy(), k=7)
    assert (np.sort(idx.numpy(), 1) == np.sort(ref[:, 1:], 1)).mean() > 0.999
    assert sde.knn_graph(pos[:1], 6).shape == (1, 0)  # a lone cell has no neighbours


def _cells(n=400, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g) * 1000, torch.randn(n, 4, generator=g)


def test_untrained_flow_is_the_identity_and_seeded_noise_is_reproducible():
    model = sde.FlowModel(4, hidden=16, k=5)
    model.set_normalisation([500, 500], 300.0, 30.0, np.ones(4))
    p, h = _cells()
    layers = sde.integrate(model, p, h, 0.0, 35.0, 10.0)
    assert [round(z, 6) for z, _, _ in layers] == [8.75, 17.5, 26.25, 35.0]  # round(35/10) = 4 equal steps
    torch.testing.assert_close(layers[-1][1], p, atol=1e-3, rtol=0)  # um: only float32 round-off
    torch.testing.assert_close(layers[-1][2], h, atol=1e-5, rtol=0)
    run = lambda seed: sde.integrate(model, p, h, 35.0, 0.0, 10.0, 0.05, 0.05, torch.Generator().manual_seed(seed))[-1]  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], c[1])
    assert float((a[1] - p).abs().mean()) > 0.1  # the noise did move the cells


def test_path_loss_carries_cells_across_gaps_and_weighs_fit_and_action_per_gap():
    """(sum of the fits at each section + action_weight * kinetic action) / gaps, with the same cells carried on."""
    model = sde.FlowModel(4, hidden=16, k=5)
    model.set_normalisation([500, 500], 300.0, 30.0, np.ones(4))
    p, h = _cells(200, 1)
    targets = [(_cells(200, 2)[0], _cells(200, 2)[1] + 0.5), (_cells(200, 3)[0] + 40.0, _cells(200, 3)[1])]
    space = lambda q, f: torch.cat([(q - model.center) / model.length, f], 1)  # noqa: E731  (weight 1)
    loss, fits, flowed, _ = sde.path_loss(model, p, h, [0.0, 35.0, 70.0], targets, 17.5, action_weight=0.7)
    # the untrained flow does not move: no action, and each fit compares the source cells with that section
    want = [ot.sinkhorn_loss(space(p, h), space(*t), 0.01) for t in targets]
    torch.testing.assert_close(torch.stack(fits), torch.stack(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (want[0] + want[1]) / 2, rtol=1e-5, atol=1e-6)
    one = sde.flow_loss(model, p, h, 0.0, 35.0, *targets[0], 17.5, action_weight=0.7)
    torch.testing.assert_close(one, want[0], rtol=1e-5, atol=1e-6)
    # a constant drift v (normalised units per unit depth) in x: cells move v * depth, the action is v^2 * depth
    v = 0.4
    with torch.no_grad():
        model.shape.phi[-1].bias.copy_(torch.tensor([v, 0.0]))
    still, fits, flowed, _ = sde.path_loss(model, p, h, [0.0, 35.0, 70.0], targets, 17.5, action_weight=0.0)
    moving, *_ = sde.path_loss(model, p, h, [0.0, 35.0, 70.0], targets, 17.5, action_weight=0.7)
    moved = (flowed[1][:, 0] - space(p, h)[:, 0]) * model.length  # um
    torch.testing.assert_close(moved, torch.full_like(moved, v * 70.0), atol=1e-3, rtol=0)  # carried over both gaps
    torch.testing.assert_close(moving - still, torch.tensor(0.7 * v**2 * 70.0 / 300.0 / 2), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="one more depth than targets"):
        sde.path_loss(model, p, h, [0.0, 35.0], targets, 17.5)


def _field(p):
    x, y = p[:, 0], p[:, 1]
    return torch.stack(
        [
            torch.sin(2 * np.pi * x / 600),
            torch.cos(2 * np.pi * y / 600),
            torch.sin(2 * np.pi * (x + y) / 800),
            x / 1000 - 0.5,
        ],
        1,
    )


@pytest.mark.parametrize("objective", ["transport", "matching"])
def test_training_learns_a_known_drift(objective):
    """Section k+1 is section k's tissue moved +25 um in x with every feature raised by 0.3 (features are a
    smooth field of position). From unpaired samples (OT loss, or flow matching on the OT coupling) the trained
    forward flow must predict the next section's field at the cells' new positions far better than copying the
    section does, and move the cells (here a shift and a raise of a smooth field are partly the same change: both
    objectives move them 13-17 um of the 25 um in 80 steps)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = sde.FlowModel(4, hidden=32, k=6)
    model.set_normalisation([500, 500], 300.0, 30.0, np.full(4, 0.7))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    shift, raise_h = torch.tensor([25.0, 0.0]), 0.3
    target = lambda q: _field(q - shift) + raise_h  # noqa: E731
    for step in range(80):
        p0, _ = _cells(256, 100 + step)
        p1, _ = _cells(256, 5000 + step)
        if objective == "transport":
            loss = sde.flow_loss(model, p0, _field(p0), 0.0, 35.0, p1, target(p1), 17.5, eps=0.002)
        else:
            loss = sde.matching_loss(model, p0, _field(p0), 0.0, 35.0, p1, target(p1), eps=0.002, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p, _ = _cells(1000, 99_999)
    with torch.no_grad():
        _, q, f = sde.integrate(model, p, _field(p), 0.0, 35.0, 17.5)[-1]
    inner = ((p > 150) & (p < 850)).all(1)  # away from the square's edges, where OT sees a border
    err_flow = float((f - target(q))[inner].abs().mean())
    err_copy = float((_field(p) - target(p))[inner].abs().mean())
    assert err_flow < 0.3 * err_copy, (err_flow, err_copy)
    moved = (q - p)[inner]
    assert float(moved[:, 0].mean()) > 8.0  # it moved the cells the right way (not only recoloured)
    assert float(moved[:, 0].mean()) < 35.0


def test_voxel_accumulate_matches_a_loop():
    rng = np.random.default_rng(4)
    iz, iy, ix = rng.integers(0, 3, 500), rng.integers(0, 4, 500), rng.integers(0, 5, 500)
    vals, w = rng.normal(size=(500, 2)), rng.uniform(0, 1, 500)
    sums, counts = voxel.accumulate(iz, iy, ix, vals, (3, 4, 5), w)
    ref_s, ref_c = np.zeros((2, 3, 4, 5)), np.zeros((3, 4, 5))
    np.add.at(ref_c, (iz, iy, ix), w)
    for p in range(2):
        np.add.at(ref_s[p], (iz, iy, ix), w * vals[:, p])
    np.testing.assert_allclose(sums, ref_s)
    np.testing.assert_allclose(counts, ref_c)
    mean = voxel.mean_or_nan(sums, np.where(np.arange(60).reshape(3, 4, 5) == 0, 0, counts))
    assert np.isnan(mean[:, 0, 0, 0]).all() and np.isfinite(mean[:, 1]).all()
    assert voxel.voxel_index(np.array([-0.1, 0.0, 9.99, 10.0]), 0.0, 10.0).tolist() == [-1, 0, 0, 1]


@pytest.mark.gpu
def test_flow_on_gpu_matches_cpu():
    model = sde.FlowModel(4, hidden=16, k=5)
    model.set_normalisation([500, 500], 300.0, 30.0, np.ones(4))
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    p, h = _cells()
    cpu = sde.integrate(model, p, h, 0.0, 35.0, 10.0)[-1]
    gpu = sde.integrate(model.cuda(), p.cuda(), h.cuda(), 0.0, 35.0, 10.0)[-1]
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=1e-3, rtol=1e-4)

import math

import numpy as np
import torch

from lamina.kernels.consistency import chain, joint_affines
from lamina.kernels.geometry import affine_matrix, apply_affine
from lamina.kernels.image_align import refine_affine, refine_affine_batch, rotation_search, warp_image
from lamina.kernels.ransac import fit_similarity, ransac
from lamina.kernels.raster import expression_channels, smooth, splat
from lamina.kernels.warp import sample_grid, warp_points


def test_splat_conserves_mass_and_centre():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(10, 90, 5000), rng.uniform(20, 60, 5000)
    ch = rng.integers(0, 3, 5000)
    img = splat(x, y, ch, 3, origin=(0.0, 0.0), spacing=2.0, shape=(50, 60))
    assert img.shape == (3, 50, 60)
    np.testing.assert_allclose(img.sum((1, 2)), np.bincount(ch, minlength=3), rtol=1e-6)
    total = img.sum(0)
    rows, cols = np.indices(total.shape)
    np.testing.assert_allclose((total * cols).sum() / total.sum() * 2.0, x.mean(), atol=1e-3)
    np.testing.assert_allclose((total * rows).sum() / total.sum() * 2.0, y.mean(), atol=1e-3)
    assert splat(np.array([-5.0]), np.array([5.0]), None, 1, (0.0, 0.0), 1.0, (4, 4)).sum() == 0
    np.testing.assert_allclose(smooth(img, 1.5).sum(), img.sum(), rtol=1e-3)


def test_weighted_splat_and_expression_channels():
    """One-hot weights give the per-type image; expression shares are non-negative, sum to 1 per cell (half in
    the density channel), follow the sign of each standardised PC, and keep the summed image a density."""
    rng = np.random.default_rng(2)
    x, y, ch = rng.uniform(0, 40, 500), rng.uniform(0, 30, 500), rng.integers(0, 3, 500)
    args = ((0.0, 0.0), 2.0, (16, 21))
    np.testing.assert_allclose(splat(x, y, None, 3, *args, weights=np.eye(3)[ch]), splat(x, y, ch, 3, *args), atol=1e-5)
    pcs = np.array([[2.0, -1.0], [0.0, 0.0], [-3.0, 0.0]])
    w = expression_channels(pcs, sd=np.array([1.0, 0.5]), share=0.5)
    # cell 0: z = (2, -2) -> PC1+ and PC2- share the expression half; cell 1 at the mean: spread evenly
    np.testing.assert_allclose(w, [[0.25, 0, 0, 0.25], [0.125, 0.125, 0.125, 0.125], [0, 0.5, 0, 0]])
    shares = expression_channels(rng.normal(size=(500, 4)), np.ones(4))
    assert shares.shape == (500, 8) and (shares >= 0).all()
    np.testing.assert_allclose(shares.sum(1), 0.75)
    img = splat(x, y, None, 9, *args, weights=np.hstack([np.full((500, 1), 0.25), shares]))
    np.testing.assert_allclose(img.sum(0), splat(x, y, None, 1, *args)[0], atol=1e-4)


def test_warp_points_affine_then_displacement():
    A = affine_matrix(0.3, 1.05, (12.0, -4.0))
    disp = np.zeros((2, 11, 11))
    disp[0] += 3.0  # uniform +3 um in x
    xy = np.array([[10.0, 20.0], [50.0, 40.0]])
    out = warp_points(xy, A, disp, origin=(-100.0, -100.0), spacing=30.0)
    np.testing.assert_allclose(out, apply_affine(A, xy) + [3.0, 0.0])
    ramp = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0)))[[0]]  # value = column index
    np.testing.assert_allclose(
        sample_grid(ramp, np.array([[1.5, 0.0], [99.0, 2.0]]), (0.0, 0.0), 1.0)[:, 0], [1.5, 4.0]
    )


def test_ransac_recovers_similarity_despite_outliers_and_reflection():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 200, (120, 2))
    true = affine_matrix(math.radians(130), 1.07, (30.0, -12.0), center=(100, 100), reflect=True)
    dst = apply_affine(true, src) + rng.normal(0, 0.3, src.shape)
    dst[:40] = rng.uniform(0, 200, (40, 2))  # a third are wrong matches
    T, inl = ransac(src, dst, threshold=2.0, model="similarity", reflect=True)
    np.testing.assert_allclose(T, true, atol=0.05 * np.abs(true).max())
    assert inl[40:].mean() > 0.95 and inl[:40].mean() < 0.1
    T_no, _ = ransac(src, dst, threshold=2.0, model="similarity", reflect=False)
    assert np.linalg.det(T_no[:2, :2]) > 0  # mirrored solutions are not considered unless asked
    np.testing.assert_allclose(fit_similarity(src[40:], apply_affine(true, src[40:]), reflect=True), true, atol=1e-9)


def _blobs(shape=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(20, 76, (40, 2))
    img = splat(pts[:, 0], pts[:, 1], rng.integers(0, 2, 40), 2, (0.0, 0.0), 1.0, shape)
    img += splat(np.linspace(25, 70, 200), 30 + 10 * np.sin(np.linspace(0, 3, 200)), None, 2, (0, 0), 1.0, shape)
    return torch.from_numpy(smooth(img, 2.0)).double()


def test_rotation_search_and_refinement_recover_a_known_transform():
    fixed = _blobs()
    true = affine_matrix(math.radians(-137), 1.0, (4.0, -3.0), center=(47.5, 47.5))
    moving = warp_image(fixed[None], torch.from_numpy(np.linalg.inv(true))[None])[0]  # fixed = moving o true^-1
    found = rotation_search(fixed, moving, step_deg=4.0)
    assert abs(((found["angle_deg"] + 137) + 180) % 360 - 180) <= 4.0  # within one coarse step
    A, loss = refine_affine(fixed, moving, found["transform"])
    pts = np.array([[30.0, 30.0], [60.0, 40.0], [50.0, 70.0]])
    assert np.abs(apply_affine(A, pts) - apply_affine(true, pts)).max() < 0.5  # pixels
    assert loss < 0.1 * float(((fixed - moving) ** 2).mean())


def test_a_batch_of_affine_refinements_gives_each_pair_what_it_gets_alone():
    """``refine_affine_batch`` on three pairs (different transforms, images and starts, so they stop at different
    iterations) equals three calls of ``refine_affine``, and recovers each transform."""
    fixed, moving, starts, truths = [], [], [], []
    for i, (deg, shift) in enumerate([(5.0, (3.0, -2.0)), (-8.0, (-4.0, 1.0)), (2.0, (0.5, 0.5))]):
        f = _blobs(seed=4 + i)
        true = affine_matrix(math.radians(deg), 1.0 + 0.02 * i, shift, center=(47.5, 47.5))
        fixed.append(f)
        moving.append(warp_image(f[None], torch.from_numpy(np.linalg.inv(true))[None])[0])
        starts.append(affine_matrix(math.radians(deg / 2), 1.0, (0.0, 0.0), center=(47.5, 47.5)))
        truths.append(true)
    A, losses = refine_affine_batch(
        torch.stack(fixed), torch.stack(moving), np.stack(starts), iterations=(300, 100, 60)
    )
    pts = np.array([[30.0, 30.0], [60.0, 40.0], [50.0, 70.0]])
    for b in range(3):
        A_b, loss_b = refine_affine(fixed[b], moving[b], starts[b], iterations=(300, 100, 60))
        np.testing.assert_allclose(A[b], A_b, atol=1e-9)
        np.testing.assert_allclose(losses[b], loss_b, rtol=1e-9)
        assert np.abs(apply_affine(A[b], pts) - apply_affine(truths[b], pts)).max() < 0.5  # pixels


def test_joint_solve_is_exact_for_consistent_pairs_and_removes_chained_drift():
    rng = np.random.default_rng(2)
    n, ref = 7, 3
    truth = np.stack(
        [affine_matrix(rng.uniform(-1, 1), rng.uniform(0.95, 1.05), rng.normal(0, 50, 2)) for _ in range(n)]
    )
    truth = np.linalg.inv(truth[ref]) @ truth  # G_ref = I
    pts = rng.uniform(-500, 500, (50, 2))
    rel = lambda k, j: np.linalg.inv(truth[j]) @ truth[k]  # noqa: E731  section k -> section j
    pairs = [(k, j, rel(k, j), 1.0, pts) for k in range(n) for j in (k - 1, k + 1, k - 2, k + 2) if 0 <= j < n]
    exact_steps = {k: rel(k, k - 1 if k > ref else k + 1) for k in range(n) if k != ref}
    G = joint_affines(n, ref, pairs, prior=chain(n, ref, exact_steps))
    np.testing.assert_allclose(G, truth, atol=1e-6)
    # adjacent estimates each 1 degree off in the same direction: chaining drifts, skip pairs pull it back
    bias = affine_matrix(math.radians(1.0), 1.0, (0.0, 0.0))
    noisy = [(k, j, bias @ A if abs(k - j) == 1 else A, w, p) for k, j, A, w, p in pairs]
    step = {k: noisy_A for k, j, noisy_A, _, _ in noisy if abs(k - j) == 1 and abs(j - ref) < abs(k - ref)}
    chained = chain(n, ref, step)
    joint = joint_affines(n, ref, noisy, prior=chained)
    err = lambda G_: max(np.abs(apply_affine(G_[k], pts) - apply_affine(truth[k], pts)).max() for k in range(n))  # noqa: E731
    assert err(joint) < 0.75 * err(chained)

import numpy as np
import pandas as pd

from lamina.kernels.fields import fourier_features, soft_bins
from lamina.kernels.geometry import (
    affine_matrix,
    apply_affine,
    fourier_displacement,
    fourier_lipschitz,
    invert_displacement,
)
from lamina.kernels.stats import group_category_counts, group_extents, group_moments


def test_affine_matrix_rotates_about_center_and_inverts():
    A = affine_matrix(np.pi / 2, 2.0, (10.0, -5.0), center=(100.0, 100.0))
    p = np.array([[110.0, 100.0], [100.0, 100.0]])
    q = apply_affine(A, p)
    # (110,100) is 10 um right of the centre: rotated 90 deg and scaled 2x -> 20 um above, then translated
    np.testing.assert_allclose(q, [[110.0, 115.0], [110.0, 95.0]], atol=1e-12)
    np.testing.assert_allclose(apply_affine(np.linalg.inv(A), q), p, atol=1e-12)
    R = affine_matrix(0.0, 1.0, (0, 0), reflect=True)
    np.testing.assert_allclose(apply_affine(R, np.array([[3.0, 4.0]])), [[-3.0, 4.0]])
    assert np.linalg.det(R[:2, :2]) < 0


def test_fourier_displacement_inverse_to_float_precision():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 2)) * 2 * np.pi / 900
    amp = rng.normal(size=(3, 2)) * 25
    phase = rng.uniform(0, 6, 3)
    assert fourier_lipschitz(k, amp) < 1
    p = rng.uniform(0, 2000, (5000, 2))
    q = p + fourier_displacement(p, k, phase, amp)
    np.testing.assert_allclose(invert_displacement(q, k, phase, amp), p, atol=1e-8)
    assert 5 < np.abs(q - p).max() < 150


def test_soft_bins_partition_of_unity_and_hard_limit():
    v = np.linspace(-1, 2, 301)
    m = soft_bins(v, np.array([0.0, 1.0]), width=1e-4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    assert (m.argmax(1) == np.digitize(v, [0.0, 1.0])).mean() > 0.99
    f = fourier_features(np.zeros((2, 3)), np.ones((4, 3)), np.zeros(4))
    np.testing.assert_allclose(f, 1.0)


def test_group_kernels_match_pandas():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 4, 1000)
    x, y = rng.normal(size=1000), rng.normal(size=1000)
    c = rng.integers(-1, 3, 1000)
    m = group_moments(g, x, y, 5)
    df = pd.DataFrame({"g": g, "x": x, "y": y})
    ref = df.groupby("g").agg(n=("x", "size"), sx=("x", "sum"), sy=("y", "sum"))
    np.testing.assert_allclose(m[:4, :3], ref.to_numpy())
    assert m[4, 0] == 0
    ext = group_extents(g, x, y, 5)
    np.testing.assert_allclose(ext[:4, 0], df.groupby("g").x.min())
    assert np.isinf(ext[4]).all()
    counts = group_category_counts(g, c, 5, 3)
    assert counts.sum() == (c >= 0).sum()
    assert counts[2, 1] == ((g == 2) & (c == 1)).sum()

"""Smooth scalar/vector fields over 3D space used to build phantoms and to evaluate ground truth.

All positions are ``[n, 3]`` arrays of (x, y, z) in micrometres (NumPy).
"""

from __future__ import annotations

import numpy as np


def fourier_features(xyz: np.ndarray, frequencies: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Random Fourier features ``phi_r(p) = cos(w_r . p + b_r)``.

    xyz ``[n, 3]`` um, frequencies ``[R, 3]`` rad/um, phases ``[R]`` rad -> ``[n, R]`` in [-1, 1].
    Low frequencies give smooth fields; a linear map of these is a smooth low-rank field.
    """
    return np.cos(xyz @ frequencies.T + phases)


def soft_bins(values: np.ndarray, edges: np.ndarray, width: float) -> np.ndarray:
    """Soft one-hot membership of ``values`` ``[n]`` in the ``len(edges) + 1`` bins cut at sorted ``edges``.

    ``m_k = sigma((v - e_{k-1}) / w) - sigma((v - e_k) / w)`` with ``e_{-1} = -inf``, ``e_K = +inf`` and the
    logistic ``sigma``; rows sum to 1 and ``m`` tends to the hard one-hot as ``width -> 0``. Returns ``[n, K+1]``.
    """
    values = np.asarray(values, dtype=np.float64)
    # logistic written with tanh: no overflow for values far from an edge
    cdf = 0.5 * (1.0 + np.tanh((values[:, None] - np.asarray(edges)[None, :]) / (2.0 * width)))
    upper = np.concatenate([np.ones((len(values), 1)), cdf], axis=1)
    lower = np.concatenate([cdf, np.zeros((len(values), 1))], axis=1)
    return upper - lower

"""Graph SDE along z: cells of one section flow, layer by layer, to the depth of the next.

State of a cell at depth z: in-plane position ``p`` [2] and features ``h`` [F] (its PCs). Both are
normalised by the model's buffers (``p~ = (p - center) / length``, ``h~ = h / feature_scale``,
``z~ = z / length``) so the networks see O(1) numbers. One Euler-Maruyama step of size ``dz~`` > 0 in the
model's own direction of travel (the backward model is a separate model trained on reversed pairs)::

    p~ <- p~ + a(p~, h~, z~; G) dz~ + sigma_p sqrt(dz~) N(0, 1)        shape drift  a: GraphDrift(out=2)
    h~ <- h~ + b(p~, h~, z~; G) dz~ + sigma_h sqrt(dz~) N(0, 1)        expression drift b: GraphDrift(out=F)

``G`` is the k-nearest-neighbour graph of the current positions, rebuilt every step. A ``GraphDrift`` is
one round of message passing written with index/gather operations:

    m_i = mean_{j in N(i)} psi([h~_i, h~_j - h~_i, (p_j - p_i) / r])       r: typical neighbour distance
    drift_i = phi([h~_i, p~_i, z~, m_i])

with ``psi``, ``phi`` small MLPs. The last layer of ``phi`` starts at zero, so an untrained flow is the
identity (it copies the section), and training can only move it away from that baseline where the data
ask for it. Noise draws come from a ``torch.Generator``: the same seed gives the same output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn


def knn_graph(pos: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """Indices ``[n, k']`` of the ``k' = min(k, n - 1)`` nearest other points of ``pos [n, d]``.

    Distances are computed ``block`` rows at a time, so memory is ``O(block * n)``, not ``O(n^2)``.
    """
    n = pos.shape[0]
    kk = min(int(k), n - 1)
    if kk < 1:
        return torch.empty((n, 0), dtype=torch.long, device=pos.device)
    out = []
    for a in range(0, n, block):
        d = torch.cdist(pos[a : a + block], pos)
        rows = torch.arange(d.shape[0], device=pos.device)
        d[rows, rows + a] = float("inf")
        out.append(d.topk(kk, dim=1, largest=False).indices)
    return torch.cat(out)


def _mlp(sizes: list[int], zero_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    linear = None
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    if zero_last and linear is not None:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return nn.Sequential(*layers)


class GraphDrift(nn.Module):
    """Drift ``[n, out_dim]`` from features ``h [n, F]``, positions ``p [n, 2]``, depth ``z`` and a kNN
    graph ``nbr [n, k]`` (all normalised). See the module docstring for the equation."""

    def __init__(self, n_features: int, out_dim: int, hidden: int = 64):
        super().__init__()
        self.psi = _mlp([2 * n_features + 2, hidden, hidden])
        self.phi = _mlp([n_features + 3 + hidden, hidden, hidden, out_dim], zero_last=True)

    def forward(self, h, p, z, nbr, rel_scale: float):
        n = h.shape[0]
        if nbr.shape[1]:
            hi = h[:, None, :].expand(-1, nbr.shape[1], -1)
            rel = (p[nbr] - p[:, None, :]) * rel_scale
            msg = self.psi(torch.cat([hi, h[nbr] - hi, rel], -1)).mean(1)
        else:  # a lone cell has no neighbours: an all-zero message
            msg = h.new_zeros(n, self.psi[-1].out_features)
        depth = h.new_full((n, 1), float(z))
        return self.phi(torch.cat([h, p, depth, msg], -1))


class FlowModel(nn.Module):
    """Shape and expression drifts plus the normalisation that maps um / PC units to O(1) numbers.

    Built from plain hyper-parameters and loaded from a ``state_dict`` (buffers included), so a task can
    rebuild it from arrays stored in the atlas: no pickled modules.
    """

    center: torch.Tensor
    length: torch.Tensor
    neighbour: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, n_features: int, hidden: int = 64, k: int = 10):
        super().__init__()
        self.n_features, self.hidden, self.k = int(n_features), int(hidden), int(k)
        self.shape = GraphDrift(n_features, 2, hidden)
        self.expression = GraphDrift(n_features, n_features, hidden)
        self.register_buffer("center", torch.zeros(2))
        self.register_buffer("length", torch.ones(()))  # um per normalised unit (p and z)
        self.register_buffer("neighbour", torch.ones(()))  # typical kNN distance, um
        self.register_buffer("feature_scale", torch.ones(n_features))

    def config(self) -> dict:
        return {"n_features": self.n_features, "hidden": self.hidden, "k": self.k}

    def set_normalisation(self, center, length: float, neighbour: float, feature_scale) -> None:
        self.center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.length.fill_(float(length))
        self.neighbour.fill_(float(neighbour))
        self.feature_scale.copy_(torch.as_tensor(feature_scale, dtype=torch.float32))

    def encode(self, p_um: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (p_um - self.center) / self.length, h / self.feature_scale

    def decode(self, p: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return p * self.length + self.center, h * self.feature_scale

    def drift(self, p, h, z_um: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and expression drifts ``([n, 2], [n, F])`` at normalised ``p``, ``h`` and depth ``z_um``, per
        normalised unit of depth travelled in this model's direction."""
        nbr = knn_graph(p.detach(), self.k)
        rel = float(self.length / self.neighbour)
        z = float(z_um / self.length)
        return self.shape(h, p, z, nbr, rel), self.expression(h, p, z, nbr, rel)

    def step(
        self,
        p,
        h,
        z_um: float,
        dz_um: float,
        noise_pos: float,
        noise_expr: float,
        generator: torch.Generator | None = None,
    ):
        """One Euler-Maruyama step of ``dz_um`` (> 0, in this model's direction) on normalised ``p``, ``h``."""
        a, b = self.drift(p, h, z_um)
        dz = float(dz_um / self.length)
        dp, dh = a * dz, b * dz
        if noise_pos > 0:
            dp = dp + noise_pos * math.sqrt(dz) * torch.randn(
                p.shape, generator=generator, device=p.device, dtype=p.dtype
            )
        if noise_expr > 0:
            dh = dh + noise_expr * math.sqrt(dz) * torch.randn(
                h.shape, generator=generator, device=h.device, dtype=h.dtype
            )
        return p + dp, h + dh


def n_steps(gap_um: float, dz_um: float) -> int:
    """Euler steps across a gap: ``max(1, round(gap / dz))`` equal steps (each close to ``dz``)."""
    return max(1, int(round(abs(gap_um) / dz_um)))


def integrate(
    model: FlowModel,
    p_um: torch.Tensor,
    h: torch.Tensor,
    z0: float,
    z1: float,
    dz_um: float,
    noise_pos: float = 0.0,
    noise_expr: float = 0.0,
    generator: torch.Generator | None = None,
):
    """Flow cells from depth ``z0`` to ``z1`` (um; ``z1 < z0`` for a backward model) in ``n_steps`` equal steps.

    Returns the list of ``(z_um, p_um [n, 2], h [n, F])`` after each step; the last entry is at ``z1``.
    """
    steps = n_steps(z1 - z0, dz_um)
    h_step = abs(z1 - z0) / steps
    sign = 1.0 if z1 >= z0 else -1.0
    p, f = model.encode(p_um, h)
    out = []
    z = z0
    for i in range(steps):
        p, f = model.step(p, f, z, h_step, noise_pos, noise_expr, generator)
        z = z0 + sign * h_step * (i + 1)
        out.append((z,) + model.decode(p, f))
    return out


def path_loss(
    model: FlowModel,
    src_p: torch.Tensor,
    src_h: torch.Tensor,
    depths: list[float],
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    dz_um: float,
    expression_weight: float = 1.0,
    eps: float = 0.01,
    noise_pos: float = 0.0,
    noise_expr: float = 0.0,
    action_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Cells flowed along a path of sections, fitted to the observed cells at every section of it.

    ``depths``: ``L + 1`` depths (um), the source's first; ``targets``: ``L`` pairs ``(p_um [m, 2], h [m, F])``
    observed at ``depths[1:]``. The same cells are carried from one section to the next (not re-sampled), so
    one drift has to explain the motion over several gaps::

        loss = (sum_i S_eps(x_i, y_i) + action_weight * A) / L        x_i: cells flowed to depths[i + 1]

    ``S_eps`` up to a constant of the target (:func:`lamina.kernels.ot.sinkhorn_loss`), in the normalised
    compared space ``[p~, w h~]`` (``w = expression_weight``); ``A = sum_steps mean_i |dx_i|^2 / dz~`` the
    kinetic action over the whole path (the dynamic-OT energy: among flows that reach the targets it prefers
    the straightest; where the samples give no consistent signal it keeps the drift near zero). Dividing by
    ``L`` keeps the balance of fit and action per gap the same for every path length.

    Returns ``(loss, fits, flowed, observed)``: ``fits`` the ``L`` transport terms (tensors), ``flowed`` and
    ``observed`` the cells ``[n, 2 + F]`` / ``[m, 2 + F]`` in the compared space at each target (for
    :func:`divergence_excess`).
    """
    from .ot import sinkhorn_loss

    if len(depths) != len(targets) + 1 or not targets:
        raise ValueError(f"a path needs one more depth than targets, got {len(depths)} depths, {len(targets)} targets")
    scale = torch.cat([torch.ones(2), torch.full((src_h.shape[1],), float(expression_weight))]).to(src_p)
    p, h = src_p, src_h
    state = torch.cat(model.encode(p, h), 1)
    action = src_p.new_zeros(())
    fits, flowed, observed = [], [], []
    for z0, z1, (tp, th) in zip(depths[:-1], depths[1:], targets):
        layers = integrate(model, p, h, z0, z1, dz_um, noise_pos, noise_expr, generator)
        dz = abs(z1 - z0) / len(layers) / float(model.length)
        for _, p, h in layers:
            nxt = torch.cat(model.encode(p, h), 1)
            action = action + (((nxt - state) * scale) ** 2).sum(1).mean() / dz
            state = nxt
        x = state * scale
        y = torch.cat(model.encode(tp, th), 1) * scale
        fits.append(sinkhorn_loss(x, y, eps))
        flowed.append(x)
        observed.append(y)
    loss = (sum(fits) + action_weight * action) / len(targets)
    return loss, fits, flowed, observed


def flow_loss(
    model: FlowModel,
    src_p: torch.Tensor,
    src_h: torch.Tensor,
    z0: float,
    z1: float,
    tgt_p: torch.Tensor,
    tgt_h: torch.Tensor,
    dz_um: float,
    **options: Any,
) -> torch.Tensor:
    """:func:`path_loss` over one gap (its keyword ``options``): cells flowed from ``z0`` to ``z1`` against the cells
    observed at ``z1`` (positions in um ``[n, 2]``, features ``[n, F]``)."""
    return path_loss(model, src_p, src_h, [z0, z1], [(tgt_p, tgt_h)], dz_um, **options)[0]


def matching_loss(
    model: FlowModel,
    src_p: torch.Tensor,
    src_h: torch.Tensor,
    z0: float,
    z1: float,
    tgt_p: torch.Tensor,
    tgt_h: torch.Tensor,
    expression_weight: float = 1.0,
    eps: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow matching on an entropic OT coupling of two samples (minibatch OT conditional flow matching).

    Source cells ``x_i`` (``src_p [n, 2]`` um, ``src_h [n, F]``, at ``z0``) are paired with target cells
    (``[m, 2]``, ``[m, F]`` at ``z1``) drawn from the rows of the entropic plan in the compared space
    ``[p~, w h~]`` (``w = expression_weight``): ``j(i) ~ pi_ij / sum_j pi_ij``. With one ``t ~ U(0, 1)`` per call,
    the drift is regressed on the straight path's velocity at the interpolated cells::

        x_t = (1 - t) x_i + t y_j(i),     u = (y_j(i) - x_i) / |dz~|,     dz~ = (z1 - z0) / length
        loss = mean_i |a(x_t) - u_p|^2 + w^2 |b(x_t) - u_h|^2        at depth z0 + t (z1 - z0)

    (``a``, ``b``: the shape and expression drifts on the kNN graph of the interpolated positions, all normalised.)
    Unlike the transport loss of :func:`path_loss`, no gradient runs through the integration: the drift's target
    is the plan's own displacement, so a structure the plan moves is moved by the whole amount it moves, not
    shrunk by an action term.
    """
    from .ot import sinkhorn_duals, sq_dist

    w = float(expression_weight)
    x0 = torch.cat(model.encode(src_p, src_h), 1)
    x1 = torch.cat(model.encode(tgt_p, tgt_h), 1)
    scale = torch.cat([torch.ones(2), torch.full((src_h.shape[1],), w)]).to(x0)
    with torch.no_grad():
        C = sq_dist(x0 * scale, x1 * scale)
        _, g = sinkhorn_duals(C, eps)
        rows = torch.softmax((g[None, :] - C) / eps, 1)  # pi_i. / pi_i.1, the f_i term cancels
        j = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        t = float(torch.rand((), generator=generator, device=x0.device))
    y = x1[j]
    dz = abs(z1 - z0) / float(model.length)
    xt = (1 - t) * x0 + t * y
    u = (y - x0) / dz
    a, b = model.drift(xt[:, :2], xt[:, 2:], z0 + t * (z1 - z0))
    return ((a - u[:, :2]) ** 2).sum(1).mean() + w**2 * ((b - u[:, 2:]) ** 2).sum(1).mean()


def compared_space(model: FlowModel, p_um: torch.Tensor, h: torch.Tensor, expression_weight: float) -> torch.Tensor:
    """Cells ``[n, 2 + F]`` in the space the flow's transport compares: ``[p~, w h~]`` (see :func:`path_loss`)."""
    p, f = model.encode(p_um, h)
    return torch.cat([p, f * float(expression_weight)], 1)


@torch.no_grad()
def divergence_excess(
    x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, eps: float, fit: torch.Tensor | None = None
) -> tuple[float, float]:
    """How far cells ``x`` are from a target sample ``y`` beyond sampling noise, in the compared space.

    Returns ``(S_eps(x, y) - S_eps(y2, y), S_eps(y2, y))`` where ``y2`` is a second sample of the same section as
    ``y``, disjoint from it and of the same size: ``S_eps(y2, y)`` is the noise floor, the divergence a perfect
    prediction drawn as a sample of that size would still have, so the excess is ~0 for a flow that has learnt
    all there is to learn (the raw loss of two 512-cell samples is dominated by that floor). ``fit``: the
    training step's ``sinkhorn_loss(x, y)`` (from :func:`path_loss`), so it is not solved again.
    """
    from .ot import sinkhorn_divergence

    floor = float(sinkhorn_divergence(y2, y, eps))
    return float(sinkhorn_divergence(x, y, eps, loss=fit)) - floor, floor


def binned_errors(
    xy: np.ndarray, h: np.ndarray, weights: np.ndarray, target_xy: np.ndarray, target_h: np.ndarray, per_bin: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin squared differences of binned mean-feature maps of a prediction and of observed cells.

    ``xy [n, 2]`` (um), ``h [n, F]``, ``weights [n]`` (>= 0) are the predicted cells; ``target_xy [m, 2]``,
    ``target_h [m, F]`` the observed ones. Square bins of side ``sqrt(area / (m / per_bin))`` over the target's
    bounding box, so a bin holds ``per_bin`` observed cells on average (the grid depends on the target only: two
    predictions of one target share it). Returns ``(e [B], c [B])``::

        e_b = |mean_pred_b - mean_obs_b|^2       (NaN where either map has no cell in bin b)
        c_b = observed cells in bin b

    Prediction cells outside the box are ignored.
    """
    lo, hi = target_xy.min(0), target_xy.max(0)
    side = float(np.sqrt(max(np.prod(hi - lo), 1e-12) / max(len(target_xy) / per_bin, 1.0)))
    shape = np.maximum(np.ceil((hi - lo) / side).astype(np.int64), 1)

    def binned(p, f, w):
        ij = np.floor((p - lo) / side).astype(np.int64)
        ok = (ij >= 0).all(1) & (ij < shape).all(1)
        flat = ij[ok, 1] * shape[0] + ij[ok, 0]
        nb = int(shape[0] * shape[1])
        mass = np.bincount(flat, weights=w[ok], minlength=nb)
        sums = np.stack([np.bincount(flat, weights=w[ok] * f[ok, j], minlength=nb) for j in range(f.shape[1])], 1)
        return sums / np.maximum(mass, 1e-300)[:, None], mass

    pred, pm = binned(np.asarray(xy, np.float64), np.asarray(h, np.float64), np.asarray(weights, np.float64))
    obs, om = binned(np.asarray(target_xy, np.float64), np.asarray(target_h, np.float64), np.ones(len(target_xy)))
    e = ((pred - obs) ** 2).sum(1)
    e[(pm <= 0) | (om <= 0)] = np.nan
    return e, om


def map_error(
    xy: np.ndarray, h: np.ndarray, weights: np.ndarray, target_xy: np.ndarray, target_h: np.ndarray, per_bin: int = 16
) -> float:
    """Mean squared difference of binned mean-feature maps of a prediction and of observed cells
    (:func:`binned_errors` ``e``, ``c``), over the bins where both have cells::

        E = sum_b c_b e_b / sum_b c_b

    ``inf`` where no bin has both.
    """
    return mean_error(*binned_errors(xy, h, weights, target_xy, target_h, per_bin))


def mean_error(e: np.ndarray, c: np.ndarray) -> float:
    """``sum_b c_b e_b / sum_b c_b`` over the bins where ``e [B]`` is finite (:func:`binned_errors`); ``inf`` where
    none is."""
    both = np.isfinite(e)
    if not both.any():
        return float("inf")
    return float((c[both] * e[both]).sum() / c[both].sum())


def paired_gain(before: np.ndarray, after: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """How much a map's per-bin errors fell, and the standard error of that, over the bins where both are finite.

    ``before``, ``after``, ``counts`` ``[B]`` (:func:`binned_errors` of two predictions of one target)::

        d_b = before_b - after_b,   w_b = c_b / sum c,   gain = sum_b w_b d_b
        se^2 = n / (n - 1) * sum_b w_b^2 (d_b - gain)^2          n: bins used

    A gain of a few ``se`` is one the bins agree on, not a few bins' noise. ``(nan, nan)`` with fewer than 2 bins.
    """
    ok = np.isfinite(before) & np.isfinite(after) & (counts > 0)
    n = int(ok.sum())
    if n < 2:
        return float("nan"), float("nan")
    w = counts[ok] / counts[ok].sum()
    d = before[ok] - after[ok]
    gain = float((w * d).sum())
    return gain, float(np.sqrt(n / (n - 1) * (w**2 * (d - gain) ** 2).sum()))

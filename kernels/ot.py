"""Entropic optimal transport between two point clouds (torch), for training flows on unpaired samples.

Cost ``C_ij = |x_i - y_j|^2`` (the caller stacks scaled positions and features into ``x``, ``y``).
``OT_eps(a, b) = min_pi <pi, C> + eps KL(pi | a (x) b)`` is solved by log-domain Sinkhorn with
eps-annealing (start at the cloud's squared diameter, halve to ``eps``), and the debiased divergence

    S_eps(x, y) = OT_eps(x, y) - OT_eps(x, x) / 2 - OT_eps(y, y) / 2          (>= 0, = 0 iff x ~ y)

is returned. For training, :func:`sinkhorn_loss` drops the ``OT_eps(y, y)`` term, a constant of the target sample
that moves no gradient. Gradients use the envelope theorem: at the optimum dOT/dC = pi*, so the backward pass is one
differentiable evaluation of ``<pi*, C(x, y)>`` with the plan held fixed, not back-propagation through the Sinkhorn
iterations (memory O(n m) once instead of per iteration).
"""

from __future__ import annotations

import math

import torch


def sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, d], [m, d] -> [n, m]`` squared Euclidean distances (clamped at 0)."""
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None] - 2.0 * x @ y.T).clamp_min(0.0)


def _lse(M: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp along ``dim``; terms below exp(-60) of the largest are set to that floor, because
    float32 exp is several times slower on deeply negative inputs and they change nothing in the sum."""
    mx = M.amax(dim, keepdim=True)
    return (M - mx).clamp_(min=-60.0).exp_().sum(dim).log_() + mx.squeeze(dim)


@torch.no_grad()
def sinkhorn_duals(C: torch.Tensor, eps: float, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials ``(f [n], g [m])`` of OT_eps with uniform weights on cost ``C [n, m]``.

    f_i = -e log sum_j b_j exp((g_j - C_ij) / e), g_j likewise, with e annealed from max(C) to ``eps``
    (one update per factor 4, i.e. blur sqrt(e) halved) and then ``iters`` updates at ``eps``.
    """
    n, m = C.shape
    loga, logb = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=C.dtype, device=C.device)
    g = torch.zeros(m, dtype=C.dtype, device=C.device)
    e = max(float(C.max()), eps)
    schedule = []
    while e > eps:
        schedule.append(e)
        e /= 4.0
    schedule += [eps] * iters
    for e in schedule:
        f = -e * _lse(logb + (g[None, :] - C) / e, 1)
        g = -e * _lse(loga + (f[:, None] - C) / e, 0)
    return f, g


def _ot(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """OT_eps(x, y) with the true value and the envelope-theorem gradient w.r.t. ``x`` and ``y``."""
    C = sq_dist(x, y)
    f, g = sinkhorn_duals(C.detach(), eps, iters)
    value = f.mean() + g.mean()
    n, m = C.shape
    plan = torch.exp((f[:, None] + g[None, :] - C.detach()) / eps - math.log(n) - math.log(m))
    surrogate = (plan * C).sum()
    return surrogate - surrogate.detach() + value


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, eps: float = 0.01, iters: int = 10, loss: torch.Tensor | None = None
) -> torch.Tensor:
    """Debiased ``S_eps(x, y)`` between clouds ``x [n, d]`` and ``y [m, d]`` (uniform weights); scalar.

    ``loss``: ``sinkhorn_loss(x, y, eps, iters)`` when the caller already has it (only ``OT_eps(y, y)`` is then
    solved)."""
    if loss is None:
        loss = sinkhorn_loss(x, y, eps, iters)
    return loss - 0.5 * _ot(y, y, eps, iters)


def sinkhorn_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 0.01, iters: int = 10) -> torch.Tensor:
    """``S_eps(x, y) + OT_eps(y, y) / 2``: the divergence up to a constant of ``y``, at two thirds the cost."""
    return _ot(x, y, eps, iters) - 0.5 * _ot(x, x, eps, iters)

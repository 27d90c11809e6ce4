"""A small cell encoder trained with a niche pair objective (torch).

Convention: ``x`` ``[B, D]`` float32 niche features (``/embeddings/niche``), standardised per dimension by
the model's own buffers; the output ``[B, E]`` has unit L2 norm.

Objective (InfoNCE, symmetric): for anchors ``a_i`` and their positives ``p_i`` (a random neighbour within
``positive_um``), with ``s_ij = <f(a_i), f(p_j)> / tau``,
``L = -(1 / 2B) sum_i [log softmax_j(s_ij)_i + log softmax_j(s_ji)_i]``, where the negatives of anchor
``i`` are the other positives ``p_j`` of the batch except those nearer than ``negative_um`` to ``a_i``
(masked out): ``B - 1`` candidate negatives per positive, all of them random cells of the atlas.
"""

from __future__ import annotations

import torch
from torch import nn


class CellEncoder(nn.Module):
    """``[B, D]`` -> ``[B, E]`` unit vectors: standardise, two residual MLP blocks, project, normalise."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_in: int, hidden: int = 128, n_out: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.inp = nn.Linear(n_in, hidden)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()) for _ in range(2)]
        )
        self.out = nn.Linear(hidden, n_out)

    def set_normalisation(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.clamp(torch.as_tensor(std, dtype=torch.float32), min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"CellEncoder expects [B, {self.mean.shape[0]}] features, got {tuple(x.shape)}")
        h = self.inp((x - self.mean) / self.std)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.normalize(self.out(h), dim=1)


def pair_loss(za: torch.Tensor, zp: torch.Tensor, near: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of anchors ``za`` ``[B, E]`` and positives ``zp`` ``[B, E]`` (unit vectors);
    ``near`` ``[B, B]`` bool marks pairs (i, j != i) too close to be negatives (excluded)."""
    if za.shape != zp.shape or near.shape != (za.shape[0], za.shape[0]):
        raise ValueError(f"pair_loss: za {tuple(za.shape)}, zp {tuple(zp.shape)}, near {tuple(near.shape)}")
    s = za @ zp.T / float(temperature)
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    s = s.masked_fill(near & ~eye, float("-inf"))
    target = torch.arange(len(s), device=s.device)
    return 0.5 * (nn.functional.cross_entropy(s, target) + nn.functional.cross_entropy(s.T, target))


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local file: ``.safetensors``, or a torch checkpoint read with ``weights_only=True``
    (tensors only: a file that needs unpickling arbitrary objects is refused). Raises ``ValueError``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (and others) for what it will not load safely
        raise ValueError(f"{path} is not a weights-only checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return state

"""A Vision Transformer built from a state_dict in timm's layout (e.g. UNI), and its patch tokens over an image
of any size by overlapping windows anchored to one global grid (torch).

Layout read (timm ``VisionTransformer``, pre-norm blocks, LayerNorm eps 1e-6, GELU MLP, optional LayerScale)::

    patch_embed.proj.{weight [D, 3, P, P], bias}   cls_token [1, 1, D]   reg_token [1, R, D] (optional)
    pos_embed [1, g*g (+ 1 + R), D]                 norm.{weight, bias}
    blocks.<i>.norm1 / attn.qkv [3D, D] / attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma

Convention: images ``[B, 3, H, W]`` float in [0, 1] (RGB), normalised inside by ImageNet's mean and sd; tokens
``[B, D, H / P, W / P]``; ``g`` is the grid the position embedding was trained on (a window is ``g * P`` px).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: the normalisation of ImageNet, which timm's pathology ViTs (UNI and its kin) were trained with
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class _Block(nn.Module):
    """``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``; attention over ``heads`` of ``D / heads``."""

    def __init__(self, dim: int, heads: int, hidden: int, layer_scale: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)
        self.ls1 = _LayerScale(dim) if layer_scale else None
        self.ls2 = _LayerScale(dim) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D)
        a = self.attn.proj(a)
        x = x + (a if self.ls1 is None else a * self.ls1.gamma)
        m = self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + (m if self.ls2 is None else m * self.ls2.gamma)


class ViT(nn.Module):
    """The encoder; build it with :meth:`from_state_dict` (its shapes come from the weights)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int, patch: int, depth: int, heads: int, hidden: int, grid: int, reg: int, **flags):
        super().__init__()
        self.patch, self.grid, self.dim = patch, grid, dim
        self.embed_class = bool(flags.get("embed_class", True))
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg, dim)) if reg else None
        prefix = (1 + reg) if self.embed_class else 0
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + prefix, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden, bool(flags.get("layer_scale"))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_state_dict(cls, state: dict, heads: int | None = None) -> ViT:
        """The model whose shapes the weights give; ``heads`` default ``D / 64`` (every ViT-S/B/L/H of timm).
        Raises ``KeyError`` naming the first missing key, ``ValueError`` for a layout it does not read."""
        for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.weight"):
            if key not in state:
                raise KeyError(key)
        if any(".mlp.fc1_g." in k or ".mlp.w12." in k for k in state):
            raise ValueError("a SwiGLU MLP (e.g. UNI2-h, Virchow2): lamina reads the GELU MLP of ViT-S/B/L/H")
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
        tokens = int(state["pos_embed"].shape[1])

        def square(n: int) -> bool:
            return n > 0 and int(round(math.sqrt(n))) ** 2 == n

        embed_class = square(tokens - 1 - reg)  # timm's default: the class (and register) tokens have positions
        if not embed_class and not square(tokens):
            raise ValueError(f"pos_embed holds {tokens} tokens: not a square grid (+ class / register tokens)")
        grid = int(round(math.sqrt(tokens - (1 + reg if embed_class else 0))))
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        model = cls(
            dim,
            patch,
            depth,
            heads,
            hidden,
            grid,
            reg,
            embed_class=embed_class,
            layer_scale="blocks.0.ls1.gamma" in state,
        )
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise KeyError(missing[0])
        model.load_state_dict({k: state[k] for k in wanted})
        return model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, g P, g P]`` in [0, 1] -> patch tokens ``[B, D, g, g]`` (after the final norm)."""
        B, _, H, W = images.shape
        if (H, W) != (self.grid * self.patch,) * 2:
            raise ValueError(f"ViT: windows must be {self.grid * self.patch} px square, got {H} x {W}")
        x = self.patch_embed.proj((images - self.mean) / self.std).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.embed_class:
            x = torch.cat([*prefix, x], 1) + self.pos_embed
        else:
            x = torch.cat([*prefix, x + self.pos_embed], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, len(prefix) :]
        return x.transpose(1, 2).reshape(B, self.dim, self.grid, self.grid)


def window_margin(grid: int) -> int:
    """Tokens dropped at each side of a window (they see less context): an eighth of it, at least 1."""
    return max(1, grid // 8) if grid > 2 else 0


def token_halo(grid: int) -> int:
    """Tokens of context a tile needs on each side so that each of its tokens comes from the same window
    whatever the tiling: a token is read from the window that holds it at least ``margin`` from its edge, and
    that window reaches ``grid - margin`` tokens past it; + 1 for the resampling's support."""
    return grid - window_margin(grid) + 1


def patch_token_map(
    model: ViT,
    rgb: torch.Tensor,
    origin: tuple[int, int],
    shape: tuple[int, int],
    halo: int,
    batch: int = 16,
) -> torch.Tensor:
    """Tokens ``[D, h, w]`` of an RGB block ``[3, h P, w P]`` in [0, 1], one token per ``P x P`` px, the block's
    token ``(0, 0)`` being token ``origin`` of an image of ``shape`` tokens; the block carries ``halo`` tokens
    of context on each side that is not the image's edge (their own tokens are filled, not exact).

    Windows of ``g x g`` tokens start at multiples of the stride ``s = g - 2 m`` (``m``: :func:`window_margin`)
    of the global token grid; token ``i`` is read from window ``j = clip(floor((i - m) / s), 0, last)``, so the
    result does not depend on the tiling when ``halo >= token_halo(g)`` (else a ``ValueError``). Window pixels
    outside the image are white (H&E background).
    """
    g, P = model.grid, model.patch
    m = window_margin(g)
    s = g - 2 * m
    _, Hp, Wp = rgb.shape
    h, w = Hp // P, Wp // P
    if h * P != Hp or w * P != Wp:
        raise ValueError(f"patch_token_map: the block ({Hp} x {Wp} px) is not whole {P} px patches")

    def owners(start: int, n: int, total: int) -> tuple[np.ndarray, int, int]:
        last = -(-(total - g) // s) if total > g else 0
        j = np.clip((np.arange(start, start + n) - m) // s, 0, last)
        lo = 0 if start == 0 else halo  # the core: what the caller keeps
        hi = n if start + n >= total else n - halo
        if hi <= lo:
            raise ValueError(f"patch_token_map: a block of {n} tokens has no core inside a halo of {halo}")
        j = np.clip(j, j[lo], j[hi - 1])
        if (j[lo] * s < start and start > 0) or (j[hi - 1] * s + g > start + n and start + n < total):
            raise ValueError(
                f"patch_token_map: a halo of {halo} tokens is too small for windows of {g} (needs {token_halo(g)})"
            )
        return j, int(j[lo]), int(j[hi - 1])

    (r0, c0), (H, W) = origin, shape
    jr, ir0, ir1 = owners(r0, h, H)
    jc, jc0, jc1 = owners(c0, w, W)
    lo_r, hi_r, lo_c, hi_c = ir0 * s, ir1 * s + g, jc0 * s, jc1 * s + g
    canvas = torch.ones(3, (hi_r - lo_r) * P, (hi_c - lo_c) * P, dtype=rgb.dtype, device=rgb.device)
    a, b = max(lo_r, r0), min(hi_r, r0 + h)
    c, d = max(lo_c, c0), min(hi_c, c0 + w)
    canvas[:, (a - lo_r) * P : (b - lo_r) * P, (c - lo_c) * P : (d - lo_c) * P] = rgb[
        :, (a - r0) * P : (b - r0) * P, (c - c0) * P : (d - c0) * P
    ]
    starts = [(i, j) for i in range(ir0, ir1 + 1) for j in range(jc0, jc1 + 1)]
    crops = torch.stack(
        [
            canvas[:, (i * s - lo_r) * P : (i * s - lo_r + g) * P, (j * s - lo_c) * P : (j * s - lo_c + g) * P]
            for i, j in starts
        ]
    )
    with torch.inference_mode():
        tokens = torch.cat([model(crops[k : k + batch]) for k in range(0, len(crops), batch)])
    out = torch.zeros(model.dim, h, w, dtype=tokens.dtype, device=tokens.device)
    for n, (i, j) in enumerate(starts):  # each window fills the tokens it owns (contiguous rows and columns)
        pr, pc = r0 + np.arange(h) - i * s, c0 + np.arange(w) - j * s  # positions in the window
        rows = np.flatnonzero((jr == i) & (pr >= 0) & (pr < g))
        cols = np.flatnonzero((jc == j) & (pc >= 0) & (pc < g))
        if len(rows) and len(cols):
            rr, cc = int(pr[rows[0]]), int(pc[cols[0]])
            out[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = tokens[n][
                :, rr : rr + len(rows), cc : cc + len(cols)
            ]
    return out


def patch_pixels(block: np.ndarray, factor: int, patch: int) -> torch.Tensor:
    """An image block ``[C, H, W]`` (C = 1, 3 or 4; integers 0-255 or floats 0-1) whose superpixels are
    ``factor`` px -> RGB ``[3, h P, w P]`` float32 in [0, 1], one ``P x P`` patch per superpixel
    (``h = ceil(H / factor)``; a partial last superpixel is padded white, the background of H&E). Bilinear with
    antialiasing: a pixel depends on at most one superpixel of context on each side.
    """
    b = np.asarray(block)
    if b.ndim != 3 or b.shape[0] not in (1, 3, 4):
        raise ValueError(f"patch_pixels expects [1|3|4, H, W], got {b.shape}")
    b = np.repeat(b, 3, axis=0) if b.shape[0] == 1 else b[:3]
    x = torch.from_numpy(np.ascontiguousarray(b)).float()
    if b.dtype.kind in "ui" or float(x.max()) > 1.0:
        x = x / 255.0
    _, H, W = x.shape
    h, w = -(-H // factor), -(-W // factor)
    x = F.pad(x, (0, w * factor - W, 0, h * factor - H), value=1.0)
    if factor == patch:
        return x
    return F.interpolate(x[None], size=(h * patch, w * patch), mode="bilinear", antialias=True, align_corners=False)[0]

"""A synthetic section with an H&E-like image whose information about expression is controlled: the truth of
the ``enhance`` stage.

The tissue has ``n_fields`` smooth random fields ``f_k(x, y)``: sums of Gaussian bumps 25-70 um wide, finer
than the spot pitch, so that spots undersample them. Gene ``g``'s expression is ``log1p`` of a non-negative mix
of the fields (its truth at every point). The image is stained by the same fields with weight ``info`` (0: the
stain carries none of them and follows an independent field instead; 1: all of it): haematoxylin ~ the first
field, eosin ~ the second, with pixel noise. Spots sit on a square lattice (``pitch_um``) and measure the truth
averaged over their footprint plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class HistologyPhantom:
    table: pd.DataFrame  # section, x, y (px), visible (int8), one column per gene (measured)
    genes: list[str]
    truth: np.ndarray  # [spot, gene]: the noise-free footprint means
    images: dict  # {section: path of a PNG}
    pixel_size_um: float
    truth_fn: object  # (x_um [n], y_um [n]) -> [n, gene]: the field at points


def _fields(rng, n_fields: int, size_um: float, bumps: int = 60):
    centres = rng.uniform(0, size_um, (n_fields, bumps, 2))
    widths = rng.uniform(25, 70, (n_fields, bumps))
    amps = rng.uniform(0.5, 1.5, (n_fields, bumps))

    def at(x, y):
        d2 = (x[None, None] - centres[..., 0, None]) ** 2 + (y[None, None] - centres[..., 1, None]) ** 2
        return (amps[..., None] * np.exp(-d2 / (2 * widths[..., None] ** 2))).sum(1)  # [n_fields, n]

    def on_grid(coords):
        """The fields ``[n_fields, n, n]`` (row = y) on the square grid ``coords [n]`` x ``coords [n]``: a
        Gaussian bump is separable, so each field is ``Gy^T diag(amps) Gx``, not ``n^2 x bumps`` exponentials."""
        gx, gy = (np.exp(-((coords - centres[..., a, None]) ** 2) / (2 * widths[..., None] ** 2)) for a in (0, 1))
        return np.einsum("fbi,fb,fbj->fij", gy, amps, gx, optimize=True)

    return at, on_grid


def histology_phantom(
    seed: int = 0,
    size_um: float = 1600.0,
    pixel_size_um: float = 2.0,
    pitch_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    n_genes: int = 12,
    n_fields: int = 3,
    info: float = 1.0,
    noise: float = 0.15,
    folder=None,
    section: str = "S0",
) -> HistologyPhantom:
    """One section of ``size_um`` square; its image written as a PNG into ``folder`` (a temporary folder when
    None). Spots whose (col + row) is even are ``visible``; the others are the hidden ones a benchmark scores."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(seed)
    expr_fields, expr_grid = _fields(rng, n_fields, size_um)
    _, other_grid = _fields(rng, n_fields, size_um)
    mix = rng.uniform(0, 1, (n_genes, n_fields)) * (rng.uniform(0, 1, (n_genes, n_fields)) < 0.7)
    mix[np.arange(n_genes), np.arange(n_genes) % n_fields] += 1.0

    def truth_fn(x, y):
        return np.log1p(2.0 * (mix @ expr_fields(np.asarray(x, float), np.asarray(y, float)))).T

    n = int(size_um / pixel_size_um)
    centres = (np.arange(n) + 0.5) * pixel_size_um
    stain = info * expr_grid(centres)[:2] + (1 - info) * other_grid(centres)[:2]
    stain = stain.reshape(2, n * n)
    stain = stain / max(float(stain.max()), 1e-9)
    texture = rng.normal(0, 0.05, (2, n * n))
    h, e = np.clip(stain[0] + texture[0], 0, 1.2), np.clip(stain[1] + texture[1], 0, 1.2)
    od_h = np.array([0.65, 0.70, 0.29])
    od_e = np.array([0.07, 0.99, 0.11])
    od = 1.2 * h[:, None] * od_h + 0.8 * e[:, None] * od_e + 0.05
    rgb = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8).reshape(n, n, 3)
    folder = Path(folder or tempfile.mkdtemp(prefix="lamina-histology-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{section}.png"
    Image.fromarray(rgb).save(path)

    k = int(size_um // pitch_um)
    cols, rows = np.meshgrid(np.arange(k), np.arange(k))
    cols, rows = cols.ravel(), rows.ravel()
    sx, sy = (cols + 0.5) * pitch_um, (rows + 0.5) * pitch_um
    # the footprint mean of the truth, from 61 points in the spot's disc
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    r = spot_diameter_um / 2
    ox = np.concatenate([[0], 0.5 * r * np.cos(t[::2]), 0.8 * r * np.cos(t), r * np.cos(t + 0.1)])
    oy = np.concatenate([[0], 0.5 * r * np.sin(t[::2]), 0.8 * r * np.sin(t), r * np.sin(t + 0.1)])
    truth = truth_fn((sx[:, None] + ox).ravel(), (sy[:, None] + oy).ravel()).reshape(len(sx), len(ox), -1).mean(1)
    measured = np.maximum(truth + rng.normal(0, noise, truth.shape), 0)
    genes = [f"G{i:02d}" for i in range(n_genes)]
    table = pd.DataFrame(measured.astype(np.float32), columns=genes)
    table.insert(0, "section", section)
    table.insert(1, "x", sx / pixel_size_um)
    table.insert(2, "y", sy / pixel_size_um)
    table.insert(3, "visible", ((cols + rows) % 2 == 0).astype(np.int8))
    return HistologyPhantom(table, genes, truth, {section: path}, pixel_size_um, truth_fn)

"""Histology -> expression kernels of the ``enhance`` stage: weight-free image features on a superpixel grid,
their context, and the low-rank forward-sum model that maps them to metagene scores.

Convention:
    - images are ``[C, H, W]`` (C = 3 for RGB, 0-255 or 0-1) at one pyramid level; ``px_um`` is that level's
      pixel size in um;
    - a superpixel is a ``factor x factor`` block of image pixels; superpixel grids are ``[F, h, w]`` with
      ``h = ceil(H / factor)``;
    - spot scores ``W [spot, rank]`` and loadings ``H [rank, gene]`` are non-negative (NMF of the spots):
      expression ``x ~ W H``.

The model (iStar's forward-sum objective with a linear head): per superpixel ``p`` with standardised features
``z_p``, metagene scores ``s_p = z_p B + o_section``. A spot measures the mean over its footprint ``S``, so
``mean_{p in S} s_p = (mean_{p in S} z_p) B + o``: the fit needs only each spot's footprint-mean features,
solved in closed form by ridge regression (``fit_ridge``). What the image cannot explain is carried by the
spots themselves: the residuals ``r_s = W_s - mean_S s`` of the fitted spots, spread by a Gaussian kernel
(``residual_field``), are added to every superpixel ("regression kriging"); optionally each measured spot's
footprint is shifted so its mean equals its measurement exactly (``project_spots``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density RGB
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAINS = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)
#: filter-bank scales, in um (turned into pixels by the level's pixel size)
BANK_UM = (2.0, 4.0, 8.0)
#: per channel: a Gaussian at each scale, a gradient magnitude at the two finest, a Laplacian at the two coarsest
PER_CHANNEL = 3 + 2 + 2
CHANNELS = ("haematoxylin", "eosin", "dab", "grey")
N_FEATURES = len(CHANNELS) * PER_CHANNEL + 3  # + the within-superpixel sd of H, E and grey


def stain_density(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution: RGB ``[3, H, W]`` -> stain densities ``[3, H, W]`` (H, E, DAB), float64.

    ``od = -ln((I + 1) / 256)`` per channel (``I`` in 0-255; a 0-1 float image is scaled by 255 first), then
    ``od = d @ STAINS`` solved for ``d`` (Ruifrok & Johnston 2001).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"stain_density expects [3, H, W], got {rgb.shape}")
    img = rgb.astype(np.float64)
    if rgb.dtype.kind == "f" and img.size and float(np.nanmax(img)) <= 1.0:
        img = img * 255.0
    od = -np.log((np.clip(img, 0, 255) + 1.0) / 256.0)
    return np.einsum("chw,cd->dhw", od, np.linalg.inv(STAINS))


def _scales_px(px_um: float) -> list[float]:
    return [max(s / px_um, 0.5) for s in BANK_UM]


def feature_halo(px_um: float) -> int:
    """Pixels of context :func:`image_features` reads around each output pixel (4 sigma of its widest filter)."""
    return int(math.ceil(4 * max(_scales_px(px_um)))) + 1


def image_features(block: np.ndarray, px_um: float, factor: int) -> np.ndarray:
    """Superpixel features of an RGB (or grey) block: ``[C, H, W]`` -> ``[N_FEATURES, ceil(H/f), ceil(W/f)]``.

    Channels: H, E, DAB densities (:func:`stain_density`) and grey level (0-1). For each, Gaussian means at
    ``BANK_UM`` (2, 4, 8 um), gradient magnitudes at the two finest and Laplacians of Gaussian at the two
    coarsest scales; each pooled as the mean over the ``factor x factor`` superpixel, plus the sd of H, E and
    grey inside it (texture). A grey image (C = 1) is taken as R = G = B; an alpha channel (C = 4) is dropped.
    Filters see ``feature_halo(px_um)`` pixels of context (``mode='nearest'`` at the image border).
    """
    block = np.asarray(block)
    if block.ndim != 3 or block.shape[0] not in (1, 3, 4):
        raise ValueError(f"image_features expects [1|3|4, H, W], got {block.shape}")
    if block.shape[0] == 1:
        block = np.repeat(block, 3, axis=0)
    rgb = block[:3]
    dens = stain_density(rgb)
    scale = 255.0 if rgb.dtype.kind in "ui" or float(np.nanmax(rgb, initial=0)) > 1.0 else 1.0
    grey = rgb.astype(np.float64).mean(0, keepdims=True) / scale
    chans = np.concatenate([dens, grey], 0)
    s = _scales_px(px_um)
    maps = []
    for c in chans:
        maps += [ndi.gaussian_filter(c, si, mode="nearest") for si in s]
        maps += [ndi.gaussian_gradient_magnitude(c, si, mode="nearest") for si in s[:2]]
        maps += [ndi.gaussian_laplace(c, si, mode="nearest") for si in s[1:]]
    mean = pool_mean(np.stack(maps), factor)
    sq = pool_mean(chans[[0, 1, 3]] ** 2, factor)
    sd = np.sqrt(np.maximum(sq - pool_mean(chans[[0, 1, 3]], factor) ** 2, 0))
    return np.concatenate([mean, sd], 0).astype(np.float32)


def _image_features_halo(px_um: float, factor: int) -> int:
    return feature_halo(px_um)


image_features.required_halo = _image_features_halo  # type: ignore[attr-defined]


def pool_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Means over ``factor x factor`` blocks: ``[C, H, W]`` -> ``[C, ceil(H/f), ceil(W/f)]`` (a partial block at
    the bottom / right edge is the mean of the pixels it has)."""
    C, H, W = x.shape
    f = int(factor)
    h, w = -(-H // f), -(-W // f)
    pad = np.zeros((C, h * f, w * f), np.float64)
    cnt = np.zeros((h * f, w * f), np.float64)
    pad[:, :H, :W] = x
    cnt[:H, :W] = 1
    s = pad.reshape(C, h, f, w, f).sum((2, 4))
    n = cnt.reshape(h, f, w, f).sum((1, 3))
    return s / n


def context_features(block: np.ndarray, sigmas_sp: tuple[float, ...]) -> np.ndarray:
    """A superpixel feature block ``[F, h, w]`` and its Gaussian means at each of ``sigmas_sp`` (superpixels):
    ``[F * (1 + len(sigmas_sp)), h, w]``. ``mode='nearest'`` at the border; halo ``context_halo(sigmas_sp)``."""
    block = np.asarray(block, np.float64)
    out = [block]
    for s in sigmas_sp:
        out.append(np.stack([ndi.gaussian_filter(c, s, mode="nearest", truncate=4.0) for c in block]))
    return np.concatenate(out, 0).astype(np.float32)


def context_halo(sigmas_sp: tuple[float, ...]) -> int:
    """Superpixels of context :func:`context_features` reads (scipy's Gaussian radius at truncate 4)."""
    return max([int(4.0 * float(s) + 0.5) for s in sigmas_sp] + [0])


context_features.required_halo = context_halo  # type: ignore[attr-defined]


def footprints(centres_sp: np.ndarray, radius_sp: float, h: int, w: int, origin=(0, 0)):
    """The superpixels of each spot's footprint: those whose centres lie within ``radius_sp`` of the spot centre
    ``(col, row)`` (superpixel units, grid coordinates), and always the one nearest the centre; only those inside
    an ``h x w`` block whose first superpixel is at grid ``origin`` (row, col).

    Returns ``(rows [n, K], cols [n, K], inside [n, K])``: block positions of K candidates per spot and whether
    each belongs to the footprint and lies in the block.
    """
    c = np.asarray(centres_sp, np.float64).reshape(-1, 2) - np.array([origin[1], origin[0]], np.float64)
    r = max(float(radius_sp), 0.5)
    k = int(math.ceil(r))
    offs = np.arange(-k - 1, k + 2)
    dx, dy = np.meshgrid(offs, offs)
    cols = np.floor(c[:, 0]).astype(np.int64)[:, None] + dx.ravel()[None]
    rows = np.floor(c[:, 1]).astype(np.int64)[:, None] + dy.ravel()[None]
    d2 = (cols + 0.5 - c[:, :1]) ** 2 + (rows + 0.5 - c[:, 1:]) ** 2
    inside = d2 <= r * r
    if len(c):
        inside[np.arange(len(c)), np.argmin(d2, axis=1)] = True
    inside &= (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    return rows, cols, inside


def footprint_means(
    grid: np.ndarray, centres_sp: np.ndarray, radius_sp: float, origin: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``grid [F, h, w]`` over each footprint: the superpixels whose centres lie within ``radius_sp`` of a
    centre ``(col, row)`` in superpixel units (at least the superpixel under the centre).

    ``origin``: the grid position of ``grid[:, 0, 0]`` (a tile of a larger grid). Returns ``(means [n, F], count
    [n])``; a footprint with no superpixel in the block gets NaN and count 0.
    """
    F, h, w = grid.shape
    rows, cols, inside = footprints(centres_sp, radius_sp, h, w, origin)
    flat = grid.reshape(F, -1)
    idx = np.where(inside, rows * w + cols, 0)
    vals = flat[:, idx]  # [F, n, K]
    cnt = inside.sum(1)
    s = (vals * inside[None]).sum(2).T
    with np.errstate(invalid="ignore", divide="ignore"):
        means = s / cnt[:, None]
    return means, cnt


def _ridge_design(Z: np.ndarray, group: np.ndarray, n_groups: int, alpha):
    """``A = [Z, G]`` (``G`` the one-hot of the groups that hold rows), the penalty diagonal ``diag(alpha, 0)``
    and which groups hold rows."""
    G = np.zeros((len(Z), n_groups))
    G[np.arange(len(Z)), np.asarray(group, np.int64)] = 1.0
    present = G.sum(0) > 0
    A = np.concatenate([Z, G[:, present]], 1)
    return A, _penalty(alpha, Z.shape[1], int(present.sum())), present


def _penalty(alpha, F: int, n_offsets: int) -> np.ndarray:
    """The penalty diagonal ``[F + n_offsets]``: ``alpha`` (a number, or one per column of ``Z``), 0 for the
    offsets."""
    a = np.asarray(alpha, np.float64)
    if a.ndim and a.shape != (F,):
        raise ValueError(f"alpha must be a number or one per feature ({F}); got shape {a.shape}")
    return np.concatenate([np.broadcast_to(a, (F,)), np.zeros(n_offsets)])


def fit_ridge(Z: np.ndarray, W: np.ndarray, group: np.ndarray, n_groups: int, alpha: float | np.ndarray):
    """Ridge regression with an unpenalised offset per group: ``W [n, R] ~ Z [n, F] B + O[group]``.

    Solves ``min |W - Z B - G O|^2 + sum_f alpha_f |B_f|^2`` in closed form (``G`` the one-hot of ``group``;
    ``alpha`` a number or ``[F]``, one penalty per feature). Returns ``(B [F, R], O [n_groups, R])``; a group
    without rows gets the mean offset.
    """
    Z = np.asarray(Z, np.float64)
    W = np.asarray(W, np.float64)
    A, pen, present = _ridge_design(Z, group, n_groups, alpha)
    coef = np.linalg.solve(A.T @ A + np.diag(pen) + 1e-9 * np.eye(A.shape[1]), A.T @ W)
    B = coef[: Z.shape[1]]
    O = np.zeros((n_groups, W.shape[1]))
    O[present] = coef[Z.shape[1] :]
    if not present.all():
        O[~present] = O[present].mean(0)
    return B, O


def spatial_blocks(xy: np.ndarray, group: np.ndarray, side: float) -> np.ndarray:
    """Square blocks of side ``side`` (um) within each group (section): ``[n]`` int labels. A group that would
    fall in one block gets one block per row (a left-out block must leave rows to fix the group's offset)."""
    xy = np.asarray(xy, np.float64)
    group = np.asarray(group, np.int64)
    labels = np.arange(len(xy), dtype=np.int64)
    if side <= 0 or not len(xy):
        return labels
    cell = np.floor(xy / side).astype(np.int64)
    _, blocks = np.unique(np.c_[group, cell], axis=0, return_inverse=True)
    blocks = blocks.ravel()
    for g in np.unique(group):
        m = group == g
        if len(np.unique(blocks[m])) < 2:
            blocks[m] = blocks.max() + 1 + np.arange(int(m.sum()))
    return blocks


def ridge_block_error(
    Z: np.ndarray, W: np.ndarray, group: np.ndarray, n_groups: int, alphas, blocks: np.ndarray
) -> np.ndarray:
    """Leave-block-out squared error of :func:`fit_ridge` for each of ``alphas`` (numbers, or ``[F]`` penalties
    per feature): ``[len(alphas)]``.

    Rows that share a label of ``blocks`` ``[n]`` are left out together (spatial blocks: a spot's neighbours,
    whose features overlap its own, leave with it, so the error measures what the image predicts at a place
    the fit has not seen). Closed form (no refits): with the hat matrix ``H = A M^-1 A^T`` (``A = [Z, G]``,
    ``M = A^T A + diag(alpha, 0)``) and in-sample residuals ``e``, block B's left-out residuals are
    ``(I - H_BB)^-1 e_B``. One row per block (``blocks = arange(n)``) is leave-one-out: ``e_i / (1 - h_i)``.
    """
    Z = np.asarray(Z, np.float64)
    W = np.asarray(W, np.float64)
    blocks = np.asarray(blocks)
    if Z.ndim != 2 or W.ndim != 2 or len(W) != len(Z) or blocks.shape != (len(Z),):
        raise ValueError(f"Z [n, F], W [n, R] and blocks [n] must share n; got {Z.shape}, {W.shape}, {blocks.shape}")
    A, _, present = _ridge_design(Z, group, n_groups, 1.0)
    AtA, AtW = A.T @ A, A.T @ W
    order = np.argsort(blocks, kind="stable")
    b = blocks[order]
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    sizes = np.diff(np.r_[starts, len(b)])
    which = np.repeat(np.arange(len(starts)), sizes)
    pos = np.arange(len(b)) - np.repeat(starts, sizes)
    # blocks padded to the largest with zero rows: their hat rows are 0, so I - H is the identity there
    Ab = np.zeros((len(starts), int(sizes.max()), A.shape[1]))
    Ab[which, pos] = A[order]
    eye = np.eye(Ab.shape[1])
    out = []
    for alpha in alphas:
        pen = _penalty(alpha, Z.shape[1], int(present.sum()))
        Minv = np.linalg.inv(AtA + np.diag(pen) + 1e-9 * np.eye(A.shape[1]))
        e = W - A @ (Minv @ AtW)
        Eb = np.zeros((len(starts), Ab.shape[1], W.shape[1]))
        Eb[which, pos] = e[order]
        Hbb = Ab @ Minv @ Ab.transpose(0, 2, 1)
        out.append(float((np.linalg.solve(eye - Hbb + 1e-9 * eye, Eb) ** 2).sum()))
    return np.asarray(out)


def neighbour_design(
    xy: np.ndarray, W: np.ndarray, group: np.ndarray, n_groups: int, sigmas, prior: float = 0.1, points=None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The neighbour features of spots ``[n, 2]`` (um) with scores ``W [n, R]`` in groups (sections): at the
    spots themselves, each left out of its own, ``[n, R * len(sigmas)]``, and at ``points = (xy [k, 2],
    group [k])`` from all ``n`` spots (None without points); ``base [n_groups, R]``, each group's mean score
    (the mean of all spots for a group without any)."""
    R = W.shape[1]
    overall = W.mean(0) if len(W) else np.zeros(R)
    base = np.array([W[group == g].mean(0) if (group == g).any() else overall for g in range(n_groups)])
    own = np.zeros((len(W), R * len(sigmas)))
    at = np.zeros((0 if points is None else len(points[0]), R * len(sigmas)))
    for g in range(n_groups):
        m = np.flatnonzero(group == g)
        own[m] = neighbour_features(xy[m], xy[m], W[m], base[g], sigmas, prior, exclude=np.arange(len(m)))
        if points is not None:
            p = np.flatnonzero(points[1] == g)
            at[p] = neighbour_features(points[0][p], xy[m], W[m], base[g], sigmas, prior)
    return own, (None if points is None else at), base


def neighbour_ridge_cv(
    Z: np.ndarray,
    W: np.ndarray,
    xy: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    folds: np.ndarray,
    sigmas,
    penalties,
    prior: float = 0.1,
) -> np.ndarray:
    """Cross-validated squared error of the head ``W ~ [Z, N] B + O[group]`` (:func:`fit_ridge`), ``N`` the
    standardised neighbour features (:func:`neighbour_design`), for each of ``penalties`` ``[F + F_nb]``:
    ``[len(penalties)]``.

    Each fold (``folds [n]``, labels) is hidden as the spots a user hides are: the neighbour features of every
    spot are recomputed from the other folds' spots only, so a held-out spot's neighbours say what they would
    say about a spot never measured (the closed form of :func:`ridge_block_error` would keep the held-out spots
    inside their neighbours' features).
    """
    Z, W = np.asarray(Z, np.float64), np.asarray(W, np.float64)
    group = np.asarray(group, np.int64)
    err = np.zeros(len(penalties))
    for k in np.unique(folds):
        held = folds == k
        if held.all() or not held.any():
            continue
        tr = ~held
        own, at, _ = neighbour_design(xy[tr], W[tr], group[tr], n_groups, sigmas, prior, (xy[held], group[held]))
        mu, sd = own.mean(0), own.std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        A_tr, _, present = _ridge_design(np.c_[Z[tr], (own - mu) / sd], group[tr], n_groups, 0.0)
        G = np.zeros((int(held.sum()), n_groups))
        G[np.arange(len(G)), group[held]] = 1.0
        A_ho = np.c_[Z[held], (at - mu) / sd, G[:, present]]
        AtA, AtW = A_tr.T @ A_tr, A_tr.T @ W[tr]
        for j, pen in enumerate(penalties):
            d = _penalty(pen, Z.shape[1] + own.shape[1], int(present.sum()))
            coef = np.linalg.solve(AtA + np.diag(d) + 1e-9 * np.eye(len(d)), AtW)
            err[j] += float(((W[held] - A_ho @ coef) ** 2).sum())
    return err


def residual_loo_error(spots: np.ndarray, residuals: np.ndarray, sigmas, prior: float = 0.1) -> np.ndarray:
    """Leave-one-out squared error of :func:`residual_field` at the spots themselves, each spot predicted from
    the others, for each of ``sigmas``: ``[len(sigmas)]``. ``sigma = 0`` is "no field" (the error of 0).
    Spots are taken in blocks, so memory stays bounded by a block's neighbour pairs."""
    from scipy.spatial import cKDTree

    spots = np.asarray(spots, np.float64)
    residuals = np.asarray(residuals, np.float64)
    tree = cKDTree(spots) if len(spots) else None
    out = []
    for sigma in sigmas:
        if sigma <= 0 or tree is None:
            out.append(float((residuals**2).sum()))
            continue
        err = 0.0
        for a in range(0, len(spots), BLOCK_POINTS):
            b = min(len(spots), a + BLOCK_POINTS)
            pred = _kernel_mean(tree, spots, spots[a:b], residuals, sigma, prior, exclude=np.arange(a, b))
            err += float(((residuals[a:b] - pred) ** 2).sum())
        out.append(err)
    return np.asarray(out)


#: points handled at once by the residual field: bounds its memory by the block's neighbour pairs
BLOCK_POINTS = 16_384


def _kernel_mean(tree, spots, points, residuals, sigma, prior, exclude=None) -> np.ndarray:
    """``sum_s k(p, s) r_s / (sum_s k(p, s) + prior)`` for ``points`` (spots within 4 sigma; ``exclude[i]``: a spot
    left out for point ``i``)."""
    from scipy.sparse import coo_matrix
    from scipy.spatial import cKDTree

    # the pairs within reach come out of the trees as arrays (no Python list per point: at millions of
    # superpixels and hundreds of spots each, building the pairs otherwise costs more than the sums)
    pairs = cKDTree(points).sparse_distance_matrix(tree, 4.0 * sigma, output_type="ndarray")
    out = np.zeros((len(points), residuals.shape[1]))
    if not len(pairs):
        return out
    owner, flat = pairs["i"], pairs["j"]
    k = np.exp(-(pairs["v"] ** 2) / (2.0 * sigma * sigma))
    if exclude is not None:
        k[flat == np.asarray(exclude)[owner]] = 0.0
    # products straight from the pairs (a COO product needs no sorted rows)
    K = coo_matrix((k, (owner, flat)), shape=(len(points), len(spots)))
    den = np.bincount(owner, weights=k, minlength=len(points)) + prior
    return (K @ residuals) / den[:, None]


def residual_field(
    points: np.ndarray, spots: np.ndarray, residuals: np.ndarray, sigma: float, prior: float = 0.1
) -> np.ndarray:
    """Gaussian-kernel spread of spot residuals: ``[n, 2]`` points, ``[m, 2]`` spots, ``[m, R]`` residuals ->
    ``[n, R]``.

    ``f(p) = sum_s k(p, s) r_s / (sum_s k(p, s) + prior)``, ``k = exp(-|p - s|^2 / (2 sigma^2))``: the kernel-
    weighted mean of the nearby residuals, fading to 0 (the image alone) where no spot is within a few sigma.
    Spots beyond 4 sigma are ignored; points are taken in blocks of ``BLOCK_POINTS``.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float64).reshape(-1, 2)
    residuals = np.asarray(residuals, np.float64)
    out = np.zeros((len(points), residuals.shape[1]))
    if not len(spots) or not len(points):
        return out
    spots = np.asarray(spots, np.float64)
    tree = cKDTree(spots)
    for a in range(0, len(points), BLOCK_POINTS):
        b = min(len(points), a + BLOCK_POINTS)
        out[a:b] = _kernel_mean(tree, spots, points[a:b], residuals, sigma, prior)
    return out


def neighbour_features(
    points: np.ndarray,
    spots: np.ndarray,
    scores: np.ndarray,
    base: np.ndarray,
    sigmas,
    prior: float = 0.1,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """The spots' scores smoothed around each point, one block per width: ``[n, 2]`` points (um), ``[m, 2]``
    spots, ``[m, R]`` scores, ``[R]`` base -> ``[n, R * len(sigmas)]`` (width-major).

    ``n_sigma(p) = base + sum_s k(p, s) (w_s - base) / (sum_s k(p, s) + prior)``, ``k`` a Gaussian of width
    ``sigma`` (um): the kernel-weighted mean of the nearby spots' scores, falling back to ``base`` (the section's
    mean) where no spot is within a few sigma. ``exclude [n]``: the spot left out for each point (-1: none), so
    that a fitted spot is not its own neighbour when the head learns how far to trust its neighbours.
    """
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64)
    base = np.asarray(base, np.float64)
    out = np.tile(base, (len(points), len(sigmas)))
    if not len(spots) or not len(points):
        return out
    spots = np.asarray(spots, np.float64)
    tree = cKDTree(spots)
    R = scores.shape[1]
    for j, sigma in enumerate(sigmas):
        for a in range(0, len(points), BLOCK_POINTS):
            b = min(len(points), a + BLOCK_POINTS)
            ex = None if exclude is None else np.asarray(exclude)[a:b]
            out[a:b, j * R : (j + 1) * R] += _kernel_mean(tree, spots, points[a:b], scores - base, sigma, prior, ex)
    return out


#: lattice nodes per Gaussian width at which :func:`smooth_at_grid` evaluates the neighbour features and the residual
#: field of the maps
LATTICE_PER_SIGMA = 4.0


def on_lattice(rc: np.ndarray, step: float, fn) -> np.ndarray:
    """A smooth field at grid positions, through a coarse lattice: ``[n, 2]`` positions -> ``[n, C]``.

    Convention: ``rc`` are grid coordinates (col, row) in superpixels (a superpixel's centre at ``i + 0.5``), the
    lattice's nodes at ``(step * i, step * j)`` for integer ``i, j`` and ``fn: [k, 2] -> [k, C]`` the field at
    grid positions. Each position gets the bilinear interpolation of the four nodes around it::

        f(p) = sum_{a, b in {0, 1}} (1 - |q_x - i_a|)(1 - |q_y - j_b|) fn(step * (i_a, j_b)),  q = p / step

    The nodes depend only on ``p`` and ``step``, never on which positions are asked together, so a map computed
    tile by tile equals the one computed at once. ``fn`` is called once, on the distinct nodes needed.
    """
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    q = rc / float(step)
    base = np.floor(q).astype(np.int64)
    frac = q - base
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.int64)
    if not len(rc):
        return np.asarray(fn(np.zeros((0, 2))), np.float64)
    # the nodes needed, marked on their bounding rectangle of the lattice (with steps of a superpixel or more, as
    # smooth_at_grid uses it, at most one node per superpixel of the positions' bounding box), so finding the
    # distinct ones costs no sort
    lo = base.min(0)
    extent = base.max(0) - lo + 2
    local = (base - lo)[:, None, :] + corners[None]  # [n, 4, 2]
    key = local[..., 1] * extent[0] + local[..., 0]
    needed = np.zeros(int(extent[0] * extent[1]), bool)
    needed[key.ravel()] = True
    flat = np.flatnonzero(needed)
    index = np.zeros(len(needed), np.int64)
    index[flat] = np.arange(len(flat))
    nodes = np.stack([flat % extent[0], flat // extent[0]], 1) + lo
    values = np.asarray(fn(nodes * float(step)), np.float64)
    where = index[key]
    wx = np.where(corners[None, :, 0] == 1, frac[:, None, 0], 1.0 - frac[:, None, 0])
    wy = np.where(corners[None, :, 1] == 1, frac[:, None, 1], 1.0 - frac[:, None, 1])
    return np.einsum("nk,nkc->nc", wx * wy, values[where])


def to_um(rc: np.ndarray, grid_to_um: np.ndarray) -> np.ndarray:
    """Grid coordinates ``[n, 2]`` (col, row) -> the section's um ``[n, 2]`` (x, y) through the 3x3 ``grid_to_um``."""
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    return (np.c_[rc, np.ones(len(rc))] @ np.asarray(grid_to_um, np.float64).T)[:, :2]


def neighbour_field(
    rc: np.ndarray,
    grid_to_um: np.ndarray,
    superpixel_um: float | None,
    spots: np.ndarray,
    scores: np.ndarray,
    base: np.ndarray,
    sigmas,
    prior: float = 0.1,
) -> np.ndarray:
    """:func:`neighbour_features` at grid positions ``rc [n, 2]`` (col, row), each width through its own lattice:
    -> ``[n, R * len(sigmas)]``.

    A width ``sigma`` smooths over many superpixels, so it is evaluated at nodes ``sigma / LATTICE_PER_SIGMA``
    apart (:func:`on_lattice`) and interpolated between (bilinear error <= ~0.2% of a step edge's height for a
    Gaussian mean of width sigma); a width whose step would be under one superpixel (or every width, with
    ``superpixel_um`` None) is evaluated at every position. The cost per width is then the same whatever its
    width, not growing with sigma^2.
    """
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    R = len(base)
    out = np.empty((len(rc), R * len(sigmas)))
    for j, sigma in enumerate(sigmas):

        def at(points_um, sigma=sigma):
            return neighbour_features(points_um, spots, scores, base, [sigma], prior)

        out[:, j * R : (j + 1) * R] = smooth_at_grid(rc, grid_to_um, superpixel_um, sigma, at)
    return out


def smooth_at_grid(rc: np.ndarray, grid_to_um: np.ndarray, superpixel_um: float | None, sigma: float, fn) -> np.ndarray:
    """A field smooth at the scale ``sigma`` (um) at grid positions ``rc [n, 2]`` (col, row): ``fn: [k, 2] um ->
    [k, C]`` evaluated at lattice nodes ``sigma / LATTICE_PER_SIGMA`` apart and interpolated (:func:`on_lattice`),
    or at every position where that step would be under one superpixel (always with ``superpixel_um`` None)
    -> ``[n, C]``."""
    step = 0.0 if superpixel_um is None else float(sigma) / (LATTICE_PER_SIGMA * float(superpixel_um))
    if step > 1.0:
        return on_lattice(rc, step, lambda nodes: fn(to_um(nodes, grid_to_um)))
    return fn(to_um(rc, grid_to_um))


def spatial_field(
    rc: np.ndarray,
    R: int,
    *,
    grid_to_um: np.ndarray,
    spots_um: np.ndarray,
    residuals: np.ndarray,
    sigma_um: float,
    prior: float,
    neighbours: dict | None = None,
    superpixel_um: float | None = None,
) -> np.ndarray:
    """The spatial part of the head at grid positions ``rc [n, 2]`` (col, row): ``[n, R]``::

        f_p = ((n_p - nb.mean) / nb.scale) nb.coef + residual_field(p)

    ``n_p`` the fitted spots' scores smoothed around ``p`` (:func:`neighbour_field` with ``neighbours``'
    ``spots_um, scores, base, sigmas_um, prior``; no term when ``neighbours`` is None), the residual field of
    ``residuals [m, R]`` at ``spots_um [m, 2]`` with width ``sigma_um`` (no term without spots). With
    ``superpixel_um`` both are interpolated from their lattices (:func:`smooth_at_grid`); without, they are exact.
    The tiles (:func:`embedding_block`) and the spots' footprint means both take it from here.
    """
    rc = np.asarray(rc, np.float64).reshape(-1, 2)
    out = np.zeros((len(rc), R))
    if neighbours:
        nb = neighbours
        feats = neighbour_field(
            rc, grid_to_um, superpixel_um, nb["spots_um"], nb["scores"], nb["base"], nb["sigmas_um"], nb["prior"]
        )
        out += ((feats - nb["mean"]) / nb["scale"]) @ nb["coef"]
    if len(spots_um):

        def field(points_um):
            return residual_field(points_um, spots_um, residuals, sigma_um, prior)

        out += smooth_at_grid(rc, grid_to_um, superpixel_um, sigma_um, field)
    return out


def footprint_mask(centres_sp: np.ndarray, radius_sp: float, h: int, w: int, origin=(0, 0)) -> np.ndarray:
    """Which spot's footprint each superpixel of an ``h x w`` block lies in: ``[h, w]`` int64, -1 for none.

    Footprints as in :func:`footprint_means` (centres ``(col, row)`` in superpixels, the block's first
    superpixel at grid position ``origin``); where footprints overlap, the later spot wins.
    """
    out = np.full((h, w), -1, np.int64)
    rows, cols, inside = footprints(centres_sp, radius_sp, h, w, origin)
    spot = np.broadcast_to(np.arange(len(rows))[:, None], cols.shape)
    out[rows[inside], cols[inside]] = spot[inside]
    return out


def project_to_spots(pred: np.ndarray, owner: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Shift the cells of each spot so that their mean equals the spot's measurement.

    Convention: ``pred [n, G]`` the cells' predicted expression, ``owner [n]`` the spot holding each cell
    (-1: none), ``measured [m, G]`` the spots' measurements. Returns ``[n, G]``::

        out_c = pred_c + measured_s - mean_{c' : owner(c') = s} pred_c'     for owner(c) = s >= 0
        out_c = pred_c                                                        for owner(c) = -1

    so ``mean_{c : owner(c) = s} out_c = measured_s`` for every spot that holds a cell, and the detail among
    a spot's cells (``pred_c - pred_c'``) is the prediction's.
    """
    pred = np.asarray(pred, np.float64)
    owner = np.asarray(owner, np.int64)
    measured = np.asarray(measured, np.float64)
    if pred.ndim != 2 or owner.shape != (len(pred),):
        raise ValueError(f"pred must be [n, G] and owner [n]; got {pred.shape} and {owner.shape}")
    if measured.ndim != 2 or measured.shape[1] != pred.shape[1] or (owner >= len(measured)).any():
        raise ValueError(f"measured must be [m, {pred.shape[1]}] with m > max(owner); got {measured.shape}")
    held = owner >= 0
    out = pred.copy()
    if not held.any():
        return out
    m = len(measured)
    count = np.bincount(owner[held], minlength=m).astype(np.float64)
    total = np.zeros((m, pred.shape[1]))
    np.add.at(total, owner[held], pred[held])
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = measured - total / count[:, None]
    out[held] += shift[owner[held]]
    return out


def embedding_block(
    block: np.ndarray,
    origin: tuple[int, int],
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    coef: np.ndarray,
    offset: np.ndarray,
    grid_to_um: np.ndarray,
    spots_um: np.ndarray,
    residuals: np.ndarray,
    sigma_um: float,
    prior: float,
    centres_sp: np.ndarray | None = None,
    radius_sp: float = 0.0,
    shift: np.ndarray | None = None,
    neighbours: dict | None = None,
    superpixel_um: float | None = None,
) -> np.ndarray:
    """Metagene scores of a block of context features: ``[F, h, w]`` -> ``[R, h, w]`` (float32).

    ``s_p = ((z_p - mean) / scale) coef + offset + f_p``, ``f_p`` the spatial part of the head
    (:func:`spatial_field` with ``grid_to_um, spots_um, residuals, sigma_um, prior, neighbours, superpixel_um``);
    with ``centres_sp`` / ``shift`` ``[m, R]``, every superpixel in spot ``i``'s footprint is moved by ``shift[i]``
    (the projection that makes each measured spot's footprint mean equal its scores).
    """
    F, h, w = block.shape
    z = (np.asarray(block, np.float64).reshape(F, -1).T - mean) / scale
    s = z @ coef + offset
    if neighbours or len(spots_um):
        rr, cc = np.mgrid[origin[0] : origin[0] + h, origin[1] : origin[1] + w]
        rc = np.stack([cc.ravel() + 0.5, rr.ravel() + 0.5], 1)
        s += spatial_field(
            rc,
            s.shape[1],
            grid_to_um=grid_to_um,
            spots_um=spots_um,
            residuals=residuals,
            sigma_um=sigma_um,
            prior=prior,
            neighbours=neighbours,
            superpixel_um=superpixel_um,
        )
    if centres_sp is not None and shift is not None and len(centres_sp):
        owner = footprint_mask(centres_sp, radius_sp, h, w, origin).ravel()
        hit = owner >= 0
        s[hit] += shift[owner[hit]]
    return s.T.reshape(-1, h, w).astype(np.float32)


def gene_block(
    block: np.ndarray,
    origin: tuple[int, int] = (0, 0),
    *,
    loadings: np.ndarray,
    centres_sp: np.ndarray | None = None,
    radius_sp: float = 0.0,
    shift: np.ndarray | None = None,
    channels: tuple[int, int] | None = None,
) -> np.ndarray:
    """Gene maps from metagene scores: ``[R, h, w]``, loadings ``[R, G]`` -> ``[G, h, w]`` = ``sum_r s_r H_rg``;
    with ``centres_sp`` / ``shift`` ``[m, G]``, spot ``i``'s footprint is moved by ``shift[i]`` (the gene-space
    residual ``x_i - W_i H`` of a fitted spot: its footprint mean then equals its measurement). ``channels``
    ``(g0, g1)``: only genes ``g0:g1`` -> ``[g1 - g0, h, w]``."""
    R, h, w = block.shape
    if channels is not None:
        loadings = np.asarray(loadings)[:, channels[0] : channels[1]]
        shift = None if shift is None else np.asarray(shift)[:, channels[0] : channels[1]]
    out = np.asarray(loadings, np.float64).T @ np.asarray(block, np.float64).reshape(R, -1)
    if centres_sp is not None and shift is not None and len(centres_sp):
        owner = footprint_mask(centres_sp, radius_sp, h, w, origin).ravel()
        hit = owner >= 0
        out[:, hit] += np.asarray(shift, np.float64)[owner[hit]].T
    return out.reshape(-1, h, w).astype(np.float32)

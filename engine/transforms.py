"""Re-apply an atlas's registration to new points (another modality of the same sections), both ways.

The transforms live in the store as arrays: ``/deformation`` (affine + displacement grids, when the
``refine`` stage ran) or ``/transforms/affine``. Only the one section's grid is read.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, MissingInputError
from .kernels.geometry import apply_affine
from .kernels.warp import sample_grid, warp_points
from .store.atlas import Atlas

#: ``stage=`` of :func:`to_atlas` / :func:`to_section` -> the group holding that stage's transforms
STAGES = {"refined": "deformation", "affine": "transforms"}


def transform_group(atlas: Atlas, stage: str = "auto"):
    """The group of registration results ``stage`` names: ``refined`` (``/deformation``: affine + displacement),
    ``affine`` (``/transforms``: the register stage's affine alone, as ``align(fine=False)`` gives) or ``auto``
    (refined when the refine stage has run, else affine)."""
    if stage not in ("auto", *STAGES):
        raise InputError(f"stage={stage!r}: choose auto, refined or affine")
    order = ["refined", "affine"] if stage == "auto" else [stage]
    for name in order:
        if atlas.group_is_complete(STAGES[name]):
            return atlas.root[STAGES[name]]
    if stage == "refined" and atlas.group_is_complete("transforms"):
        raise MissingInputError(
            f"{atlas.path} has only the affine registration (the refine stage has not run); pass stage='affine' "
            f"or run lamina.align(atlas) with fine=True"
        )
    raise MissingInputError(f"{atlas.path} has no registration yet; run lamina.align() (or register) first")


def apply_by_section(src, sections: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Raw points ``[n, 2]`` um of the sections ``sections [n]`` (positions in ``/sections``) -> atlas um by
    each section's transform in ``src``; one vectorised call per section present (a cell chunk spans few)."""
    affine = np.asarray(src["affine"][...])
    out = np.empty((len(xy), 2), np.float64)
    for s in np.unique(sections):
        m = sections == s
        out[m] = apply_stored(src, int(s), xy[m], affine[s])
    return out


def _source(atlas: Atlas, section, stage: str = "auto") -> tuple:
    k = atlas.section_index(section)  # an unknown section is named before a missing registration
    return transform_group(atlas, stage), k


def _points(xy) -> np.ndarray:
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(f"points must be an [n, 2] array of (x, y) in um, got shape {xy.shape}")
    if not np.all(np.isfinite(xy)):
        raise InputError(f"points contain NaN or inf at rows {np.flatnonzero(~np.isfinite(xy).all(1))[:5].tolist()}")
    return xy


def apply_stored(src, k: int, xy: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """Section ``k``'s transform from group ``src`` (``/deformation`` or ``/transforms``) applied to raw points
    ``[n, 2]`` um. ``affine`` may pass ``src["affine"][k]`` when the caller already holds it."""
    field = np.asarray(src["displacement"][k]) if "displacement" in src else None
    A = np.asarray(src["affine"][k]) if affine is None else affine
    return warp_points(xy, A, field, src.attrs.get("origin", (0.0, 0.0)), src.attrs.get("spacing", 1.0))


def to_atlas(atlas: Atlas, section, xy, stage: str = "auto") -> np.ndarray:
    """Raw (x, y) um of ``section`` (index or id) -> atlas (x, y) um: ``a = A p``, then ``a + u(a)``.

    ``stage``: ``auto`` (the refined transform when refine ran, else the affine), ``refined`` or ``affine``
    (only the register stage's affine, without the displacement; see :func:`transform_group`).
    """
    src, k = _source(atlas, section, stage)
    return apply_stored(src, k, _points(xy))


def to_section(atlas: Atlas, section, xy, stage: str = "auto") -> np.ndarray:
    """Atlas (x, y) um -> raw (x, y) um of ``section``: ``a = x + g(x)`` (the stored inverse grid), ``A^-1 a``."""
    src, k = _source(atlas, section, stage)
    return invert_stored(src, k, _points(xy))


def invert_stored(src, k: int, xy: np.ndarray) -> np.ndarray:
    """Atlas points ``[n, 2]`` um -> section ``k``'s raw um by its transform in group ``src`` (the inverse of
    :func:`apply_stored`)."""
    x = np.asarray(xy, np.float64)
    if "inverse" in src:
        x = x + sample_grid(np.asarray(src["inverse"][k], np.float64), x, src.attrs["origin"], src.attrs["spacing"])
    return apply_affine(np.linalg.inv(np.asarray(src["affine"][k])), x)

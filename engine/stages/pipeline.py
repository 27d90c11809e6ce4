"""The stage sequences as single calls: ``align`` (ingested -> aligned cells) and ``reconstruct`` (aligned
cells -> isotropic expression volume)."""
from __future__ import annotations

import time

from ..store.atlas import Atlas
from .flow import train_flow
from .interpolate import interpolate as _interpolate
from .pca import pca
from .qc import section_stats
from .rasterize import channel_kind, rasterize
from .refine import refine
from .registration import register
from .volume import invert, voxelize
from .warp import warp


def align(atlas: Atlas, client=None, pixel_um: float | None = None, reflect: bool = False, fine: bool = True,
          refine_options: dict | None = None, reference: str | None = None, channels: str = "auto",
          n_pcs: int | None = None, register_options: dict | None = None) -> dict[str, float]:
    """``section_stats -> rasterize -> register -> refine -> warp``; returns wall seconds per stage (near 0 when
    a stage was already complete with the same inputs and is skipped). ``fine=False`` stops at the pairwise
    affine stage (no ``refine``). ``reference``: a section id that stays as it is while every other section
    is aligned onto it (default: no section is privileged; the frame is the middle section's).
    ``channels``: what the rasters show (``rasterize.channel_kind``); when that includes principal components
    (by default: an atlas with genes and no cell types), ``pca`` runs first, with ``n_pcs`` as
    ``reconstruct`` takes it, so that reconstruct finds it done. ``register_options`` / ``refine_options``:
    further options of those stages (e.g. ``{"matcher": "loftr", "matcher_weights": path}``)."""
    steps = [("section_stats", lambda: section_stats(atlas, client=client))]
    if "pcs" in channel_kind(atlas, channels):
        steps.append(("pca", lambda: pca(atlas, n_pcs=n_pcs, client=client)))
    steps += [("rasterize", lambda: rasterize(atlas, pixel_um=pixel_um, channels=channels, client=client)),
              ("register", lambda: register(atlas, client=client, reflect=reflect, reference=reference,
                                            **(register_options or {})))]
    if fine:
        steps.append(("refine", lambda: refine(atlas, client=client, **(refine_options or {}))))
    steps.append(("warp", lambda: warp(atlas, client=client, refined=fine)))
    return _timed(steps)


def reconstruct(atlas: Atlas, client=None, n_pcs: int | None = None, dz_um: float = 10.0, voxel_um: float | None = None,
                flow_options: dict | None = None, interpolate: bool = True) -> dict[str, float]:
    """``pca -> train_flow -> interpolate -> voxelize -> invert``; returns wall seconds per stage.

    ``dz_um`` is the flow's step and layer spacing, ``voxel_um`` the grid's edge (default ``dz_um``);
    ``interpolate=False`` voxelizes the observed sections only (no flow is trained).
    """
    steps = [("pca", lambda: pca(atlas, n_pcs=n_pcs, client=client))]
    if interpolate:
        steps += [("train_flow", lambda: train_flow(atlas, client=client, **{"dz_um": dz_um, **(flow_options or {})})),
                  ("interpolate", lambda: _interpolate(atlas, client=client))]
    steps += [("voxelize", lambda: voxelize(atlas, voxel_um=voxel_um or dz_um, client=client)),
              ("invert", lambda: invert(atlas, client=client))]
    return _timed(steps)


def _timed(steps: list) -> dict[str, float]:
    """Run ``(name, callable)`` steps in order; wall seconds per step."""
    seconds = {}
    for name, run in steps:
        t = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - t
    return seconds

"""The stage sequence that takes an ingested atlas to aligned cells, as one call."""
from __future__ import annotations

import time

from ..store.atlas import Atlas
from .qc import section_stats
from .rasterize import rasterize
from .refine import refine
from .registration import register
from .warp import warp


def align(atlas: Atlas, client=None, pixel_um: float | None = None, reflect: bool = False, fine: bool = True,
          refine_options: dict | None = None) -> dict[str, float]:
    """``section_stats -> rasterize -> register -> refine -> warp``; returns wall seconds per stage (near 0 when
    a stage was already complete with the same inputs and is skipped). ``fine=False`` stops at the pairwise
    affine stage (no ``refine``)."""
    seconds = {}
    steps = [("section_stats", lambda: section_stats(atlas, client=client)),
             ("rasterize", lambda: rasterize(atlas, pixel_um=pixel_um, client=client)),
             ("register", lambda: register(atlas, client=client, reflect=reflect))]
    if fine:
        steps.append(("refine", lambda: refine(atlas, client=client, **(refine_options or {}))))
    steps.append(("warp", lambda: warp(atlas, client=client, refined=fine)))
    for name, run in steps:
        t = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - t
    return seconds

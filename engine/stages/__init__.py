"""Stages: functions ``stage(atlas, ..., client=None)`` that build a lazy Dask graph over the store,
compute it once, and commit one output group atomically (see :mod:`lamina.stages.runner`)."""
from .runner import StageResult, run_stage
from .pipeline import align
from .qc import section_stats
from .rasterize import rasterize
from .refine import refine
from .registration import register
from .warp import warp

__all__ = ["StageResult", "run_stage", "align", "section_stats", "rasterize", "register", "refine", "warp"]

"""Stages: functions ``stage(atlas, ..., client=None)`` that build a lazy Dask graph over the store,
compute it once, and commit one output group atomically (see :mod:`lamina.stages.runner`)."""
from .runner import StageResult, run_stage
from .flow import train_flow
from .interpolate import interpolate
from .pca import pca
from .pipeline import align, reconstruct
from .qc import section_stats
from .rasterize import rasterize
from .refine import refine
from .registration import register
from .volume import export_expression_parquet, invert, voxelize
from .warp import warp

__all__ = ["StageResult", "run_stage", "align", "reconstruct", "section_stats", "rasterize", "register", "refine", "warp",
           "pca", "train_flow", "interpolate", "voxelize", "invert", "export_expression_parquet"]

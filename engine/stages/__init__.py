"""Stages: functions ``stage(atlas, client=None, force=False, **options)`` that build a Dask graph over the
store, compute it, and commit one output group atomically. Each is declared once as a
:class:`~lamina.stages.contract.Stage` (see :mod:`lamina.stages.contract` and :mod:`lamina.stages.registry`)."""

from ..export import export_expression_parquet
from .contract import PlanContext, Stage, StageContext
from .encoder import encoder
from .enhancement import enhance
from .flow import train_flow
from .histology import histology
from .interpolate import interpolate
from .invert import invert
from .niche import niche
from .options import Options, option
from .pca import pca
from .pipeline import align, embed, plan, reconstruct, run_plan
from .qc import section_stats
from .rasterize import rasterize
from .refine import refine
from .registration import register
from .registry import add_stage, all_stages, get_stage, pipelines
from .runner import StageResult, run
from .voxelize import voxelize
from .warp import warp

__all__ = [
    "Stage",
    "StageContext",
    "PlanContext",
    "Options",
    "option",
    "StageResult",
    "run",
    "plan",
    "run_plan",
    "add_stage",
    "all_stages",
    "get_stage",
    "pipelines",
    "align",
    "reconstruct",
    "section_stats",
    "rasterize",
    "register",
    "refine",
    "warp",
    "pca",
    "train_flow",
    "interpolate",
    "voxelize",
    "invert",
    "embed",
    "niche",
    "encoder",
    "enhance",
    "histology",
    "export_expression_parquet",
]

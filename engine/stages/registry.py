"""The stage registry: every stage lamina knows, in the order a build runs them.

Built-in stages are the ``STAGE`` of each module in :data:`BUILTIN`, imported on first use (a stage module
imports its heavy libraries, torch among them, only inside the functions that use them, so listing the
stages stays cheap). Other packages add stages through the entry point group ``lamina.stages`` (each entry
point names a :class:`~lamina.stages.contract.Stage`), as xarray finds its backends; :func:`add_stage`
adds one at run time (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
from functools import lru_cache
from importlib.metadata import entry_points

from ..errors import ConfigError, InternalError
from .contract import Stage

log = logging.getLogger("lamina")

#: one entry per built-in stage: its module in lamina.stages, in pipeline order
BUILTIN = (
    "qc",
    "rasterize",
    "registration",
    "refine",
    "warp",
    "pca",
    "flow",
    "interpolate",
    "voxelize",
    "invert",
    "niche",
    "encoder",
    "histology",
    "enhancement",
)
#: the stage that creates a store; every other stage reads it (it is run by ``lamina.ingest``, not the registry)
ROOT = "ingest"
_added: dict[str, Stage] = {}


@lru_cache(maxsize=1)
def _builtin_and_plugins() -> tuple[Stage, ...]:
    found = [importlib.import_module(f"{__package__}.{m}").STAGE for m in BUILTIN]
    for ep in entry_points(group="lamina.stages"):
        try:
            stage = ep.load()
        except Exception as exc:  # a broken plugin must not break lamina: name it and go on
            log.warning("lamina: the stage plugin %s (%s) does not load: %s", ep.name, ep.value, exc)
            continue
        if not isinstance(stage, Stage):
            log.warning("lamina: the stage plugin %s (%s) is not a lamina Stage; ignored", ep.name, ep.value)
            continue
        found.append(stage)
    return tuple(found)


def all_stages() -> dict[str, Stage]:
    """Name -> stage, in the order a plan runs them when nothing else decides."""
    out: dict[str, Stage] = {}
    for stage in (*_builtin_and_plugins(), *_added.values()):
        if stage.name in out or stage.name == ROOT:
            raise InternalError(f"two stages are named {stage.name!r}")
        out[stage.name] = stage
    return out


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        close = difflib.get_close_matches(name, list(stages), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"no stage named {name!r}{hint}; stages: {', '.join(stages)}")
    return stages[name]


def pipelines() -> dict[str, tuple[str, ...]]:
    """Pipeline name (``align``, ``reconstruct``, ...) -> its stages, from each stage's ``pipeline``."""
    out: dict[str, list[str]] = {}
    for name, stage in all_stages().items():
        if stage.pipeline:
            out.setdefault(stage.pipeline, []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def add_stage(stage: Stage) -> None:
    """Make ``stage`` known to config validation, plans, ``lamina build`` and ``lamina info``."""
    if stage.name in all_stages() or stage.name == ROOT:
        raise ConfigError(f"a stage named {stage.name!r} exists already")
    _added[stage.name] = stage


def remove_stage(name: str) -> None:
    _added.pop(name, None)


@contextlib.contextmanager
def added(stage: Stage):
    """``with added(stage):`` the stage is registered inside the block only."""
    add_stage(stage)
    try:
        yield stage
    finally:
        remove_stage(stage.name)

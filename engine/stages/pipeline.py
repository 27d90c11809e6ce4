"""Plans: which stages a call runs, in which order, with which options; all derived from the registry.

``plan(atlas, targets, options)`` expands pipeline names (``align``, ``reconstruct``: each stage declares
its pipeline) into stages, drops those switched off, pulls in any input that is neither planned nor already
complete (rasterize with PC channels pulls ``pca``), orders them so that every stage follows its inputs,
and checks every stage's preconditions before the first one runs: a build that would fail at its fifth
stage for lack of ``/X`` fails at once. ``lamina.align`` / ``lamina.reconstruct`` / ``lamina build`` all
go through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ConfigError, UnknownOptionError
from ..store.atlas import Atlas
from .contract import PlanContext, Stage
from .registry import ROOT, all_stages, get_stage, pipelines
from .runner import missing_inputs, run


@dataclass
class Step:
    stage: Stage
    options: object  # the stage's parsed (and resolved) options
    inputs: tuple[str, ...] = ()


def with_inputs(names) -> list[str]:
    """``names`` and every registered stage they may read, directly or not (a plan may pull those in)."""
    stages = all_stages()
    out = list(names)
    for name in out:  # grows while it is walked
        for i in stages[name].inputs:
            if i in stages and i not in out:
                out.append(i)
    return out


def route(names, flat: dict, per_stage: dict | None = None, where: str = "") -> dict[str, dict]:
    """Options per stage: ``per_stage`` (stage -> options) plus each flat option given to every stage of
    ``names`` that declares it (``batch=`` reaches register and refine). A flat option no stage declares is
    an :class:`UnknownOptionError` naming the options the stages have."""
    stages = all_stages()
    for name in per_stage or {}:
        get_stage(name)
    out = {n: dict((per_stage or {}).get(n, {})) for n in {*names, *(per_stage or {})}}
    for key, value in flat.items():
        takers = [n for n in names if key in {f.name for f in stages[n].options.fields()}]
        if not takers:
            known = sorted({f.name for n in names for f in stages[n].options.fields()})
            raise UnknownOptionError(
                f"{where}: unknown option {key!r}; the stages {', '.join(names)} take {', '.join(known)}"
            )
        for n in takers:
            out[n].setdefault(key, value)
    return out


def expand(targets) -> list[str]:
    """Pipeline and stage names -> stage names, in registry order, each once."""
    known = pipelines()
    names: list[str] = []
    for t in targets:
        for n in known.get(t, (t,)):
            get_stage(n)
            if n not in names:
                names.append(n)
    return names


def plan(atlas: Atlas, targets, options: dict[str, dict] | None = None, disabled=(), where: str = "") -> list[Step]:
    """The steps that run ``targets`` (pipeline or stage names) with ``options`` (stage -> options)."""
    options = options or {}
    disabled = frozenset(disabled)
    for name in list(options) + list(disabled):
        get_stage(name)
    order = list(all_stages())

    def parse(name: str):
        return get_stage(name).options.parse(
            options.get(name), where=where or "lamina plan", prefix=f"stages.{name}." if where else ""
        )

    steps = {n: Step(get_stage(n), None) for n in expand(targets) if n not in disabled}
    changed = True
    while changed:  # resolve each stage (it may look at what runs before it), then pull in missing inputs
        changed = False
        for name in sorted(steps, key=order.index):
            step = steps[name]
            opts = parse(name)
            if step.stage.resolve:
                before = frozenset(n for n in steps if order.index(n) < order.index(name))
                opts = step.stage.resolve(atlas, opts, PlanContext(before, disabled))
            step.options, step.inputs = opts, step.stage.inputs_for(atlas, opts)
            for need in step.inputs:
                if need == ROOT or need in steps or not missing_inputs(atlas, [need]):
                    continue
                if need in disabled:
                    raise ConfigError(
                        f"{where or 'plan'}: stage '{name}' needs '{need}', which is switched off and "
                        f"not in the store yet; enable it or run it first"
                    )
                steps[need] = Step(get_stage(need), None)
                changed = True
    ordered = _topological(steps, order)
    for step in ordered:
        if step.stage.check:
            step.stage.check(atlas, step.options)
    return ordered


def _topological(steps: dict[str, Step], order: list[str]) -> list[Step]:
    """Every stage after the planned stages it reads; ties keep the registry order."""
    out: list[str] = []
    pending = sorted(steps, key=order.index)
    while pending:
        ready = next((n for n in pending if all(i in out for i in steps[n].inputs if i in steps)), None)
        if ready is None:
            raise ConfigError(f"the stages {', '.join(pending)} read each other in a cycle")
        out.append(ready)
        pending.remove(ready)
    return [steps[n] for n in out]


def run_plan(atlas: Atlas, steps: list[Step], client=None, force: bool = False) -> dict[str, float]:
    """Run planned steps in order; wall seconds per stage (near 0 when a stage is skipped as up to date)."""
    from ..store.lock import writer

    seconds = {}
    with writer(atlas.path):  # one lock over the whole plan: no other writer runs between its stages
        for step in steps:
            t = time.perf_counter()
            run(step.stage, atlas, client=client, force=force, parsed=step.options)
            seconds[step.stage.name] = time.perf_counter() - t
    return seconds


def align(atlas: Atlas, client=None, fine: bool = True, stages: dict | None = None, **options) -> dict[str, float]:
    """``section_stats -> rasterize -> register -> refine -> warp`` (``pca`` first when the rasters show
    expression); returns wall seconds per stage (near 0 for a stage already complete with the same inputs).

    ``fine=False`` stops at the pairwise affine stage (no ``refine``; ``warp`` applies the affine). Options
    go to every stage of the pipeline that declares them (``reference=``, ``channels=``, ``batch=``, ...;
    ``lamina stages`` lists them), ``stages={"refine": {...}}`` to one stage only."""
    names = with_inputs(pipelines()["align"])
    disabled = () if fine else ("refine",)
    routed = route(names, options, stages, "lamina.align()")
    return run_plan(atlas, plan(atlas, ["align"], routed, disabled), client)


def reconstruct(
    atlas: Atlas, client=None, interpolate: bool = True, stages: dict | None = None, **options
) -> dict[str, float]:
    """``pca -> train_flow -> interpolate -> voxelize -> invert``; returns wall seconds per stage.

    ``dz_um`` is the flow's step and layer spacing, ``voxel_um`` the grid's edge (default: the
    interpolation's ``dz_um``); ``interpolate=False`` voxelizes the observed sections only (no flow is
    trained). Options are routed as in :func:`align` (``n_pcs=``, ``steps=``, ``seed=`` ...)."""
    names = with_inputs(pipelines()["reconstruct"])
    disabled = () if interpolate else ("train_flow", "interpolate")
    routed = route(names, options, stages, "lamina.reconstruct()")
    return run_plan(atlas, plan(atlas, ["reconstruct"], routed, disabled), client)


def embed(atlas: Atlas, client=None, learned: bool = True, stages: dict | None = None, **options) -> dict[str, float]:
    """``niche -> encoder`` (``pca`` first, and the alignment when the niche spans adjacent sections); returns
    wall seconds per stage. ``learned=False`` stops at the niche embedding (no encoder is trained). Options
    are routed as in :func:`align` (``radii_um=``, ``types=``, ``steps=`` ...)."""
    names = with_inputs(pipelines()["embed"])
    disabled = () if learned else ("encoder",)
    routed = route(names, options, stages, "lamina.embed()")
    return run_plan(atlas, plan(atlas, ["embed"], routed, disabled), client)


def enhance(atlas: Atlas, client=None, stages: dict | None = None, force: bool = False, **options) -> dict[str, float]:
    """``histology -> enhance``: image features per superpixel, then the expression model and its maps; returns
    wall seconds per stage. Options go to the stage that declares them (``superpixel_um=`` to histology,
    ``rank=``, ``genes=``, ``fit_column=`` ... to enhance); a refit with other enhance options reuses the features.
    ``force`` re-runs both."""
    names = with_inputs(pipelines()["enhance"])
    routed = route(names, options, stages, "lamina.enhance()")
    return run_plan(atlas, plan(atlas, ["enhance"], routed), client, force=force)

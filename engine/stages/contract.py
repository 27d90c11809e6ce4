"""The stage contract: each stage is declared once, as a :class:`Stage`, and everything else derives from it.

A stage module defines an options dataclass (:mod:`lamina.stages.options`), a ``build(ctx)`` function that
writes the output group, and one ``STAGE = Stage(...)`` naming its output group, the stages it reads, its
algorithm version and the element its output is; :mod:`lamina.stages.registry` lists the module. From that
one declaration come the public function (``lamina.register(atlas, **options)``), the YAML schema of
``stages.<name>`` and its validation, the plans of ``lamina build`` / ``lamina.align`` /
``lamina.reconstruct``, ``lamina info`` / ``lamina stages`` and the README's option tables.

Life of a run (:func:`lamina.stages.runner.run`)::

    options --parse (declared types, bounds)--> opts --resolve (auto options, from the plan)--> opts
        --check (data the stage needs, e.g. /X)--> inputs_for (the stages it reads, complete?)
        --prepare (what else decides the output: canvas size, ...)--> hash(name, version, opts, prepared,
        inputs' hashes) --same as the record?--> skip | build(ctx) into a scratch group --> commit
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import Options, describe

if TYPE_CHECKING:
    from ..store.atlas import Atlas


@dataclass(frozen=True)
class PlanContext:
    """What a stage may know about the run it is part of: the stages planned before it and those switched off."""

    planned: frozenset = frozenset()
    disabled: frozenset = frozenset()


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage, declared once. See the module docstring for the order in which the hooks run.

    ``needs`` and ``prepare`` get options ``resolve`` has resolved (no "auto" left).
    ``element``: what the output group is (``lamina.deformation``): it is stamped with that encoding and validated
    against its format class before it is marked complete. ``inputs``: the stages whose outputs ``build`` reads
    (their hashes enter this stage's hash, so a changed input re-runs it); ``needs(atlas, opts)`` replaces them
    where they depend on the options. ``check`` raises a :class:`lamina.LaminaError` when the atlas lacks data the
    stage needs; it may read only what ingest wrote, so that a plan checks every stage before the first one runs.
    ``version``: bump it whenever the algorithm's output changes; stores computed by an older version re-run the
    stage.
    """

    name: str
    output: str
    inputs: tuple[str, ...]
    options: type[Options]
    version: int
    summary: str
    build: Callable[[StageContext], dict | None]
    element: Any  # an encoding type of lamina.store.elements, or an Element subclass (plugins)
    pipeline: str | None = None
    needs: Callable[[Atlas, Any], tuple[str, ...]] | None = None
    check: Callable[[Atlas, Any], None] | None = None
    resolve: Callable[[Atlas, Any, PlanContext], Any] | None = None
    prepare: Callable[[Atlas, Any], dict] | None = None

    def inputs_for(self, atlas: Atlas, opts) -> tuple[str, ...]:
        return tuple(self.needs(atlas, opts)) if self.needs else self.inputs

    def defaults(self) -> Options:
        return self.options()

    def docstring(self) -> str:
        rows = "\n".join(
            f"    ``{r['name']}`` ({r['type']}, default ``{r['default']!r}``): {r['doc']}"
            for r in describe(self.options)
        )
        return (
            f"{self.summary}\n\nStage ``{self.name}`` -> ``/{self.output}`` (reads: "
            f"{', '.join(self.inputs) or 'nothing'}; algorithm version {self.version}). Returns a "
            f":class:`lamina.stages.StageResult`; skipped when already complete with the same options and "
            f"inputs unless ``force``.\n\nOptions:\n\n{rows}\n"
        )

    @property
    def function(self) -> Callable:
        """The public function ``stage(atlas, client=None, force=False, **options)``."""
        stage = self

        def run(atlas, client=None, force: bool = False, **options):
            from .runner import run as run_stage

            return run_stage(stage, atlas, client=client, force=force, options=options)

        run.__name__ = run.__qualname__ = self.name
        run.__doc__ = self.docstring()
        run.stage = self  # type: ignore[attr-defined]
        return run


@dataclass
class StageContext:
    """What ``build`` gets: the atlas, the parsed options, the scratch group to write, the client, and what
    ``prepare`` returned (``prepared``)."""

    stage: Stage
    atlas: Atlas
    options: Any
    group: Any
    client: Any
    prepared: dict = dataclasses.field(default_factory=dict)
    after_commit: list = dataclasses.field(default_factory=list)

    @property
    def path(self) -> str:
        return self.atlas.path

    def compute(self, *collections):
        """Compute dask collections on the stage's client, with a progress bar named after the stage."""
        from ..cluster import compute

        return compute(*collections, client=self.client, label=self.stage.name)

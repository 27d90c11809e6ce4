"""What each stage of the registry has done to an atlas: the table ``lamina info`` prints."""

from __future__ import annotations

from ..store.atlas import Atlas
from .registry import ROOT, all_stages
from .runner import stage_state


def stage_lines(atlas: Atlas) -> list[str]:
    """One line per stage of the registry (and per record of a stage this lamina does not know): state
    (complete / not run / INCOMPLETE / stale and why), output group, algorithm version, when, seconds."""
    records = atlas.stage_records()
    stages = all_stages()
    ow = max([13, *(len(s.output) for s in stages.values())]) + 1  # the output column fits /embeddings/encoder
    lines = [f"  {'stages:':<19}{'state':<40} {'output':<{ow}} {'version':<8} {'finished':<26}{'seconds':>7}"]

    def row(name: str, state: str, output: str, version, rec: dict) -> str:
        return (
            f"    {name:<16} {state:<40} {'/' + output:<{ow}} {str(version):<8} {rec.get('finished', ''):<26}"
            f"{rec.get('seconds', 0):>7.1f}"
        )

    if ROOT in records:
        rec = records[ROOT]
        lines.append(row(ROOT, "complete" if rec.get("complete") else "INCOMPLETE", "", "", rec))
    for name, stage in stages.items():
        lines.append(row(name, stage_state(atlas, stage), stage.output, stage.version, records.get(name, {})))
    for name in sorted(set(records) - set(stages) - {ROOT}):
        lines.append(
            row(
                name,
                "unknown to this lamina",
                str(records[name].get("group", "?")).lstrip("/"),
                records[name].get("algorithm_version", "?"),
                records[name],
            )
        )
    return lines

"""Between the passes: check the per-unit summaries against each other and lay the sections out along z."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .readers import ReadUnit
from .spec import IngestSpec

MAX_EXTENT_UM = 1e5  # 10 cm: no section is larger; coordinates beyond are in the wrong unit
MIN_EXTENT_UM = 1.0


def resolve_genes(units: list[ReadUnit], spec: IngestSpec) -> tuple[list[str], list[list[str]]]:
    """The atlas' gene list and each unit's own, after applying ``spec.gene_join``."""
    per_unit = [u.genes(spec) for u in units]
    if spec.genes is None:
        return [], per_unit
    if isinstance(spec.genes, list):
        for u, g in zip(units, per_unit):
            missing = [x for x in spec.genes if x not in set(g)]
            if missing and spec.gene_join == "strict":
                raise InputError(
                    f"{u.label}: genes {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                    f"({len(missing)} of {len(spec.genes)}) are not columns of this file; fix the gene "
                    f"list or set gene_join: union | intersection"
                )
    first = per_unit[0]
    if spec.gene_join == "strict":
        for u, g in zip(units[1:], per_unit[1:]):
            if set(g) != set(first):
                extra, missing = sorted(set(g) - set(first)), sorted(set(first) - set(g))
                raise InputError(
                    f"{u.label} has different genes from {units[0].label}: {len(missing)} missing "
                    f"(e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]}); set "
                    f"gene_join: union (missing genes become 0 and are recorded) or intersection"
                )
        genes = list(spec.genes) if isinstance(spec.genes, list) else list(first)
    elif spec.gene_join == "union":
        seen, genes = set(), []
        for g in per_unit:
            for name in g:
                if name not in seen:
                    seen.add(name)
                    genes.append(name)
    else:
        common = set.intersection(*(set(g) for g in per_unit))
        genes = [g for g in first if g in common]
    if not genes:
        raise InputError(
            f"no genes left to read (genes={spec.genes!r}, gene_join={spec.gene_join}); check the gene "
            f"columns or set genes: null to ingest positions only"
        )
    dup = {g for g in genes if genes.count(g) > 1} if len(genes) < 50_000 else set()
    if dup:
        raise InputError(f"duplicate gene names {sorted(dup)[:5]}; gene names must be unique")
    return genes, per_unit


@dataclass
class Layout:
    ids: list[str]  # sections in z order
    z: np.ndarray  # [S] um
    n: np.ndarray  # [S] cells
    source: list[str]  # [S] label of the unit(s) holding each section
    categories: dict  # column -> sorted labels
    kinds: dict  # column -> "cat" | "text" | "num:<kind>"
    z_source: str


def layout_sections(summaries: list[dict], spec: IngestSpec, folder_mode: bool) -> Layout:
    """Validate the summaries together and order sections by z. Raises :class:`InputError` on bad input."""
    where, stats, order = {}, {}, []
    for s in summaries:
        if s["rows"] == 0:
            raise InputError(f"{s['unit']} has no cells (no data rows); remove it or fix the export")
    if not any(s["sections"] for s in summaries):
        raise InputError(
            f"no cells in the selection (only_sections={spec.only_sections}, only_blocks={spec.only_blocks}); "
            f"check the ids against the input's section / block column"
        )
    blocks = sorted({b for s in summaries for b in s["categories"].get("block", [])})
    if spec.block and len(blocks) > 1:
        raise InputError(
            f"the input holds {len(blocks)} blocks in column {spec.block!r} ({', '.join(blocks[:8])}); a stack is "
            f"never aligned across blocks: read one with only_blocks=[...], or one store per block with "
            f"lamina.ingest_blocks (lamina build does this when columns.block is set)"
        )
    for s in summaries:
        for sid, rec in s["sections"].items():
            if sid in where and folder_mode:
                raise InputError(
                    f"duplicate section id {sid!r}: in {where[sid]} and in {s['unit']}; give each "
                    f"file its own section id (rename a file or fix its section column)"
                )
            if sid not in stats:
                stats[sid] = dict(rec)
                order.append(sid)
                where[sid] = s["unit"]
            else:
                st = stats[sid]
                st["n"] += rec["n"]
                for k in ("zmin", "xmin", "ymin"):
                    st[k] = min(st[k], rec[k])
                for k in ("zmax", "xmax", "ymax"):
                    st[k] = max(st[k], rec[k])
    if spec.z:
        z = {}
        for sid in order:
            lo, hi = stats[sid]["zmin"], stats[sid]["zmax"]
            if hi - lo > 1e-3 * max(1.0, abs(hi)):
                raise InputError(
                    f"section {sid!r} ({where[sid]}): column {spec.z!r} varies from {lo:g} to {hi:g} "
                    f"within the section; a section lies at one depth: check the section and z columns"
                )
            z[sid] = 0.5 * (lo + hi) * spec.scale
        z_source = f"column {spec.z}"
    elif spec.section_z:
        given = {str(k): float(v) for k, v in spec.section_z.items()}
        missing = [sid for sid in order if sid not in given]
        if missing:
            raise InputError(f"sections {missing[:10]} have no z in section_z; add them (um)")
        extra = [k for k in given if k not in stats]
        if extra and not (spec.selects or spec.block):  # a subset: the other sections' depths are not used
            raise InputError(
                f"section_z lists {extra[:10]} but no cells belong to them; check the ids "
                f"(sections found: {order[:10]})"
            )
        z, z_source = {sid: given[sid] for sid in order}, "section_z"
    else:
        if spec.section_order:
            listed = [str(s) for s in spec.section_order]
            if spec.selects or spec.block:  # a subset: the order of the sections read
                listed = [s for s in listed if s in stats]
            extra = [s for s in listed if s not in stats]
            unlisted = [s for s in order if s not in set(listed)]
            if extra:
                raise InputError(
                    f"section_order lists {extra[:10]} but no cells belong to them (empty sections); "
                    f"remove them or check the section ids (found: {order[:10]})"
                )
            if unlisted:
                raise InputError(f"sections {unlisted[:10]} have cells but are missing from section_order")
            order = listed
        z = {sid: i * spec.section_spacing for i, sid in enumerate(order)}
        z_source = f"order x {spec.section_spacing:g} um"
    ids = sorted(order, key=lambda s: (z[s], order.index(s)))
    zs = np.array([z[s] for s in ids])
    same = np.flatnonzero(np.diff(zs) == 0)
    if len(same):
        i = int(same[0])
        raise InputError(
            f"sections {ids[i]!r} and {ids[i + 1]!r} have the same z ({zs[i]:g} um); sections must be "
            f"at distinct depths (fix the z column / section_z)"
        )
    n = np.array([stats[s]["n"] for s in ids], dtype=np.int64)
    for sid, cnt in zip(ids, n):
        if cnt < spec.min_cells_per_section:
            raise InputError(
                f"section {sid!r} ({where[sid]}) has only {cnt} cell(s), fewer than "
                f"min_cells_per_section={spec.min_cells_per_section}; drop the section or lower "
                f"min_cells_per_section"
            )
        st = stats[sid]
        extent = max(st["xmax"] - st["xmin"], st["ymax"] - st["ymin"])
        if extent > MAX_EXTENT_UM or (cnt >= 10 and extent < MIN_EXTENT_UM):
            raise InputError(
                f"section {sid!r} ({where[sid]}) spans {extent:.3g} um after applying units="
                f"{spec.units!r}; that is not a tissue section in micrometres: set units (um, mm, nm, "
                f"or px with pixel_size)"
            )
    categories, kinds = {}, {}
    for s in summaries:
        for name, cats in s["categories"].items():
            categories.setdefault(name, set()).update(cats)
        for name, kind in s["kinds"].items():
            if kinds.setdefault(name, kind)[:3] != kind[:3]:
                raise InputError(
                    f"column {name!r} is {kinds[name]} in one file and {kind} in {s['unit']}; make it one type"
                )
            if kind == "num:f":
                kinds[name] = kind
    return Layout(
        ids=ids,
        z=zs,
        n=n,
        source=[where[s] for s in ids],
        categories={k: sorted(v) for k, v in categories.items()},
        kinds=kinds,
        z_source=z_source,
    )


def plan_pieces(summaries: list[dict], layout: Layout) -> list[tuple]:
    """Staged row ranges in final order: ``(fragment_dir, lo, hi, section_code)`` per contiguous piece."""
    rank = {sid: i for i, sid in enumerate(layout.ids)}
    pieces = []
    for s in summaries:
        for frag in s["fragments"]:
            lo = 0
            for sid, cnt in frag["segments"]:
                pieces.append((rank[sid], frag["dir"], lo, lo + cnt))
                lo += cnt
    pieces.sort(key=lambda p: p[0])  # stable: keeps file and chunk order within a section
    return [(d, lo, hi, code) for code, d, lo, hi in pieces]

"""Stage ``interpolate``: generate cell layers between sections with the trained flows -> ``/interpolated``.

For each gap ``(k, k+1)`` of the flow's sections, ``J = round(gap / dz) - 1`` layers are generated at
``z_k + j * gap / (J + 1)`` (spacing within one Euler step of ``dz``). The forward model flows section k's
cells up, the backward model flows section k+1's cells down; a layer at fraction ``t = j / (J + 1)`` of
the gap holds all of both, forward cells with ``weight = 1 - t`` and backward cells with ``weight = t``, so
the nearer section weighs more and a layer's weights add up to about one section's cell count. (Keeping
weighted cells rather than a random ``1 - t`` / ``t`` subsample halves nothing away: a subsample would
add sampling noise that the two observed sections do not have.)

One Dask task per (gap, cell partition): a section's cells are split at random into partitions of about
``rows_per_task`` cells, and inside a task into sub-batches of the flow's training ``subsample`` size, so
each kNN graph is built at the density the flow was trained at. The number of cells every task writes is
known before anything runs: each task writes its rows into its own scratch array, then one task per
output chunk copies the rows of that chunk into the final arrays (chunk-aligned, so no two tasks share a
Zarr chunk). Two passes over the disk instead of one, but no task ever holds more than its own rows or
one chunk (a single Dask graph that concatenates and rechunks the outputs let the scheduler run every
generator first and hold all of them in memory). Rows are ordered by gap; ``gap_start``/``gap_stop`` give each
gap's rows (voxelization reads only the gaps a z-slab needs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dask
import numpy as np

from ..cluster import task_device
from ..errors import ensure
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .flow import load_models, read_cells
from .options import Options, option

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lamina")

#: per-cell columns of ``/interpolated`` besides ``pcs``, in the order the tasks emit them
COLUMNS = (
    ("x", np.float32),
    ("y", np.float32),
    ("z", np.float32),
    ("weight", np.float32),
    ("gap", np.int32),
    ("direction", np.int8),
)


@dataclass(frozen=True)
class InterpolateOptions(Options):
    dz_um: float | None = option(None, "layer spacing (um); null: the flow's dz_um", gt=0)
    noise_pos: float | None = option(
        None, "diffusion of positions; null: as trained (0 where train_flow kept the untrained flow)", ge=0
    )
    noise_expr: float | None = option(
        None, "diffusion of expression; null: as trained (0 where train_flow kept the untrained flow)", ge=0
    )
    rows_per_task: int = option(65536, "cells of one section flowed per task", ge=1)
    seed: int = option(0, "seed of the partitions and the noise (the same seed gives the same cells)")


def _layers(gap_um: float, dz_um: float) -> np.ndarray:
    """Fractions ``t_j = j / (J + 1)``, j = 1..J, of the layers generated inside a gap."""
    steps = max(1, int(round(gap_um / dz_um)))
    return np.arange(1, steps) / steps


#: Euler steps per gap above which the cost of a reconstruction is worth a word before it runs
MANY_STEPS = 25


def gap_messages(ids: list[str], z: np.ndarray, sec: np.ndarray, dz_um: float) -> list[str]:
    """What a user should hear before the layers are generated, for the flow's sections ``sec`` (positions,
    z order) of an atlas with section ``ids`` and depths ``z`` (um), at layer spacing ``dz_um``:

    - gaps narrower than 1.5 ``dz_um`` get no layer (``round(gap / dz) - 1 = 0``), so the volume's slabs there
      hold only the observed sections;
    - the cost grows with ``gap / dz``: every cell of both sections is flowed that many Euler steps.
    """
    gaps = np.diff(np.asarray(z, np.float64)[sec])
    pairs = [f"{ids[lo]}-{ids[hi]} ({gap:g} um)" for lo, hi, gap in zip(sec[:-1], sec[1:], gaps)]
    steps = np.maximum(1, np.round(gaps / dz_um)).astype(int)
    out = []
    empty = [p for p, n in zip(pairs, steps) if n < 2]
    if empty:
        out.append(
            f"{len(empty)} of {len(gaps)} gaps are narrower than 1.5 x dz_um = {1.5 * dz_um:g} um and get no "
            f"interpolated layer: {', '.join(empty[:8])}{' ...' if len(empty) > 8 else ''}; the volume there holds "
            f"the observed sections only. To fill them, set dz_um below {float(gaps.min()) / 1.5:.3g} um "
            "(stages.train_flow.dz_um, or stages.interpolate.dz_um for the layers alone)"
        )
    if steps.max() > MANY_STEPS:
        worst = int(np.argmax(steps))
        out.append(
            f"gap {pairs[worst]} takes {steps[worst]} Euler steps of dz_um = {dz_um:g} um for every cell of its two "
            f"sections ({int(steps.sum())} steps over {len(gaps)} gaps): the cost grows with gap / dz_um. A dz_um of "
            f"{float(gaps.max()) / MANY_STEPS:.3g} um keeps every gap within {MANY_STEPS} steps"
        )
    return out


def _partition(a: int, b: int, parts: int, seed: int, key: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 7, key])
    return [np.sort(p) for p in np.array_split(a + rng.permutation(b - a), parts)]


def _flow_batches(
    model,
    xy: np.ndarray,
    h: np.ndarray,
    z0: float,
    z1: float,
    dz: float,
    sub: int,
    noise: tuple[float, float],
    gen: torch.Generator,
):
    """Flow ``xy``, ``h`` from z0 to z1 in sub-batches of ``sub`` cells; returns [(z, xy [n, 2], h [n, P])] per step."""
    import torch

    from ..kernels.sde import integrate

    n = len(xy)
    dev = gen.device
    pieces = []
    with torch.no_grad():
        for a in range(0, n, sub):
            b = min(n, a + sub)
            pieces.append(
                integrate(
                    model,
                    torch.from_numpy(xy[a:b]).to(dev),
                    torch.from_numpy(h[a:b]).to(dev),
                    z0,
                    z1,
                    dz,
                    noise[0],
                    noise[1],
                    gen,
                )
            )
    if not pieces:
        return []
    return [
        (
            pieces[0][i][0],
            np.concatenate([p[i][1].cpu().numpy() for p in pieces]),
            np.concatenate([p[i][2].cpu().numpy() for p in pieces]),
        )
        for i in range(len(pieces[0]))
    ]


def _gap_task(store: str, flow: str, lo: int, hi: int, part: int, parts: int, cfg: dict, target: str) -> int:
    """Write rows ``[n, 6 + P]`` (x, y, z, weight, gap, direction, PCs) of the layers of one (gap, partition)
    into the scratch array ``target``; returns n."""
    import torch

    root = open_root(store, "r")
    sec = root["sections"]
    starts, stops = np.asarray(sec["cell_start"][...]), np.asarray(sec["cell_stop"][...])
    z = np.asarray(sec["z"][...], np.float64)
    dev = task_device()
    models = {d: m.to(dev) for d, m in load_models(root, flow).items()}
    sub = int(root[flow].attrs["subsample"])
    t = _layers(z[hi] - z[lo], cfg["dz_um"])
    rows_f = _partition(int(starts[lo]), int(stops[lo]), parts, cfg["seed"], 2 * lo)[part]
    rows_b = _partition(int(starts[hi]), int(stops[hi]), parts, cfg["seed"], 2 * hi + 1)[part]
    noise = (cfg["noise_pos"], cfg["noise_expr"])
    gen = torch.Generator(device=dev).manual_seed(int(cfg["seed"]) * 1_000_003 + lo * 4099 + part)
    fwd = _flow_batches(models["forward"], *read_cells(root, rows_f), z[lo], z[hi], cfg["dz_um"], sub, noise, gen)
    bwd = _flow_batches(models["backward"], *read_cells(root, rows_b), z[hi], z[lo], cfg["dz_um"], sub, noise, gen)
    out = []
    for j in range(len(t)):
        for direction, layers in ((0, fwd), (1, bwd)):
            if not layers:
                continue
            # forward step j lands on layer j+1; backward step i lands on layer J - i
            _, xy, h = layers[j] if direction == 0 else layers[len(t) - 1 - j]
            block = np.empty((len(xy), 6 + h.shape[1]), np.float32)
            block[:, 0:2] = xy
            block[:, 2] = z[lo] + t[j] * (z[hi] - z[lo])
            block[:, 3] = (1 - t[j]) if direction == 0 else t[j]
            block[:, 4] = lo
            block[:, 5] = direction
            block[:, 6:] = h
            out.append(block)
    rows = np.concatenate(out)
    open_root(store, "r+")[target][...] = rows
    return len(rows)


def _copy_chunk(store: str, group: str, a: int, b: int, parts: list[tuple[str, int, int]]) -> int:
    """Rows ``[a, b)`` of the final arrays from the scratch arrays ``(name, start, stop)`` that cover them."""
    root = open_root(store, "r+")
    g = root[group]
    rows = np.concatenate([np.asarray(g[name][max(a, s) - s : min(b, e) - s]) for name, s, e in parts])
    for i, (k, dt) in enumerate(COLUMNS):
        g[k][a:b] = rows[:, i].astype(dt)
    g["pcs"][a:b] = rows[:, len(COLUMNS) :]
    return b - a


def plan(atlas: Atlas, sec: np.ndarray, dz_um: float, rows_per_task: int) -> list[dict]:
    """Every (gap, partition) task with the number of rows it will write (known before running)."""
    table = atlas.sections
    z, n = table.z.to_numpy(np.float64), table.n_cells.to_numpy()
    tasks = []
    for lo, hi in zip(sec[:-1], sec[1:]):
        t = _layers(z[hi] - z[lo], dz_um)
        if not len(t):
            continue
        parts = max(1, int(np.ceil(max(n[lo], n[hi]) / rows_per_task)))
        sizes_f = [len(p) for p in np.array_split(np.arange(n[lo]), parts)]
        sizes_b = [len(p) for p in np.array_split(np.arange(n[hi]), parts)]
        for part in range(parts):
            tasks.append(
                {
                    "lo": int(lo),
                    "hi": int(hi),
                    "part": part,
                    "parts": parts,
                    "layers": len(t),
                    "rows": len(t) * (sizes_f[part] + sizes_b[part]),
                }
            )
    return tasks


def _prepare(atlas: Atlas, opts: InterpolateOptions) -> dict:
    """The layer spacing and noise actually used (the flow's where the options say null) and the sections."""
    record = atlas.stage_records()["train_flow"]
    trained = record["params"]
    # the untrained flow (kept by train_flow's held-out check, or steps=0) copies cells: without noise its layers
    # are exactly the distance-weighted blend of the two sides, which the noise would only blur
    copies = not record.get("trained", True)
    noise = {k: 0.0 if copies else float(trained[k]) for k in ("noise_pos", "noise_expr")}
    return {
        # flow_dz_um: the step train_flow resolved (its dz_um option may be null: from the section spacing)
        "layer_dz_um": float(opts.dz_um or trained.get("flow_dz_um") or trained["dz_um"]),
        "layer_noise_pos": noise["noise_pos"] if opts.noise_pos is None else float(opts.noise_pos),
        "layer_noise_expr": noise["noise_expr"] if opts.noise_expr is None else float(opts.noise_expr),
    }


def _build(ctx: StageContext) -> dict:
    """Cells of the layers between sections, generated by the trained flows -> ``/interpolated``."""
    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    p = ctx.prepared
    cfg = {
        "dz_um": p["layer_dz_um"],
        "noise_pos": p["layer_noise_pos"],
        "noise_expr": p["layer_noise_expr"],
        "seed": int(opts.seed),
    }
    rows_per_task = int(opts.rows_per_task)
    sec = np.asarray(atlas.root["flow/sections"][...])
    P = int(atlas.root["pca/pcs"].shape[1])
    ids = [str(i) for i in atlas.sections.id]
    notes = gap_messages(ids, atlas.sections.z.to_numpy(np.float64), sec, cfg["dz_um"])
    for note in notes:
        log.warning("interpolate: %s", note)
    tasks = plan(atlas, sec, cfg["dz_um"], rows_per_task)
    counts = np.array([t["rows"] for t in tasks], np.int64)
    n = int(counts.sum())
    chunk = atlas.cell_chunk
    for k, dt in COLUMNS:
        arrays.create(group, k, (n,), dt, (chunk,), ("cell",), {"units": "um"} if k in "xyz" else None)
    arrays.create(group, "pcs", (n, P), np.float32, (chunk, P), ("cell", "pc"))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # plan() emits the tasks gap by gap, so each gap's rows are one run of tasks
    gaps, first = np.unique([t["lo"] for t in tasks], return_index=True)
    arrays.write_small(group, "gap_section", gaps.astype(np.int32), ("gap",))
    arrays.write_small(group, "gap_start", offsets[first].astype(np.int64), ("gap",))
    arrays.write_small(group, "gap_stop", np.append(offsets[first[1:]], n).astype(np.int64), ("gap",))
    if n:
        scratch = group.require_group("_parts")
        width = len(COLUMNS) + P
        names = []
        for i, t in enumerate(tasks):
            arrays.create(scratch, f"t{i}", (t["rows"], width), np.float32, (chunk, width), ("row", "column"))
            names.append(f"{scratch.path}/t{i}")
        written = ctx.compute(
            *[
                dask.delayed(_gap_task, pure=False)(
                    atlas.path, "flow", t["lo"], t["hi"], t["part"], t["parts"], cfg, names[i]
                )
                for i, t in enumerate(tasks)
                if t["rows"]
            ]
        )
        ensure(
            list(written) == [t["rows"] for t in tasks if t["rows"]],
            "interpolate: a task wrote other rows than planned",
        )
        copies = []
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            cover = [
                (f"_parts/t{i}", int(offsets[i]), int(offsets[i + 1]))
                for i in range(len(tasks))
                if offsets[i] < b and offsets[i + 1] > a
            ]
            copies.append(dask.delayed(_copy_chunk, pure=False)(atlas.path, group.path, a, b, cover))
        ensure(sum(ctx.compute(*copies)) == n, "interpolate: the copies did not write every row")
        del group["_parts"]
    return {
        "n_cells": n,
        "n_tasks": len(tasks),
        "layers": int(sum(tasks[i]["layers"] for i in first)),
        "empty_gaps": int(len(sec) - 1 - len(gaps)),
        "notes": notes,
    }


STAGE = Stage(
    name="interpolate",
    output="interpolated",
    inputs=("train_flow",),
    options=InterpolateOptions,
    version=2,
    summary="Cell layers between sections, generated by the trained flows, into ``/interpolated``.",
    build=_build,
    element="lamina.interpolated",
    pipeline="reconstruct",
    prepare=_prepare,
)
interpolate = STAGE.function

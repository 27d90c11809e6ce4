"""Stage ``train_flow``: learn the graph SDE along z (forward and backward) -> ``/flow``.

Training data are consecutive section pairs of the aligned atlas (``/aligned`` x, y and ``/pca/pcs``): each step
draws a gap ``(k, k+1)``, a random subsample of ``subsample`` cells from each side, flows the lower sample up to the
depth of the upper one with the forward model (and the upper one down with the backward model), and minimises the
Sinkhorn divergence to the observed cells there plus ``action_weight`` times the flow's kinetic action
(:func:`lamina.kernels.sde.flow_loss`). The O(n m) transport problem is why training works on subsamples:
``subsample`` cells per side set both the memory (``~ 3 * subsample^2`` floats per loss) and the cell density the
kNN graph is learned at; inference partitions cells at the same density.

Steps run as a chain of Dask tasks of ``steps_per_task`` steps each. After every task the models and the
Adam state are written as Zarr arrays into a checkpoint group ``_tmp/ckpt-train_flow-<hash>``, so an
interrupted training resumes from the last finished task; the driver shows a progress bar.

What the bar and ``/flow/excess`` show is the fit's divergence *beyond its noise floor*: two independent
512-cell samples of one section are themselves a Sinkhorn divergence apart, and that floor dominated the raw
loss (it looked flat). Each step draws a second, disjoint sample of the target section and subtracts its
divergence from the first (:func:`lamina.kernels.sde.divergence_excess`).

``path_gaps`` > 1 draws a path of that many consecutive gaps instead of one: the same cells are carried through
it and fitted at every section (:func:`lamina.kernels.sde.path_loss`), so one drift has to explain the motion
over several gaps. ``objective: matching`` replaces the transport loss by flow matching on the samples' entropic OT
coupling (:func:`lamina.kernels.sde.matching_loss`). Both are measured in benchmarks/RESULTS.md and not the default.

Validation (``validate``, on by default with >= 4 flow sections): the interior section nearest the middle of
the stack is left out of training; after every task the flow predicts it from its two neighbours exactly as
``interpolate`` would, and the prediction's excess over the noise floor is recorded (``/flow/heldout``). The
untrained flow (zero drift: cells are copied and the two sides blended by distance) is scored first and is the
incumbent: a state replaces the incumbent only when the map's bins agree that it is better (a gain of
``SIGNIFICANCE`` standard errors of the paired per-bin difference, :func:`lamina.kernels.sde.paired_gain`, and 1%
of the untrained excess) and it removes ``min_gain`` of the untrained excess in all; the flow written is the last
state that did, training stops after ``patience`` tasks without one, and where training never beats the untrained
flow that one is kept (with a warning), so a user does not pay for minutes of training that move nothing and the
interpolation is never worse on the held-out section than the blend. The record holds the scores and the gain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

import dask
import numpy as np
import zarr

from ..cluster import task_device
from ..errors import InputError, MissingInputError
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option
from .runner import SCRATCH, params_hash

log = logging.getLogger("lamina")

# action_weight: a displacement d that the samples agree on, over a gap g (both in normalised units), costs
# |d|^2 in the fit and w |d|^2 / g in the action, so the flow keeps about d / (1 + w / g) of it. Gaps are
# ~0.1 of the atlas radius, so w = 1 kept under a tenth (the flow copied; it tied the linear blend in the
# leave-one-out benchmark); w = 0.3 keeps about a third, enough to move structures, still shrinking what
# 512-cell subsamples disagree on; w <= 0.03 followed the subsample noise and lost to the blend. 600 steps:
# at 150 the moving flows were still worse than the blend, at 1200 no better than at 600.
# expression_weight: on the moving-structure phantom (benchmarks/interpolation.py, held-out S005) the flow with
# 0.3 matched the target by changing expression in place (a blend by other means) and lost to the blend
# (r against the true field 0.956 vs 0.966); 1.0 makes moving a cell cheaper than re-expressing it: 0.971;
# 2.0: 0.970 with worse composition; action_weight 1.0 or no noise at 0.3 did not help (0.961, 0.957).
# With lr 2e-3 the held-out optimum comes early (20-100 steps) and the error rises after it while the fit's
# excess still falls; 5e-4 reached it later and no better (0.969), eps 0.05 / 0.2 were worse (0.970 / 0.959).
# Hence a held-out score every 10 steps (every 25: 0.971; every 10: 0.975-0.977; every 5: 0.972), patience 6.
# min_gain 0.05 (before: any 1% step): on her2st the states kept removed 1.2-2.4% of the untrained excess on the
# validation section, and on 2 of those 3 folds the fold's own held-out section came out below the blend (-0.0010,
# -0.0022); on the moving phantom the kept states removed 19-24%. Chosen with these numbers in view.
# path_gaps: carrying the cells over 2 gaps per step (one drift for the motion across both) scored 0.962 against
# 0.971 for single gaps (held-out gains 0.005-0.016 vs 0.016-0.065), so single gaps stay the default. The flow's
# gain there comes from expression more than from motion: trained on all 10 sections (150 steps), it moved the
# tube's interior cells 15-20% of the tube's true travel per gap (action 0: ~30%), and the entropic plan between
# two 512-cell samples itself carries them 20-100% of it (the growing tube takes target cells from the layers).


@dataclass(frozen=True)
class TrainFlowOptions(Options):
    dz_um: float | None = option(
        None,
        "Euler step of the flow along z (um), also the layer spacing of interpolate and the voxel edge; null: a "
        "quarter of the median gap between consecutive flow sections (three layers in a typical gap)",
        gt=0,
    )
    k: int = option(10, "neighbours of each cell in the flow's kNN graph", ge=1)
    hidden: int = option(64, "width of the drift networks", ge=1)
    subsample: int = option(512, "cells per side per training step (the OT loss is O(subsample^2))", ge=1)
    steps: int = option(600, "training steps (0: the untrained flow: cells are copied, the sides blended)", ge=0)
    steps_per_task: int = option(
        10, "steps per Dask task (a checkpoint and, with validate, a held-out score after each)", ge=1
    )
    lr: float = option(2e-3, "Adam learning rate", gt=0)
    eps: float = option(0.01, "Sinkhorn blur (normalised units squared)", gt=0)
    expression_weight: float = option(1.0, "weight of expression against position in the OT cost", ge=0)
    action_weight: float = option(
        0.3, "weight of the flow's kinetic action (keeps the drift near zero where the samples disagree)", ge=0
    )
    noise_pos: float = option(0.01, "diffusion of positions (normalised units per sqrt depth)", ge=0)
    noise_expr: float = option(0.02, "diffusion of expression (normalised units per sqrt depth)", ge=0)
    pool: int = option(4, "cells read per section per task, in subsamples", ge=1)
    seed: int = option(0, "seed of the subsamples, the noise and the initial weights")
    sections: tuple[str | int, ...] | None = option(
        None, "sections the flow learns from (ids or positions; e.g. to leave one out); null: all"
    )
    validate: bool = option(
        True,
        "hold out the interior section nearest the middle (with >= 4 flow sections), score the flow there after "
        "every task against the untrained flow, keep the best state (the untrained one if training never beats "
        "it) and stop after `patience` tasks without progress",
    )
    patience: int = option(6, "tasks without a better held-out score before training stops", ge=1)
    min_gain: float = option(
        0.05,
        "share of the untrained flow's held-out excess a trained state must remove in all to be kept (with validate)",
        ge=0,
    )
    objective: Literal["transport", "matching"] = option(
        "transport",
        "transport: the Sinkhorn divergence of the flowed cells to the next section plus the action, back-propagated "
        "through the integration; matching: the drift regressed on the displacements of an entropic OT coupling of "
        "the two sections (OT conditional flow matching; no action term)",
    )
    path_gaps: int = option(
        1,
        "gaps each training path crosses: the same cells are flowed through that many consecutive sections and "
        "fitted at each (1: one gap per step)",
        ge=1,
    )


MIN_CELLS = 3
DIRECTIONS = ("forward", "backward")


def flow_sections(atlas: Atlas, sections) -> np.ndarray:
    """Positions of the sections the flow uses, in z order; refuses fewer than 3 or duplicates."""
    S = atlas.n_sections
    use = np.arange(S) if sections is None else np.array([atlas.section_index(s) for s in sections])
    if len(np.unique(use)) != len(use):
        raise InputError(f"sections for the flow repeat a section: {list(use)}")
    z = atlas.sections.z.to_numpy()
    use = use[np.argsort(z[use], kind="stable")]
    n = atlas.sections.n_cells.to_numpy()[use]
    use = use[n >= MIN_CELLS]
    if len(use) < 3:
        raise InputError(
            f"interpolation along z needs at least 3 sections with >= {MIN_CELLS} cells (got "
            f"{len(use)} in {atlas.path}); with fewer there is no gap to learn the flow from other "
            f"than the one it would fill"
        )
    if np.any(np.diff(z[use]) <= 0):
        raise InputError(
            f"sections {list(use)} of {atlas.path} do not have increasing, distinct z; the flow "
            f"integrates from one depth to the next"
        )
    return use


def read_cells(root: zarr.Group, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned (x, y) ``[n, 2]`` and PCs ``[n, P]`` of the given sorted row indices."""
    xy = np.stack([root["aligned/x"].oindex[rows], root["aligned/y"].oindex[rows]], 1).astype(np.float32)
    return xy, np.asarray(root["pca/pcs"].oindex[rows, :], np.float32)


def _pools(root, sec: np.ndarray, starts, stops, size: int, rng) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for s in sec:
        a, b = int(starts[s]), int(stops[s])
        rows = np.sort(rng.choice(np.arange(a, b), size=min(size, b - a), replace=False))
        out[int(s)] = read_cells(root, rows)
    return out


#: layers of a median gap are ``DZ_PER_GAP - 1``; the default step is that fraction of the median gap
DZ_PER_GAP = 4


def default_dz(z: np.ndarray) -> float:
    """The default step along z (um): the median gap between consecutive depths ``z`` (sorted, um) over
    ``DZ_PER_GAP``, to 3 significant digits.

    The stack's own spacing sets it, not a constant: a fixed 10 um gave 10-step gaps (and minutes of training)
    on stacks 100 um apart and no layer at all on stacks < 15 um apart. With a quarter of the median gap, a typical
    gap gets three layers and four Euler steps; a gap below 0.375 median gets none (said by interpolate), and the
    cost of a gap is ``4 gap / median``.
    """
    gap = float(np.median(np.diff(np.asarray(z, np.float64))))
    return float(f"{gap / DZ_PER_GAP:.3g}")


def build_models(cfg: dict, n_features: int) -> dict:
    """Fresh forward / backward models; their initial weights come from ``cfg["seed"]`` (torch's global generator
    is left as it was), so the same seed trains the same flow."""
    import torch

    from ..kernels.sde import FlowModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        return {d: FlowModel(n_features, cfg["hidden"], cfg["k"]) for d in DIRECTIONS}


def validation_sections(sec: np.ndarray, validate: bool) -> tuple[int, int, int] | None:
    """(held-out, lower, upper) positions for the held-out score, or None (fewer than 4 flow sections: the
    remaining ones would leave no gap besides the one the held-out section sits in)."""
    if not validate or len(sec) < 4:
        return None
    i = len(sec) // 2
    return int(sec[i]), int(sec[i - 1]), int(sec[i + 1])


def _validation_cells(root, cfg: dict, starts, stops) -> dict:
    """Fixed samples for the held-out score: ``VAL_SAMPLE`` cells of each neighbour and two disjoint samples of
    that size of the held-out section (the target and the noise-floor sample)."""
    v, lo, hi = cfg["validation"]
    rng = np.random.default_rng([cfg["seed"], 0x7A11D])

    def rows(s, k):
        a, b = int(starts[s]), int(stops[s])
        return rng.choice(np.arange(a, b), size=min(k, b - a), replace=False)

    held = rows(v, 2 * VAL_SAMPLE)
    half = len(held) // 2
    return {
        "lo": read_cells(root, np.sort(rows(lo, VAL_SAMPLE))),
        "hi": read_cells(root, np.sort(rows(hi, VAL_SAMPLE))),
        "target": read_cells(root, np.sort(held[:half])),
        "floor": read_cells(root, np.sort(held[half : 2 * half])),
    }


#: cells per sample of the held-out score; bins of the maps hold ~VAL_PER_BIN target cells on average
VAL_SAMPLE = 4096
VAL_PER_BIN = 16
#: a state replaces the incumbent only when its gain over it is this many standard errors across the map's bins
SIGNIFICANCE = 2.0


def heldout_excess(
    models: dict, val: dict, z: np.ndarray, cfg: dict, dev, noise: bool = True
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(excess, floor, errors, counts)``: how far the flow's prediction at the held-out depth is from the
    observed cells, and the per-bin errors and observed counts behind it (:func:`lamina.kernels.sde.binned_errors`,
    in the same units; for the paired test of a gain).

    The prediction is what ``interpolate`` puts there: lower-side cells flowed forward with weight ``w`` and
    upper-side cells flowed backward with ``1 - w`` (``w`` = the blend's weight of the lower side), with the
    trained noise drawn from a fixed seed, so trained states are all scored on the same draws; the untrained flow
    is scored without noise (``noise=False``), as ``interpolate`` runs it: the blend itself is the incumbent.
    Both are binned on one grid (:func:`lamina.kernels.sde.map_error`), the score a user reads off an
    interpolated map: the mean squared difference of the per-bin mean PCs (in units of the total PC variance),
    minus the noise floor (the same error between two disjoint samples of the held-out section, halved).
    """
    import torch

    from ..kernels.sde import binned_errors, integrate, map_error, mean_error

    v, lo, hi = cfg["validation"]
    w = float((z[hi] - z[v]) / (z[hi] - z[lo]))
    t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    gen = torch.Generator(device=dev).manual_seed(int(cfg["seed"]) * 1_000_003 + 0x5EED)
    noise = (cfg["noise_pos"], cfg["noise_expr"]) if noise else (0.0, 0.0)
    with torch.no_grad():
        _, pf, hf = integrate(models["forward"], *map(t, val["lo"]), z[lo], z[v], cfg["dz_um"], *noise, gen)[-1]
        _, pb, hb = integrate(models["backward"], *map(t, val["hi"]), z[hi], z[v], cfg["dz_um"], *noise, gen)[-1]
    pred_xy = np.concatenate([pf.cpu().numpy(), pb.cpu().numpy()])
    pred_h = np.concatenate([hf.cpu().numpy(), hb.cpu().numpy()])
    weights = np.concatenate([np.full(len(pf), w / len(pf)), np.full(len(pb), (1 - w) / len(pb))])
    (txy, th), (fxy, fh) = val["target"], val["floor"]
    scale = float(models["forward"].feature_scale[0]) ** 2
    kw = dict(per_bin=VAL_PER_BIN)
    floor = 0.5 * map_error(fxy, fh, np.ones(len(fxy)), txy, th, **kw) / scale
    errors, counts = binned_errors(pred_xy, pred_h, weights, txy, th, **kw)
    errors = errors / scale
    return mean_error(errors, counts) - floor, floor, errors, counts


def _save_models(group: zarr.Group, models: dict, prefix: str = "") -> None:
    from ..store.tensors import write_state

    for d, m in models.items():
        write_state(group.require_group(prefix + d), m.state_dict())


def _train_block(store: str, ckpt: str, cfg: dict, sec: list[int], a: int, b: int) -> dict:
    """Train steps ``[a, b)`` from the checkpoint (or from scratch when ``a == 0``) and checkpoint again.

    Returns the per-step ``loss`` and ``excess`` (the fit's divergence beyond the noise floor, summed over the
    two directions), the held-out ``heldout`` excess after the block (NaN without validation) and ``stop``
    (no better held-out score for ``patience`` tasks).
    """
    import torch

    from ..kernels.sde import compared_space, divergence_excess, matching_loss, paired_gain, path_loss
    from ..store.tensors import load_optimizer_state, optimizer_state, read_state, write_state

    root = open_root(store, "r+")
    secs = root["sections"]
    starts, stops = np.asarray(secs["cell_start"][...]), np.asarray(secs["cell_stop"][...])
    z = np.asarray(secs["z"][...], np.float64)
    sec = np.asarray(sec)
    rng = np.random.default_rng([cfg["seed"], a])
    pools = _pools(root, sec, starts, stops, cfg["pool"] * cfg["subsample"], rng)
    P = next(iter(pools.values()))[1].shape[1]
    dev = task_device()
    models = {d: m.to(dev) for d, m in build_models(cfg, P).items()}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    group = root.require_group(ckpt)
    val = _validation_cells(root, cfg, starts, stops) if cfg["validation"] else None
    if a > 0:
        for d, m in models.items():
            m.load_state_dict(read_state(group[d]))
        load_optimizer_state(opt, read_state(group["optimizer"]))
    else:
        allxy = np.concatenate([v[0] for v in pools.values()])
        allh = np.concatenate([v[1] for v in pools.values()])
        center = allxy.mean(0)
        length = float(np.sqrt(allxy.var(0).sum()))
        one = pools[int(sec[len(sec) // 2])][0][: cfg["subsample"]]
        d = torch.cdist(torch.from_numpy(one), torch.from_numpy(one))
        d.fill_diagonal_(float("inf"))
        neighbour = float(d.min(1).values.median())
        fscale = float(np.sqrt(allh.var(0).sum())) or 1.0
        for m in models.values():
            m.set_normalisation(center, length, max(neighbour, 1e-6), np.full(P, fscale))
        if val is not None:  # the untrained flow is the first incumbent: training has to beat it
            untrained, floor, errors, counts = heldout_excess(models, val, z, cfg, dev, noise=False)
            _save_models(group, models, "best_")
            arrays.write_small(group, "best_errors", errors.astype(np.float64), ("bin",))
            group.attrs.update(
                {
                    "untrained": untrained,
                    "floor": floor,
                    "best": untrained,
                    "best_step": 0,
                    "since_best": 0,
                    "best_gain_se": float("nan"),
                }
            )
    gen = torch.Generator(device=dev).manual_seed(int(cfg["seed"]) * 1_000_003 + a)
    losses, excesses = [], []
    m_sub = cfg["subsample"]
    kw = dict(
        dz_um=cfg["dz_um"],
        expression_weight=cfg["expression_weight"],
        eps=cfg["eps"],
        action_weight=cfg["action_weight"],
        noise_pos=cfg["noise_pos"],
        noise_expr=cfg["noise_expr"],
        generator=gen,
    )
    # both directions share one normalisation (set together, never trained): one compared space
    space = lambda p, h: compared_space(models["forward"], p, h, cfg["expression_weight"])  # noqa: E731
    n_gaps = len(sec) - 1
    L = min(int(cfg["path_gaps"]), n_gaps)
    matching = cfg["objective"] == "matching"
    match_kw = dict(expression_weight=cfg["expression_weight"], eps=cfg["eps"], generator=gen)

    def draw(s):
        """Two disjoint samples of section ``s``: the one trained on and one for the noise floor."""
        xy, h = pools[s]
        idx = rng.permutation(len(xy))
        k = max(1, min(m_sub, len(xy) // 2))
        t = lambda rows: (torch.from_numpy(xy[rows]).to(dev), torch.from_numpy(h[rows]).to(dev))  # noqa: E731
        return t(idx[:k]), t(idx[k : 2 * k])

    for _step in range(a, b):
        g = int(rng.integers(0, n_gaps - L + 1))
        path = [int(s) for s in sec[g : g + L + 1]]
        samples = [draw(s) for s in path]
        excess, parts = 0.0, []
        for d, order in (("forward", range(L + 1)), ("backward", range(L, -1, -1))):
            first, *rest = order
            track = partial(path_loss, models[d], *samples[first][0], [z[path[i]] for i in order])
            if matching:
                hops = list(zip(order[:-1], order[1:]))
                match = [
                    matching_loss(models[d], *samples[i][0], z[path[i]], z[path[j]], *samples[j][0], **match_kw)
                    for i, j in hops
                ]
                parts.append(torch.stack(match).mean())
                with torch.no_grad():  # the flow's fit (for the excess) without a gradient through it
                    _, fits, xs, ys = track([samples[i][0] for i in rest], **kw)
            else:
                part, fits, xs, ys = track([samples[i][0] for i in rest], **kw)
                parts.append(part)
            # the fit's own transport value is reused: only the floor terms are solved here
            excess += float(
                np.mean(
                    [
                        divergence_excess(x.detach(), y, space(*samples[i][1]), cfg["eps"], f.detach())[0]
                        for i, f, x, y in zip(rest, fits, xs, ys)
                    ]
                )
            )
        loss = parts[0] + parts[1]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        excesses.append(excess)
    for d, m in models.items():
        write_state(group.require_group(d), m.state_dict())
    write_state(group.require_group("optimizer"), optimizer_state(opt))
    n_tasks = -(-cfg["steps"] // cfg["steps_per_task"])
    sizes = (("loss", cfg["steps"], "step"), ("excess", cfg["steps"], "step"), ("heldout", n_tasks, "task"))
    for name, shape, dim in sizes:
        if name not in group and shape:
            arrays.create(group, name, (shape,), np.float32, (shape,), (dim,), fill_value=np.nan)
    heldout, stop = float("nan"), False
    if b > a:
        group["loss"][a:b] = np.asarray(losses, np.float32)
        group["excess"][a:b] = np.asarray(excesses, np.float32)
    if val is not None and b > a:
        heldout, _, errors, counts = heldout_excess(models, val, z, cfg, dev)
        group["heldout"][a // cfg["steps_per_task"]] = heldout
        best = float(group.attrs["best"])
        gain, se = paired_gain(np.asarray(group["best_errors"][...]), errors, counts)
        # a new incumbent must improve on the last by 1% of what the untrained flow leaves above the noise floor, with
        # a gain the map's bins agree on (SIGNIFICANCE standard errors over the bins, not a few bins' noise), and in
        # all remove min_gain of it
        untrained = max(float(group.attrs["untrained"]), 0.0)
        better = heldout < best - 0.01 * untrained and heldout <= (1.0 - cfg["min_gain"]) * untrained
        if better and gain > SIGNIFICANCE * se:
            _save_models(group, models, "best_")
            arrays.write_small(group, "best_errors", errors.astype(np.float64), ("bin",))
            group.attrs.update({"best": heldout, "best_step": int(b), "since_best": 0, "best_gain_se": se})
        else:
            group.attrs["since_best"] = int(group.attrs["since_best"]) + 1
        stop = int(group.attrs["since_best"]) >= cfg["patience"]
        group.attrs["stopped"] = bool(stop)
    group.attrs["steps_done"] = int(b)  # written last: the checkpoint is valid up to here
    return {"loss": losses, "excess": excesses, "heldout": heldout, "stop": stop}


def _check(atlas: Atlas, opts: TrainFlowOptions) -> None:
    flow_sections(atlas, opts.sections)


def _prepare(atlas: Atlas, opts: TrainFlowOptions) -> dict:
    sec = flow_sections(atlas, opts.sections)
    z = atlas.sections.z.to_numpy(np.float64)[sec]
    dz = opts.dz_um if opts.dz_um is not None else default_dz(z)
    return {"flow_sections": sec.tolist(), "validation": validation_sections(sec, opts.validate), "flow_dz_um": dz}


def _build(ctx: StageContext) -> dict:
    """Train the forward and backward graph-SDE flows on consecutive aligned sections -> ``/flow``."""
    from tqdm.auto import tqdm

    from ..store.tensors import read_state, write_state

    atlas, group = ctx.atlas, ctx.group
    sec = np.asarray(ctx.prepared["flow_sections"])
    val = ctx.prepared["validation"]
    cfg = {**ctx.options.to_dict(), "validation": val, "dz_um": float(ctx.prepared["flow_dz_um"])}
    if ctx.options.dz_um is None:
        log.info(
            "train_flow: dz_um = %g um, a quarter of the median gap between the flow's sections (set dz_um to choose)",
            cfg["dz_um"],
        )
    train = sec if val is None else sec[sec != val[0]]
    records = atlas.stage_records()
    ckpt = (
        f"{SCRATCH}/ckpt-train_flow-"
        + params_hash({**cfg, "sections": sec.tolist()}, records["warp"]["hash"], records["pca"]["hash"])[:16]
    )
    state = atlas.root[ckpt].attrs if ckpt in atlas.root else {}
    done = int(state.get("steps_done", 0))
    if done:
        log.info("train_flow: resuming from step %d of %d (checkpoint %s)", done, cfg["steps"], ckpt)
    steps = [(a, min(cfg["steps"], a + cfg["steps_per_task"])) for a in range(0, cfg["steps"], cfg["steps_per_task"])]
    if not steps:  # the untrained flow: normalisation only
        steps = [(0, 0)]
    bar = tqdm(total=cfg["steps"], initial=done, desc="train_flow", unit="step", disable=None)
    stopped = bool(state.get("stopped", False))
    for a, b in steps:
        if stopped or (b <= done and done > 0):
            continue
        (out,) = ctx.compute(dask.delayed(_train_block, pure=False)(atlas.path, ckpt, cfg, train.tolist(), a, b))
        stopped = out["stop"]
        bar.update(b - a)
        post = {"fit excess": f"{np.mean(out['excess']):.4f}"} if out["excess"] else {}
        if np.isfinite(out["heldout"]):
            post["held-out excess"] = f"{out['heldout']:.4f}"
        bar.set_postfix(post)
        # without a terminal (a log file) there is no bar: a line every tenth of the training instead
        tenth = max(1, cfg["steps"] // 10)
        level = logging.INFO if bar.disable and (b // tenth > a // tenth or b == cfg["steps"]) else logging.DEBUG
        words = ", ".join(f"{k} {v}" for k, v in post.items()) or "no step run"
        log.log(level, "train_flow: step %d of %d, %s", b, cfg["steps"], words)
        if stopped:
            log.info("train_flow: no better held-out score for %d tasks; stopping at step %d", cfg["patience"], b)
    bar.close()
    src = atlas.root[ckpt]
    prefix = "best_" if val is not None else ""
    for d in DIRECTIONS:
        write_state(group.require_group(d), read_state(src[prefix + d]))
    n_run = int(src.attrs["steps_done"])
    loss = np.asarray(src["loss"][:n_run]) if "loss" in src else np.zeros(0, np.float32)
    excess = np.asarray(src["excess"][:n_run]) if "excess" in src else np.zeros(0, np.float32)
    arrays.write_small(group, "loss", loss, ("step",))
    arrays.write_small(group, "excess", excess, ("step",))
    arrays.write_small(group, "sections", sec.astype(np.int32), ("flow_section",))
    n_features = int(atlas.root["pca/pcs"].shape[1])
    group.attrs.update(
        {
            "model": {"n_features": n_features, "hidden": cfg["hidden"], "k": cfg["k"]},
            "dz_um": cfg["dz_um"],
            "subsample": cfg["subsample"],
        }
    )
    tenth = max(1, len(loss) // 10)
    mean = lambda a: float(np.nanmean(a)) if len(a) and np.isfinite(a).any() else float("nan")  # noqa: E731
    # each step samples one gap, and gaps differ in loss: compare means over the first and last tenth
    record = {
        "steps_run": n_run,
        "first_loss": mean(loss[:tenth]),
        "final_loss": mean(loss[-tenth:]),
        "first_excess": mean(excess[:tenth]),
        "final_excess": mean(excess[-tenth:]),
        "trained": bool(n_run > 0),
        "dz_um": cfg["dz_um"],
    }
    if val is not None:
        heldout = np.asarray(src["heldout"][: -(-n_run // cfg["steps_per_task"])]) if "heldout" in src else []
        arrays.write_small(group, "heldout", np.asarray(heldout, np.float32), ("task",))
        ids = atlas.sections.id.to_numpy()
        untrained, best = float(src.attrs["untrained"]), float(src.attrs["best"])
        record.update(
            {
                "heldout_section": str(ids[val[0]]),
                "heldout_floor": float(src.attrs["floor"]),
                "heldout_untrained": untrained,
                "heldout_trained": best,
                "heldout_gain": untrained - best if np.isfinite(untrained) else float("nan"),
                # standard error over the map's bins of the last accepted state's gain over its incumbent
                "heldout_gain_se": float(src.attrs.get("best_gain_se", float("nan"))),
                "best_step": int(src.attrs["best_step"]),
                "stopped_early": bool(src.attrs.get("stopped", False)) and n_run < cfg["steps"],
                "trained": int(src.attrs["best_step"]) > 0,
            }
        )
        if not np.isfinite(untrained):
            log.warning(
                "train_flow: held-out section %s shares no map bin with its neighbours %s and %s in the atlas frame: "
                "the sections look unaligned (run lamina.align, or check the coordinates given to mark_aligned); "
                "the flow cannot be checked and the untrained flow is kept",
                record["heldout_section"],
                ids[val[1]],
                ids[val[2]],
            )
        elif not record["trained"] and n_run > 0:
            log.warning(
                "train_flow: after %d steps the flow does not predict held-out section %s better than the untrained "
                "flow (excess over the noise floor %.4g vs %.4g); the untrained flow is kept, so interpolate blends "
                "the two sides of each gap by distance. validate=false keeps the trained flow regardless",
                n_run,
                record["heldout_section"],
                best,
                untrained,
            )
    group.attrs["training"] = record

    def drop_checkpoint():
        if ckpt in atlas.root:
            del atlas.root[ckpt]

    ctx.after_commit.append(drop_checkpoint)
    return record


STAGE = Stage(
    name="train_flow",
    output="flow",
    inputs=("warp", "pca"),
    options=TrainFlowOptions,
    version=3,
    summary="Forward and backward graph-SDE flows along z, trained on consecutive aligned sections.",
    build=_build,
    element="lamina.flow",
    pipeline="reconstruct",
    check=_check,
    prepare=_prepare,
)
train_flow = STAGE.function


def load_models(root: zarr.Group, flow: str = "flow") -> dict:
    """The trained forward/backward models of a complete ``/flow`` group, rebuilt from their arrays."""
    from ..kernels.sde import FlowModel
    from ..store.tensors import read_state

    if flow not in root or not root[flow].attrs.get("complete"):
        raise MissingInputError("the atlas has no complete /flow; run lamina.train_flow(atlas) first")
    g = root[flow]
    m = dict(g.attrs["model"])
    models = {}
    for d in DIRECTIONS:
        model = FlowModel(m["n_features"], m["hidden"], m["k"])
        model.load_state_dict(read_state(g[d]))
        model.eval()
        models[d] = model
    return models

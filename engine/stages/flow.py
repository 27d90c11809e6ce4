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
interrupted training resumes from the last finished task; the driver shows a progress bar with the loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TrainFlowOptions(Options):
    dz_um: float = option(10.0, "Euler step of the flow along z (um); also the layer spacing of interpolate", gt=0)
    k: int = option(10, "neighbours of each cell in the flow's kNN graph", ge=1)
    hidden: int = option(64, "width of the drift networks", ge=1)
    subsample: int = option(512, "cells per side per training step (the OT loss is O(subsample^2))", ge=1)
    steps: int = option(600, "training steps", ge=1)
    steps_per_task: int = option(25, "steps per Dask task (a checkpoint after each)", ge=1)
    lr: float = option(2e-3, "Adam learning rate", gt=0)
    eps: float = option(0.01, "Sinkhorn blur (normalised units squared)", gt=0)
    expression_weight: float = option(0.3, "weight of expression against position in the OT cost", ge=0)
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


def build_models(cfg: dict, n_features: int) -> dict:
    from ..kernels.sde import FlowModel

    return {d: FlowModel(n_features, cfg["hidden"], cfg["k"]) for d in DIRECTIONS}


def _train_block(store: str, ckpt: str, cfg: dict, sec: list[int], a: int, b: int) -> list[float]:
    """Train steps ``[a, b)`` from the checkpoint (or from scratch when ``a == 0``) and checkpoint again."""
    import torch

    from ..kernels.sde import flow_loss
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
    gen = torch.Generator(device=dev).manual_seed(int(cfg["seed"]) * 1_000_003 + a)
    losses = []
    m_sub = cfg["subsample"]
    for _step in range(a, b):
        g = int(rng.integers(0, len(sec) - 1))
        lo, hi = int(sec[g]), int(sec[g + 1])

        def draw(s):
            xy, h = pools[s]
            idx = rng.choice(len(xy), size=min(m_sub, len(xy)), replace=False)
            return torch.from_numpy(xy[idx]).to(dev), torch.from_numpy(h[idx]).to(dev)

        (p0, h0), (p1, h1) = draw(lo), draw(hi)
        kw = dict(
            dz_um=cfg["dz_um"],
            expression_weight=cfg["expression_weight"],
            eps=cfg["eps"],
            action_weight=cfg["action_weight"],
            noise_pos=cfg["noise_pos"],
            noise_expr=cfg["noise_expr"],
            generator=gen,
        )
        loss = flow_loss(models["forward"], p0, h0, z[lo], z[hi], p1, h1, **kw) + flow_loss(
            models["backward"], p1, h1, z[hi], z[lo], p0, h0, **kw
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    for d, m in models.items():
        write_state(group.require_group(d), m.state_dict())
    write_state(group.require_group("optimizer"), optimizer_state(opt))
    if "loss" not in group:
        arrays.create(group, "loss", (cfg["steps"],), np.float32, (cfg["steps"],), ("step",), fill_value=np.nan)
    group["loss"][a:b] = np.asarray(losses, np.float32)
    group.attrs["steps_done"] = int(b)  # written last: the checkpoint is valid up to here
    return losses


def _check(atlas: Atlas, opts: TrainFlowOptions) -> None:
    flow_sections(atlas, opts.sections)


def _prepare(atlas: Atlas, opts: TrainFlowOptions) -> dict:
    return {"flow_sections": flow_sections(atlas, opts.sections).tolist()}


def _build(ctx: StageContext) -> dict:
    """Train the forward and backward graph-SDE flows on consecutive aligned sections -> ``/flow``."""
    from tqdm.auto import tqdm

    from ..store.tensors import read_state, write_state

    atlas, group = ctx.atlas, ctx.group
    cfg = ctx.options.to_dict()
    sec = np.asarray(ctx.prepared["flow_sections"])
    records = atlas.stage_records()
    ckpt = (
        f"{SCRATCH}/ckpt-train_flow-"
        + params_hash({**cfg, "sections": sec.tolist()}, records["warp"]["hash"], records["pca"]["hash"])[:16]
    )
    done = int(atlas.root[ckpt].attrs.get("steps_done", 0)) if ckpt in atlas.root else 0
    if done:
        log.info("train_flow: resuming from step %d of %d (checkpoint %s)", done, cfg["steps"], ckpt)
    bar = tqdm(total=cfg["steps"], initial=done, desc="train_flow", unit="step", disable=None)
    for a in range(done, cfg["steps"], cfg["steps_per_task"]):
        b = min(cfg["steps"], a + cfg["steps_per_task"])
        (losses,) = ctx.compute(dask.delayed(_train_block, pure=False)(atlas.path, ckpt, cfg, sec.tolist(), a, b))
        bar.update(b - a)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        # without a terminal (a log file) there is no bar: a line every tenth of the training instead
        tenth = max(1, cfg["steps"] // 10)
        level = logging.INFO if bar.disable and (b // tenth > a // tenth or b == cfg["steps"]) else logging.DEBUG
        log.log(level, "train_flow: step %d of %d, mean loss %.4f", b, cfg["steps"], float(np.mean(losses)))
    bar.close()
    src = atlas.root[ckpt]
    for d in DIRECTIONS:
        write_state(group.require_group(d), read_state(src[d]))
    loss = np.asarray(src["loss"][...])
    arrays.write_small(group, "loss", loss, ("step",))
    arrays.write_small(group, "sections", sec.astype(np.int32), ("flow_section",))
    n_features = int(atlas.root["pca/pcs"].shape[1])
    group.attrs.update(
        {
            "model": {"n_features": n_features, "hidden": cfg["hidden"], "k": cfg["k"]},
            "dz_um": cfg["dz_um"],
            "subsample": cfg["subsample"],
        }
    )

    def drop_checkpoint():
        if ckpt in atlas.root:
            del atlas.root[ckpt]

    ctx.after_commit.append(drop_checkpoint)
    # each step samples one gap, and gaps differ in loss: compare means over the first and last tenth
    tenth = max(1, len(loss) // 10)
    return {"final_loss": float(np.nanmean(loss[-tenth:])), "first_loss": float(np.nanmean(loss[:tenth]))}


STAGE = Stage(
    name="train_flow",
    output="flow",
    inputs=("warp", "pca"),
    options=TrainFlowOptions,
    version=1,
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

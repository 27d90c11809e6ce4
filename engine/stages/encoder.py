"""Stage ``encoder``: a learned cell embedding trained per atlas -> ``/embeddings/encoder`` ``[cell, dim]``.

A :class:`lamina.kernels.encoder.CellEncoder` maps each cell's niche features (``/embeddings/niche``, which
already summarise its neighbourhood in 2D and across sections) to a unit vector, trained with the pair
objective of :func:`lamina.kernels.encoder.pair_loss`: positives are a random neighbour within
``positive_um`` (the same neighbourhood as the niche: across the adjacent sections when the niche is 3D),
negatives the batch's other positives, except those within ``negative_um`` of the anchor (one positive to
``batch - 1`` negative candidates). Data flow::

    map_neighbourhoods(radius=positive_um): one random partner row per cell -> partner [cell]
    training tasks (each: a pool of anchors and their partners read once, steps_per_task Adam steps,
        checkpoint as Zarr arrays in _tmp/ckpt-encoder-<hash>)  --  resumable, progress bar
    inference: a task per cell chunk of /embeddings/niche -> values (the model rebuilt from its arrays)

``weights_path``: a local ``.safetensors`` or weights-only torch file to start from (``steps=0``: use it as
is). Nothing is downloaded. SpatialFormer's published checkpoints are full pickles, which lamina does not
unpickle (``torch.load(weights_only=True)`` refuses them); convert them to safetensors where you trust them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import numpy as np
import zarr

from ..cluster import task_device
from ..errors import InputError, ensure
from ..hashing import params_hash
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options, option

log = logging.getLogger("lamina")
SCRATCH = "_tmp"


@dataclass(frozen=True)
class EncoderOptions(Options):
    dim: int = option(32, "dimensions of the learned embedding", ge=2)
    hidden: int = option(128, "width of the encoder's hidden layers", ge=4)
    steps: int = option(600, "Adam steps", ge=0)
    batch: int = option(512, "anchor / positive pairs per step", ge=2)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    temperature: float = option(0.5, "InfoNCE temperature", gt=0)
    positive_um: float = option(30.0, "positives: a random neighbour within this distance (um)", gt=0)
    negative_um: float = option(400.0, "batch cells nearer than this to the anchor are not negatives (um)", ge=0)
    pool: int = option(20_000, "anchors each training task reads (its batches are drawn from them)", ge=2)
    steps_per_task: int = option(200, "steps per Dask task (a checkpoint after each)", ge=1)
    weights_path: str | None = option(None, "local .safetensors / weights-only torch file to start from")
    seed: int = option(0, "seed of the partners, pools, batches and initial weights")


def _niche_params(root: zarr.Group) -> dict:
    return dict(root["embeddings/niche"].attrs.get("params", {}))


def _where(atlas: Atlas, opts: EncoderOptions) -> dict:
    p = _niche_params(atlas.root)
    z = bool(p.get("z"))
    return {
        "coords": "aligned" if z else "raw",
        "z_sections": int(p.get("z_sections", 0)) if z else 0,
        "z_scale": 0.0 if z else 1.0,
    }


def partner(nb, seed: int) -> np.ndarray:
    """One neighbour row per core cell ``[m]`` (int64 atlas row), uniform among its neighbours other than
    itself (a hash of the row and ``seed``, so tiles do not matter); -1 for a cell without neighbours."""
    from ..kernels.niche import pair_owner

    owner = np.asarray(nb.core, np.int64)
    counts = np.diff(nb.indptr) - 1
    pair = pair_owner(nb.indptr)
    is_self = nb.indices == owner[pair]
    self_pos = np.zeros(len(owner), np.int64)
    self_pos[pair[is_self]] = np.flatnonzero(is_self) - nb.indptr[:-1][pair[is_self]]
    rows = nb.rows[owner].astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (rows + np.uint64(int(seed) * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
    u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
    k = np.floor(u * np.maximum(counts, 0)).astype(np.int64)
    k = k + (k >= self_pos)
    pos = np.minimum(nb.indptr[:-1] + k, max(len(nb.indices) - 1, 0))
    out = np.full(len(owner), -1, np.int64)
    has = counts > 0
    out[has] = nb.rows[nb.indices[pos[has]]]
    return out


def _coords(root: zarr.Group, rows: np.ndarray, aligned: bool) -> np.ndarray:
    names = ("aligned/x", "aligned/y") if aligned else ("cells/x", "cells/y")
    return np.stack([np.asarray(root[c].oindex[rows], np.float64) for c in names], 1)


def _pool(root: zarr.Group, cfg: dict, rng) -> dict:
    """A pool of anchors with partners: niche values, coordinates and sections of both (sorted reads)."""
    n = int(root["cells/section"].shape[0])
    rows = np.unique(rng.integers(0, n, size=min(n, 2 * cfg["pool"])))
    part = np.asarray(root[cfg["partner"]].oindex[rows])
    keep = part >= 0
    rows, part = rows[keep][: cfg["pool"]], part[keep][: cfg["pool"]]
    if len(rows) < 2:
        raise InputError(
            f"encoder: fewer than 2 cells of {cfg['store']} have a neighbour within positive_um="
            f"{cfg['positive_um']} um; raise positive_um"
        )
    uniq, inv = np.unique(part, return_inverse=True)
    niche = root["embeddings/niche/values"]
    aligned = cfg["aligned"]
    sec = root["cells/section"]
    return {
        "xa": np.asarray(niche.oindex[rows, :], np.float32),
        "xp": np.asarray(niche.oindex[uniq, :], np.float32)[inv],
        "ca": _coords(root, rows, aligned),
        "cp": _coords(root, uniq, aligned)[inv],
        "sa": np.asarray(sec.oindex[rows], np.int64),
        "sp": np.asarray(sec.oindex[uniq], np.int64)[inv],
    }


def _model(cfg: dict):
    from ..kernels.encoder import CellEncoder

    return CellEncoder(cfg["n_in"], cfg["hidden"], cfg["dim"])


def _train_block(store: str, ckpt: str, cfg: dict, a: int, b: int) -> list[float]:
    """Steps ``[a, b)`` from the checkpoint (or the start when ``a == 0``), then checkpoint again."""
    import torch

    from ..kernels.encoder import load_weights, pair_loss
    from ..store.tensors import load_optimizer_state, optimizer_state, read_state, write_state

    root = open_root(store, "r+")
    rng = np.random.default_rng([cfg["seed"], a])
    torch.manual_seed(cfg["seed"] * 1_000_003 + a)
    dev = task_device()
    model = _model(cfg)
    group = root.require_group(ckpt)
    if a == 0:
        if cfg["weights_path"]:
            try:
                model.load_state_dict(load_weights(cfg["weights_path"]))
            except (ValueError, RuntimeError, OSError) as exc:
                raise InputError(
                    f"encoder: weights_path {cfg['weights_path']!r} does not fit a CellEncoder(n_in="
                    f"{cfg['n_in']}, hidden={cfg['hidden']}, dim={cfg['dim']}): {exc}"
                ) from exc
        else:
            model.set_normalisation(cfg["mean"], cfg["std"])
    else:
        model.load_state_dict(read_state(group["model"]))
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    if a > 0:
        load_optimizer_state(opt, read_state(group["optimizer"]))
    pool = _pool(root, cfg, rng)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in pool.items()}
    losses = []
    B = min(cfg["batch"], len(pool["xa"]))
    for _ in range(a, b):
        idx = torch.from_numpy(rng.choice(len(pool["xa"]), size=B, replace=False)).to(dev)
        ca, cp = tensors["ca"][idx], tensors["cp"][idx]
        close = torch.cdist(ca, cp) < cfg["negative_um"]
        near = close & ((tensors["sa"][idx][:, None] - tensors["sp"][idx][None, :]).abs() <= cfg["z_sections"])
        loss = pair_loss(model(tensors["xa"][idx]), model(tensors["xp"][idx]), near, cfg["temperature"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    write_state(group.require_group("model"), model.state_dict())
    write_state(group.require_group("optimizer"), optimizer_state(opt))
    if "loss" not in group:
        arrays.create(
            group, "loss", (max(cfg["steps"], 1),), np.float32, (max(cfg["steps"], 1),), ("step",), fill_value=np.nan
        )
    group["loss"][a:b] = np.asarray(losses, np.float32)
    group.attrs["steps_done"] = int(b)  # written last: the checkpoint is valid up to here
    return losses


def _infer_chunk(store: str, model_group: str, cfg: dict, target: str, a: int, b: int) -> int:
    import torch

    from ..store.tensors import read_state

    root = open_root(store, "r+")
    model = _model(cfg)
    model.load_state_dict(read_state(root[model_group]))
    dev = task_device()
    model = model.to(dev).eval()
    x = torch.from_numpy(np.asarray(root["embeddings/niche/values"][a:b], np.float32)).to(dev)
    with torch.no_grad():
        root[target][a:b] = model(x).cpu().numpy()
    return b - a


def _normalisation(atlas: Atlas, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = arrays.sample_rows(atlas.root["embeddings/niche/values"], 50_000, seed)
    return x.mean(0), x.std(0)


def _build(ctx: StageContext) -> dict:
    from tqdm.auto import tqdm

    from ..maps import map_neighbourhoods
    from ..store.elements import EmbeddingsV1
    from ..store.tensors import read_state, write_state

    atlas, opts, group = ctx.atlas, ctx.options, ctx.group
    n, chunk = atlas.n_cells, atlas.cell_chunk
    where = _where(atlas, opts)
    arrays.create(group, "partner", (n,), np.int64, (chunk,), ("cell",))
    map_neighbourhoods(
        partner,
        atlas,
        f"{group.path}/partner",
        radius=opts.positive_um,
        kwargs={"seed": opts.seed},
        client=ctx.client,
        label="encoder: partners",
        **where,
    )
    has = int(ctx.compute(atlas._lazy(f"{group.path}/partner").__ge__(0).sum())[0])
    if has < 2:
        raise InputError(
            f"encoder: only {has} cell(s) of {atlas.path} have a neighbour within positive_um={opts.positive_um} um; "
            f"raise positive_um (cells are {atlas.n_cells:,})"
        )
    mean, std = _normalisation(atlas, opts.seed)
    cfg = {
        **opts.to_dict(),
        "store": atlas.path,
        "partner": f"{group.path}/partner",
        "n_in": int(atlas.root["embeddings/niche/values"].shape[1]),
        "aligned": where["coords"] == "aligned",
        "z_sections": where["z_sections"],
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    records = atlas.stage_records()
    ckpt = f"{SCRATCH}/ckpt-encoder-" + params_hash(opts.to_dict(), records["niche"]["hash"])[:16]
    done = int(atlas.root[ckpt].attrs.get("steps_done", 0)) if ckpt in atlas.root else 0
    if done:
        log.info("encoder: resuming from step %d of %d (checkpoint %s)", done, opts.steps, ckpt)
    bar = tqdm(total=opts.steps, initial=done, desc="encoder", unit="step", disable=None)
    starts = list(range(done, opts.steps, opts.steps_per_task)) or ([0] if done == 0 else [])
    for a in starts:
        b = min(opts.steps, a + opts.steps_per_task)
        (losses,) = ctx.compute(dask.delayed(_train_block, pure=False)(atlas.path, ckpt, cfg, a, b))
        bar.update(b - a)
        if losses:
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            log.debug("encoder: step %d of %d, mean loss %.4f", b, opts.steps, float(np.mean(losses)))
    bar.close()
    src = atlas.root[ckpt]
    write_state(group.require_group("model"), read_state(src["model"]))
    loss = np.asarray(src["loss"][...])[: opts.steps]
    arrays.write_small(group, "loss", loss.astype(np.float32), ("step",))
    arrays.create(group, "values", (n, opts.dim), np.float32, (chunk, opts.dim), ("cell", "dim"))
    tasks = [
        dask.delayed(_infer_chunk, pure=False)(
            atlas.path, f"{group.path}/model", cfg, f"{group.path}/values", a, min(n, a + chunk)
        )
        for a in range(0, n, chunk)
    ]
    ensure(sum(ctx.compute(*tasks)) == n, "encoder: inference did not write every cell")
    group.attrs.update(
        {
            "stage": "encoder",
            "inputs": ["niche"],
            "params": opts.to_dict(),
            "model": {"n_in": cfg["n_in"], "hidden": opts.hidden, "dim": opts.dim},
            "dim_names": [f"encoder_{i}" for i in range(opts.dim)],
        }
    )
    EmbeddingsV1.stamp(atlas.root.require_group("embeddings"))

    def drop_checkpoint():
        if ckpt in atlas.root:
            del atlas.root[ckpt]

    ctx.after_commit.append(drop_checkpoint)
    tenth = max(1, len(loss) // 10)
    finite = loss[np.isfinite(loss)]
    return {
        "first_loss": float(np.mean(finite[:tenth])) if len(finite) else float("nan"),
        "final_loss": float(np.mean(finite[-tenth:])) if len(finite) else float("nan"),
        "cells_with_partner": has,
    }


def _check(atlas: Atlas, opts: EncoderOptions) -> None:
    if opts.weights_path is not None:
        import os

        if not os.path.isfile(opts.weights_path):
            raise InputError(
                f"encoder: weights_path {opts.weights_path!r} is not a file; give a local .safetensors or "
                f"weights-only torch file (nothing is downloaded), or leave it out to train from scratch"
            )
    elif opts.steps == 0:
        raise InputError("encoder: steps=0 needs weights_path (an untrained encoder embeds nothing useful)")


def load_encoder(root: zarr.Group, key: str = "embeddings/encoder"):
    """The trained encoder of a complete ``/embeddings/encoder``, rebuilt from its arrays (eval mode)."""
    from ..kernels.encoder import CellEncoder
    from ..store.tensors import read_state

    g = root[key]
    m = dict(g.attrs["model"])
    model = CellEncoder(m["n_in"], m["hidden"], m["dim"])
    model.load_state_dict(read_state(g["model"]))
    return model.eval()


STAGE = Stage(
    name="encoder",
    output="embeddings/encoder",
    inputs=("niche",),
    options=EncoderOptions,
    version=1,
    summary="A learned cell embedding: an MLP over the niche features trained with a neighbour pair objective.",
    build=_build,
    element="lamina.embedding",
    pipeline="embed",
    check=_check,
)
encoder = STAGE.function

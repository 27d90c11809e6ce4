"""Stage ``invert``: ``/volume`` (mean PCs per voxel) -> ``/expression`` (genes per voxel).

Each volume chunk is mapped back to genes, one block matmul per gene chunk (``kernels.pca.invert_volume``:
``components^T . pcs * scale + mean``), written gene-chunked. An expression volume whose uncompressed size
would not fit on the store's disk is refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np

from ..kernels.pca import invert_volume
from ..store import arrays
from ..store.arrays import open_root
from ..store.atlas import Atlas
from .contract import Stage, StageContext
from .options import Options
from .pca import read_pca
from .voxelize import CHUNK_BYTES


@dataclass(frozen=True)
class InvertOptions(Options):
    """``invert`` has no options: every gene of the atlas is recovered."""


def _invert_chunk(store: str, target: str, zc: int, yc: int, cz: int, ty: int, gene_chunk: int) -> int:
    root = open_root(store, "r+")
    vol = root["volume/pcs"]
    Z, Y = vol.shape[1:3]
    zs, ys = slice(zc * cz, min(Z, (zc + 1) * cz)), slice(yc * ty, min(Y, (yc + 1) * ty))
    block = np.asarray(vol[:, zs, ys, :])
    pca = read_pca(root)
    out = root[f"{target}/values"]
    G = out.shape[0]
    for g0 in range(0, G, gene_chunk):
        gs = slice(g0, min(G, g0 + gene_chunk))
        out[gs, zs, ys, :] = invert_volume(block, pca["mean"][gs], pca["scale"][gs], pca["components"][:, gs])
    return int(block[0].size) if len(block) else 0


def _prepare(atlas: Atlas, opts: InvertOptions) -> dict:
    return {"genes": atlas.n_genes}


def _build(ctx: StageContext) -> dict:
    """Gene expression per voxel ``[gene, z, y, x]`` from ``/volume`` -> ``/expression`` (NaN in empty voxels)."""
    atlas, group = ctx.atlas, ctx.group
    vol = atlas.root["volume"]
    P, Z, Y, X = vol["pcs"].shape
    G = atlas.n_genes
    cz, ty = (int(c) for c in vol.attrs["chunks"])
    gene_chunk = int(np.clip(CHUNK_BYTES // (4 * cz * ty * X), 1, G))
    atlas.check_disk(
        G * Z * Y * X * 4,
        f"the expression volume ({G} genes x {Z}x{Y}x{X} voxels)",
        "invert fewer genes, or voxelize with a larger voxel_um",
    )
    attrs = {k: vol.attrs[k] for k in ("voxel_um", "origin", "units")}
    arrays.create(
        group,
        "values",
        (G, Z, Y, X),
        np.float32,
        (gene_chunk, cz, ty, X),
        ("gene", "z", "y", "x"),
        attrs,
        fill_value=np.nan,
    )
    arrays.write_small(group, "gene", atlas.genes.to_numpy().astype(str), ("gene",))
    group.attrs.update(attrs)
    tasks = [
        dask.delayed(_invert_chunk, pure=False)(atlas.path, group.path, zc, yc, cz, ty, gene_chunk)
        for zc in range(-(-Z // cz))
        for yc in range(-(-Y // ty))
    ]
    voxels = sum(ctx.compute(*tasks))
    return {"genes": G, "voxels": int(voxels), "gene_chunk": gene_chunk}


STAGE = Stage(
    name="invert",
    output="expression",
    inputs=("voxelize",),
    options=InvertOptions,
    version=1,
    summary="Principal components per voxel back to genes: ``/expression`` [gene, z, y, x].",
    build=_build,
    element="lamina.expression-volume",
    pipeline="reconstruct",
    prepare=_prepare,
)
invert = STAGE.function

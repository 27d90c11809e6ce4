"""SpaHDmap 0.1.7 (Tang et al. 2025) on the hidden-spot task of benchmarks/enhance.py, in its own environment.

    DIR/bin/python benchmarks/enhance_spahdmap.py JOB.npz OUT.npz [--iters PRETRAIN GCN TRAIN] [--scale S] [--rank R]

JOB is the file benchmarks/enhance.py writes for its peers (per section: H&E path, visible spots' pixel positions
(col, row) and log expression, hidden spots' pixel positions; spot radius in px). All sections go into one
``Mapper`` (SpaHDmap's multi-section mode: one model, shared metagenes), fitted on the visible spots only; genes as
given (``select_hvgs=False``, no SVG selection: the benchmark fixes the gene set); the expression is already
log-normalised (SpaHDmap skips its own normalisation when max < 20). A hidden spot's prediction is its own spot
score (``Mapper._calculate_spot_score``: the median of the high-definition embedding over the spot's disk, as
SpaHDmap scores its spots) times the metagenes. Writes the predictions [hidden, gene] per section.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import anndata as ad
import numpy as np
import SpaHDmap as hdmap
import torch


def float32_on_cpu() -> None:
    """SpaHDmap casts its model and the image to float16 for the whole-slide pass (``get_SpaHDmap_score``), which is
    meant for GPUs: on a CPU a float16 convolution is ~65x slower than a float32 one (measured here with torch
    2.13): a run was still on the first of six sections 65 min after its start (in float32 the whole run takes 50).
    On CPU the model stays float32 there and its patches are handed over as float32 (its accumulators stay
    float16, as SpaHDmap has them)."""
    import SpaHDmap.train as spahd_train

    spahd_train.SpaHDmapUnet.half = lambda self: self
    get = spahd_train.HE_Score_Dataset.__getitem__

    def as_float32(self, idx):
        image, score, row, col = get(self, idx)
        return image.float(), score.float(), row, col

    spahd_train.HE_Score_Dataset.__getitem__ = as_float32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("out")
    ap.add_argument("--iters", type=int, nargs=3, default=[5000, 5000, 2000], help="pretrain, GCN, train iterations")
    ap.add_argument("--scale", type=float, default=1.0, help="SpaHDmap's scale_rate (image downsampling)")
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--pseudo", type=int, default=5, help="its ratio_pseudo_spots (pseudo-spots per spot)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        float32_on_cpu()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    job = dict(np.load(args.job, allow_pickle=False))
    ids = [str(s) for s in job["sections"]]
    radius = int(round(float(job["radius_px"])))
    t0 = time.perf_counter()
    sections = []
    for s in ids:
        px = job[f"{s}/visible_px"]
        a = ad.AnnData(job[f"{s}/visible_y"].astype(np.float32))
        a.obs_names = [f"{s}_{i}" for i in range(a.n_obs)]
        a.var_names = [f"g{j:05d}" for j in range(a.n_vars)]  # it sorts the genes of several sections by name
        # integer pixels, 1-based, (x, y): what SpaHDmap reads from Visium (it fails on float positions)
        a.obsm["spatial"] = np.rint(px).astype(np.int64) + 1
        sections.append(
            hdmap.prepare_stdata(
                section_name=s,
                image_path=str(job[f"{s}/image"]),
                adata=a,
                select_hvgs=False,
                scale_rate=args.scale,
                radius=radius,
                swap_coord=True,
                create_mask=True,
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        mapper = hdmap.Mapper(section=sections, results_path=tmp, rank=args.rank, ratio_pseudo_spots=args.pseudo)
        pretrain, gcn, train = args.iters
        # its training keeps the encoder fixed for the first half, then restarts a cosine schedule over what is left:
        # both parts need at least one iteration (a schedule of 0 divides by zero)
        fix = max(1, train // 2)
        train = max(train, fix + 2)
        mapper.args.total_iter_pretrain, mapper.args.total_iter_gcn, mapper.args.total_iter_train = pretrain, gcn, train
        mapper.args.fix_iter_train = fix
        mapper.args.num_workers = 0
        mapper.run_SpaHDmap(save_score=False, save_model=False, load_model=False, visualize=False)
        names = list(mapper.genes)
        order = [names.index(f"g{j:05d}") for j in range(job[f"{ids[0]}/visible_y"].shape[1])]
        metagene = np.asarray(mapper.metagene, np.float64)[order]  # [gene, rank] in the job's gene order
        out = {}
        for s in ids:
            st = mapper.section[s]
            hid = job[f"{s}/hidden_px"].astype(np.float64)
            rc = (np.rint(np.c_[hid[:, 1], hid[:, 0]]) + 1.0) / args.scale - 1.0  # (row, col) as its spot_coord
            rc -= np.array([st.row_range[0], st.col_range[0]])
            spot = mapper._calculate_spot_score(score=st.scores["SpaHDmap"], coords=rc, radius=st.radius)
            out[s] = np.asarray(spot, np.float64) @ metagene.T
    np.savez(args.out, **out)
    print(f"SpaHDmap done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()

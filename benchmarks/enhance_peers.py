"""TESLA (Hu et al. 2023, TESLAforST 1.2.2) on the hidden-spot task of benchmarks/enhance.py, in its own environment.

    DIR/bin/python benchmarks/enhance_peers.py JOB.npz OUT.npz

JOB holds, per section: the H&E path, the visible spots' pixel positions (col, row) and log expression, the
hidden spots' pixel positions. TESLA's own ``imputation`` fills a grid of pseudo-spots every ``res`` pixels inside
the tissue contour (here the spots' bounding box grown by one pitch: its contour detection is not part of the
comparison) from the 10 nearest visible spots in (x, y, colour) space, weights 1 / d^2 (its tutorial's settings:
res 50, s 1, k 2, num_nbs 10). A hidden spot's prediction is the mean of the grid points within its radius
(the nearest one when none). Writes the predictions [hidden, gene] per section.
"""

from __future__ import annotations

import sys
import time

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import TESLA as tesla


def run(job: dict, section: str) -> np.ndarray:
    img = cv2.imread(str(job[f"{section}/image"]))  # what TESLA's tutorial reads (BGR; it averages the channels)
    vis_px, vis_y = job[f"{section}/visible_px"], job[f"{section}/visible_y"]
    hid_px, radius_px, pitch_px = job[f"{section}/hidden_px"], float(job["radius_px"]), float(job["pitch_px"])
    # TESLA's x is the image row, y the column
    obs = pd.DataFrame({"pixel_x": vis_px[:, 1], "pixel_y": vis_px[:, 0]}, index=[f"s{i}" for i in range(len(vis_px))])
    raw = ad.AnnData(vis_y.astype(np.float32), obs=obs)
    raw.var.index = [f"g{j}" for j in range(vis_y.shape[1])]
    both = np.concatenate([vis_px, hid_px])
    c0, r0 = np.maximum(both.min(0) - pitch_px, 0).astype(int)
    c1 = int(min(img.shape[1] - 1, both[:, 0].max() + pitch_px))
    r1 = int(min(img.shape[0] - 1, both[:, 1].max() + pitch_px))
    cnt = np.array([[[c0, r0]], [[c1, r0]], [[c1, r1]], [[c0, r1]]], np.int32)
    out = tesla.imputation(
        img=img, raw=raw, cnt=cnt, genes=list(raw.var.index), shape="None", res=50, s=1, k=2, num_nbs=10
    )
    grid = np.c_[out.obs["y"].to_numpy(), out.obs["x"].to_numpy()].astype(float)  # (col, row)
    X = np.asarray(out.X, np.float64)
    from scipy.spatial import cKDTree

    tree = cKDTree(grid)
    pred = np.empty((len(hid_px), X.shape[1]))
    for i, lists in enumerate(tree.query_ball_point(hid_px, radius_px)):
        pred[i] = X[lists].mean(0) if lists else X[tree.query(hid_px[i])[1]]
    return pred


def main() -> None:
    job = dict(np.load(sys.argv[1], allow_pickle=False))
    out, seconds = {}, {}
    for section in [str(s) for s in job["sections"]]:
        t = time.perf_counter()
        out[section] = run(job, section)
        seconds[section] = time.perf_counter() - t
    np.savez(sys.argv[2], **out)
    print("RESULT " + str(sum(seconds.values())))


if __name__ == "__main__":
    main()

"""Write a table of cells as an instrument's output folder (Xenium, MERSCOPE, CosMx, Visium / Visium HD).

The platform readers are tested against these: the folders follow each vendor's documented layout, with the
parts that trip readers (control probes, out-of-tissue spots, unassigned cell 0, headerless Space Ranger 1
positions, files in different row orders), and the cells are known, so a reader's result can be compared
with the table itself. Counts are rounded to integers, as instruments write them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..ingest.platforms import COSMX_PIXEL_UM, VISIUM_COLUMNS, VISIUM_PITCH_UM, VISIUM_SPOT_UM


def write_tenx_h5(path, X, barcodes, names, feature_types=None) -> None:
    """``X`` ``[barcode, feature]`` as a 10x HDF5 feature-barcode matrix (column-major by barcode)."""
    import h5py
    import scipy.sparse as sp

    csr = sp.csr_matrix(np.asarray(X))
    types = feature_types or ["Gene Expression"] * csr.shape[1]
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = csr.data.astype(np.int32)
        m["indices"] = csr.indices.astype(np.int64)
        m["indptr"] = csr.indptr.astype(np.int64)
        m["shape"] = np.array([csr.shape[1], csr.shape[0]], dtype=np.int64)
        feats = m.create_group("features")
        feats["name"] = np.array(names, dtype="S")
        feats["id"] = np.array([f"ENSG{i:011d}" for i in range(len(names))], dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * len(names), dtype="S")


def _image(extent_px: tuple[int, int], x_px, y_px, seed: int) -> np.ndarray:
    """A uint8 image whose brightness is the local cell density (so it lines up with the cells)."""
    h, w = extent_px
    img, _, _ = np.histogram2d(np.clip(y_px, 0, h - 1), np.clip(x_px, 0, w - 1), bins=(h, w), range=((0, h), (0, w)))
    rng = np.random.default_rng(seed)
    img = np.clip(img * 60 + rng.normal(20, 3, img.shape), 0, 255)
    return img.astype(np.uint8)


def visium_lattice(n: int, width_um: float, height_um: float, seed: int = 0) -> np.ndarray:
    """``n`` distinct spot centres ``[n, 2]`` (x, y um) of a Visium lattice (100 um pitch, hexagonal) inside the
    rectangle; a Visium table written by :func:`write_layout` has exact lattice indices only for such spots."""
    rows = np.arange(1, int(height_um / (VISIUM_PITCH_UM * np.sqrt(3) / 2)))
    cols = np.arange(1, int(width_um / (VISIUM_PITCH_UM / 2)))
    r, c = np.meshgrid(rows, cols, indexing="ij")
    keep = (r % 2) == (c % 2)
    nodes = np.stack([c[keep] * VISIUM_PITCH_UM / 2, r[keep] * VISIUM_PITCH_UM * np.sqrt(3) / 2], 1)
    if n > len(nodes):
        raise ValueError(f"{n} spots do not fit a {width_um} x {height_um} um slide ({len(nodes)} places)")
    return nodes[np.random.default_rng(seed).choice(len(nodes), n, replace=False)]


def write_layout(
    platform: str,
    folder,
    cells: pd.DataFrame,
    genes: list[str],
    *,
    shuffle: bool = False,
    image: bool = True,
    pixel_um: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write ``cells`` (columns x, y in um, ``cell_id``, ``genes``) as ``platform``'s output folder.

    ``shuffle``: the positions file lists the cells in another order than the matrix (readers must join by
    key); ``pixel_um``: the pixel size of the written image (coarse, to keep test folders small). Visium
    cells should lie on :func:`visium_lattice` (the reader takes the slide's scale from the lattice)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(cells)
    counts = np.round(cells[genes].to_numpy(np.float64)).astype(np.int64)
    order = rng.permutation(n) if shuffle else np.arange(n)
    x, y = cells["x"].to_numpy(np.float64), cells["y"].to_numpy(np.float64)
    ids = cells["cell_id"].astype(str).to_numpy()
    if platform == "xenium":
        controls = ["NegControlProbe_00001", "BLANK_0001"]
        X = np.concatenate([counts, rng.integers(0, 2, (n, 2))], 1)
        write_tenx_h5(
            folder / "cell_feature_matrix.h5",
            X,
            ids,
            genes + controls,
            ["Gene Expression"] * len(genes) + ["Negative Control Probe", "Unassigned Codeword"],
        )
        table = pd.DataFrame(
            {
                "cell_id": ids,
                "x_centroid": x,
                "y_centroid": y,
                "transcript_counts": counts.sum(1),
                "control_probe_counts": X[:, -2],
                "cell_area": rng.uniform(20, 80, n),
                "nucleus_area": rng.uniform(5, 20, n),
            }
        ).iloc[order]
        table.to_parquet(folder / "cells.parquet", index=False)
        (folder / "experiment.xenium").write_text(json.dumps({"pixel_size": pixel_um, "run_name": folder.name}))
        if image:
            import tifffile

            shape = (int(y.max() / pixel_um) + 8, int(x.max() / pixel_um) + 8)
            img = _image(shape, x / pixel_um, y / pixel_um, seed).astype(np.uint16) * 16
            tifffile.imwrite(
                folder / "morphology_focus.ome.tif",
                img,
                tile=(128, 128),
                metadata={"axes": "YX", "PhysicalSizeX": pixel_um, "PhysicalSizeY": pixel_um},
            )
    elif platform == "merscope":
        entity = np.array(
            [str(10**20 + 10**12 * seed + 7919 * i) for i in range(n)]
        )  # ids beyond int64, as MERSCOPE writes
        by_gene = pd.DataFrame(counts, columns=genes)
        by_gene.insert(0, "cell", entity)
        by_gene["Blank-0001"] = rng.integers(0, 2, n)
        by_gene.to_csv(folder / "cell_by_gene.csv", index=False)
        meta = pd.DataFrame(
            {"fov": (x // 200).astype(int), "volume": rng.uniform(200, 900, n), "center_x": x, "center_y": y},
            index=pd.Index(entity, name="EntityID"),
        ).iloc[order]
        meta.to_csv(folder / "cell_metadata.csv")
        if image:
            import tifffile

            (folder / "images").mkdir(exist_ok=True)
            offset = np.array([-x.min() + 5, -y.min() + 5]) / pixel_um
            um_to_px = np.array([[1 / pixel_um, 0, offset[0]], [0, 1 / pixel_um, offset[1]], [0, 0, 1]])
            np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", um_to_px, delimiter=" ")
            px = um_to_px @ np.stack([x, y, np.ones(n)])
            shape = (int(px[1].max()) + 8, int(px[0].max()) + 8)
            for z in range(3):
                tifffile.imwrite(folder / "images" / f"mosaic_DAPI_z{z}.tif", _image(shape, px[0], px[1], seed + z))
    elif platform == "cosmx":
        fov = (x // 500).astype(int) + 1
        cell_id = np.zeros(n, dtype=np.int64)
        for f in np.unique(fov):  # cell_ID counts from 1 within each FOV
            cell_id[fov == f] = np.arange(1, int((fov == f).sum()) + 1)
        expr = pd.DataFrame(counts, columns=genes)
        expr.insert(0, "cell_ID", cell_id)
        expr.insert(0, "fov", fov)
        expr["NegPrb1"] = rng.integers(0, 2, n)
        expr["SystemControl1"] = rng.integers(0, 2, n)
        background = expr.groupby("fov", as_index=False).first().assign(cell_ID=0)  # unassigned transcripts
        expr = pd.concat([background, expr], ignore_index=True).sort_values(["fov", "cell_ID"], kind="stable")
        expr.to_csv(folder / "Run1000_S1_exprMat_file.csv.gz", index=False)
        meta = pd.DataFrame(
            {
                "fov": fov,
                "cell_ID": cell_id,
                "Area": rng.integers(1000, 9000, n),
                "CenterX_local_px": (x % 500) / COSMX_PIXEL_UM,
                "CenterY_local_px": y / COSMX_PIXEL_UM,
                "CenterX_global_px": x / COSMX_PIXEL_UM,
                "CenterY_global_px": y / COSMX_PIXEL_UM,
            }
        ).sort_values(["fov", "cell_ID"], kind="stable")
        meta = meta.iloc[rng.permutation(n)] if shuffle else meta
        meta.to_csv(folder / "Run1000_S1_metadata_file.csv.gz", index=False)
    elif platform in ("visium", "visium_hd", "visium_sr1"):
        hd = platform == "visium_hd"
        um_per_px = 0.2737 if hd else 0.5 + 0.1 * seed  # slides scanned at different resolutions
        barcodes = np.array([f"s_008um_{i:05d}_{i % 97:05d}-1" if hd else f"AAAC{i:010d}-1" for i in range(n)])
        out = (folder / "binned_outputs" / "square_008um") if hd else folder
        (out / "spatial").mkdir(parents=True, exist_ok=True)
        write_tenx_h5(out / "filtered_feature_bc_matrix.h5", counts, barcodes, genes)
        n_out = max(3, n // 10)
        pos = pd.DataFrame(
            {
                "barcode": np.concatenate([barcodes, [f"TTTT{i:010d}-1" for i in range(n_out)]]),
                "in_tissue": np.r_[np.ones(n, int), np.zeros(n_out, int)],
                # the spot lattice: an array_col step is half the pitch across, an array_row step sqrt(3)/2 down
                "array_row": np.r_[np.round(y / (VISIUM_PITCH_UM * np.sqrt(3) / 2)).astype(int), np.zeros(n_out, int)],
                "array_col": np.r_[np.round(x / (VISIUM_PITCH_UM / 2)).astype(int), np.zeros(n_out, int)],
                "pxl_row_in_fullres": np.r_[y / um_per_px, np.full(n_out, 1.0)],
                "pxl_col_in_fullres": np.r_[x / um_per_px, np.full(n_out, 1.0)],
            }
        )
        pos = pos.iloc[rng.permutation(len(pos))] if shuffle else pos
        hires = 0.05
        scales = {"tissue_hires_scalef": hires, "tissue_lowres_scalef": hires / 3, "fiducial_diameter_fullres": 300.0}
        if hd:
            scales.update({"microns_per_pixel": um_per_px, "bin_size_um": 8.0, "spot_diameter_fullres": 8 / um_per_px})
            pos.to_parquet(out / "spatial" / "tissue_positions.parquet", index=False)
        elif platform == "visium_sr1":
            scales["spot_diameter_fullres"] = VISIUM_SPOT_UM / um_per_px
            pos[VISIUM_COLUMNS].to_csv(out / "spatial" / "tissue_positions_list.csv", index=False, header=False)
        else:
            scales["spot_diameter_fullres"] = VISIUM_SPOT_UM / um_per_px
            pos.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
        (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(scales))
        if image:
            from PIL import Image

            px_x, px_y = x / um_per_px * hires, y / um_per_px * hires
            shape = (int(px_y.max()) + 8, int(px_x.max()) + 8)
            gray = _image(shape, px_x, px_y, seed)
            Image.fromarray(np.stack([255 - gray, 255 - gray // 2, 255 - gray // 3], -1)).save(
                out / "spatial" / "tissue_hires_image.png"
            )
    else:
        raise ValueError(f"no layout {platform!r}")
    return folder

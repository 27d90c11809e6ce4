"""Instrument output folders as read units: 10x Xenium, Vizgen MERSCOPE, NanoString CosMx, 10x Visium / Visium HD.

One folder is one section. Each layout function finds the files the vendor documents, builds a
:class:`~lamina.ingest.joined.JoinedUnit` (positions + matrix joined by the cell key), the
:class:`~lamina.IngestSpec` options that read it (which columns are x / y, their unit, which metadata to keep)
and, where the folder has one, the section's image with its map to the section's um frame.

=========  ==========================================  ===========================  =======================
platform   positions (key)                             matrix                       image
=========  ==========================================  ===========================  =======================
xenium     cells.parquet | cells.csv.gz (cell_id),     cell_feature_matrix.h5       morphology_focus / mip
           x_centroid, y_centroid in um                (Gene Expression features)   OME-TIFF, pixel_size
merscope   cell_metadata.csv (first column),           cell_by_gene.csv (Blank-*    images/mosaic_DAPI_z*.tif
           center_x, center_y in um                    columns left out)            + micron_to_mosaic
cosmx      *_metadata_file.csv[.gz] (fov, cell_ID),    *_exprMat_file.csv[.gz]      (not read: per-FOV
           CenterX/Y_global_px, 0.12028 um/px          (cell_ID 0 and NegPrb /      images)
                                                       SystemControl left out)
visium     spatial/tissue_positions[_list].csv |       filtered_feature_bc_         spatial/tissue_hires_
           .parquet (barcode; in_tissue == 1),         matrix.h5                    image.png, scalefactors
           pxl_col/row_in_fullres -> um by scalefactors
=========  ==========================================  ===========================  =======================

Visium's full-resolution pixels become um per slide, so slides scanned at different resolutions agree: with
``microns_per_pixel`` (Visium HD), else from the spot lattice (spots 100 um apart, :func:`_grid_scale`).
Visium HD: pass a bin folder (``binned_outputs/square_008um``) or ``outs`` (then the 8 um bins are read).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from .images import ImageSource
from .joined import KEY, JoinedUnit, TableMatrix
from .readers import TableFile
from .tenx import TenxH5Matrix

#: CosMx SMI pixel size (um per pixel of the global coordinates); pass pixel_size= for another instrument
COSMX_PIXEL_UM = 0.12028
#: Visium's spot grid: spots 100 um apart centre to centre on a hexagonal lattice; one array_col step is
#: 50 um across, one array_row step 50 * sqrt(3) um down
VISIUM_PITCH_UM = 100.0
#: Space Ranger's spot_diameter_fullres spans a "theoretical 65 um spot" (10x's definition): the fallback scale
VISIUM_SPOT_UM = 65.0
VISIUM_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@dataclass
class PlatformSection:
    """What a platform folder gives: its read unit, the ingest options that read it, its image (or None)."""

    unit: JoinedUnit
    options: dict
    image: ImageSource | None = None


def _first(folder: Path, names: list[str], what: str, platform: str) -> Path:
    for n in names:
        hits = sorted(folder.glob(n))
        if hits:
            return hits[0]
    raise InputError(
        f"{folder}: no {what} ({' or '.join(names)}); is this a {platform} output folder? Pass the folder the "
        f"instrument wrote (one per section)"
    )


def _optional(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        hits = sorted(folder.glob(n))
        if hits:
            return hits[0]
    return None


def _present(unit: JoinedUnit, wanted: list[str]) -> list[str]:
    have = set(unit.positions.columns())
    return [c for c in wanted if c in have]


def xenium(folder: Path, section: str) -> PlatformSection:
    cells = _first(folder, ["cells.parquet", "cells.csv.gz", "cells.csv"], "cell table", "Xenium")
    matrix_path = _optional(folder, ["cell_feature_matrix.h5"])
    if matrix_path is None:
        zarr_matrix = _optional(folder, ["cell_feature_matrix.zarr.zip", "cell_feature_matrix"])
        hint = (
            f" ({zarr_matrix.name} is there: lamina reads the .h5 the instrument writes beside it)"
            if zarr_matrix
            else ""
        )
        raise InputError(f"{folder}: no cell_feature_matrix.h5{hint}; copy it from the Xenium output folder")
    matrix = TenxH5Matrix(matrix_path)
    unit = JoinedUnit(TableFile(cells, text=["cell_id"]), ["cell_id"], matrix, f"Xenium {folder}", section)
    options = {
        "x": "x_centroid",
        "y": "y_centroid",
        "cell_id": KEY,
        "genes": "rest",
        "units": "um",
        "obs": _present(unit, ["transcript_counts", "cell_area", "nucleus_area", "segmentation_method"]),
    }
    image = _optional(
        folder,
        [
            "morphology_focus/ch0000_dapi.ome.tif",
            "morphology_focus/morphology_focus_0000.ome.tif",
            "morphology_focus.ome.tif",
            "morphology_mip.ome.tif",
            "morphology.ome.tif",
        ],
    )
    size = None
    spec_file = folder / "experiment.xenium"
    if spec_file.is_file():
        try:
            size = float(json.loads(spec_file.read_text())["pixel_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{spec_file}: no readable pixel_size ({exc}); the file looks damaged") from exc
    return PlatformSection(unit, options, ImageSource(image, pixel_size_um=size) if image else None)


def merscope(folder: Path, section: str) -> PlatformSection:
    meta = _first(
        folder, ["cell_metadata.csv", "cell_metadata.csv.gz", "cell_metadata.parquet"], "cell_metadata", "MERSCOPE"
    )
    counts = _first(folder, ["cell_by_gene.csv", "cell_by_gene.csv.gz"], "cell_by_gene table", "MERSCOPE")
    # both files name their first column differently ("EntityID", "cell", or nothing): it is the cell key
    meta_key = TableFile(meta).columns()[0]
    count_key = TableFile(counts).columns()[0]
    matrix = TableMatrix(TableFile(counts, text=[count_key]), [count_key], control=("Blank-",))
    unit = JoinedUnit(TableFile(meta, text=[meta_key]), [meta_key], matrix, f"MERSCOPE {folder}", section)
    options = {
        "x": "center_x",
        "y": "center_y",
        "cell_id": KEY,
        "genes": "rest",
        "units": "um",
        "obs": _present(unit, ["fov", "volume"]),
    }
    image = None
    mosaics = sorted((folder / "images").glob("mosaic_DAPI_z*.tif")) if (folder / "images").is_dir() else []
    transform = folder / "images" / "micron_to_mosaic_pixel_transform.csv"
    if mosaics and transform.is_file():
        try:
            um_to_px = np.loadtxt(transform).reshape(3, 3)
        except ValueError as exc:
            raise InputError(f"{transform}: not a 3x3 matrix ({exc})") from exc
        # the middle of the z planes: the plane the cell boundaries are usually drawn on
        image = ImageSource(mosaics[len(mosaics) // 2], image_to_section=np.linalg.inv(um_to_px).tolist())
    return PlatformSection(unit, options, image)


def cosmx(folder: Path, section: str) -> PlatformSection:
    meta = _first(
        folder, ["*metadata_file.csv.gz", "*metadata_file.csv", "*metadata_file.parquet"], "metadata file", "CosMx"
    )
    counts = _first(
        folder, ["*exprMat_file.csv.gz", "*exprMat_file.csv", "*exprMat_file.parquet"], "exprMat file", "CosMx"
    )
    key = ["fov", "cell_ID"]
    matrix = TableMatrix(
        TableFile(counts, text=key),
        key,
        drop=("cell_ID", "0"),
        control=("NegPrb", "Negative", "SystemControl", "FalseCode"),
    )
    unit = JoinedUnit(TableFile(meta, text=key), key, matrix, f"CosMx {folder}", section)
    options = {
        "x": "CenterX_global_px",
        "y": "CenterY_global_px",
        "cell_id": KEY,
        "genes": "rest",
        "units": "px",
        "pixel_size": COSMX_PIXEL_UM,
        "obs": _present(unit, ["fov", "Area"]),
    }
    return PlatformSection(unit, options, None)


def _visium_folder(folder: Path) -> Path:
    """``outs`` of Visium HD -> its 8 um bins; any other folder as given."""
    binned = folder / "binned_outputs"
    if not (folder / "filtered_feature_bc_matrix.h5").is_file() and binned.is_dir():
        bins = sorted(p.name for p in binned.iterdir() if p.is_dir())
        if "square_008um" not in bins:
            raise InputError(f"{binned}: no square_008um bins; pass one of {bins} as the section folder")
        return binned / "square_008um"
    return folder


def visium(folder: Path, section: str) -> PlatformSection:
    folder = _visium_folder(folder)
    matrix = TenxH5Matrix(_first(folder, ["filtered_feature_bc_matrix.h5"], "filtered matrix", "Space Ranger"))
    spatial = folder / "spatial"
    pos = _first(
        spatial,
        ["tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"],
        "tissue positions",
        "Space Ranger",
    )
    names = VISIUM_COLUMNS if pos.name == "tissue_positions_list.csv" else None  # Space Ranger 1: no header
    scale_file = _first(spatial, ["scalefactors_json.json"], "scale factors", "Space Ranger")
    try:
        scales = json.loads(scale_file.read_text())
        um_per_px = (
            float(scales["microns_per_pixel"])
            if "microns_per_pixel" in scales
            else _grid_scale(TableFile(pos, names=names, text=["barcode"]))
            or VISIUM_SPOT_UM / float(scales["spot_diameter_fullres"])
        )
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise InputError(f"{scale_file}: no spot_diameter_fullres / microns_per_pixel ({exc})") from exc
    if not (np.isfinite(um_per_px) and um_per_px > 0):
        raise InputError(f"{scale_file}: the scale factors give {um_per_px} um per pixel")
    unit = JoinedUnit(
        TableFile(pos, names=names, text=["barcode"]),
        ["barcode"],
        matrix,
        f"Visium {folder}",
        section,
        keep=("in_tissue", 1),
        scale={"x_um": ("pxl_col_in_fullres", um_per_px), "y_um": ("pxl_row_in_fullres", um_per_px)},
    )
    options = {
        "x": "x_um",
        "y": "y_um",
        "cell_id": KEY,
        "genes": "rest",
        "units": "um",
        "obs": ["array_row", "array_col"],
    }
    image = None
    hires = _optional(spatial, ["tissue_hires_image.png"])
    if hires is not None and "tissue_hires_scalef" in scales:
        size = um_per_px / float(scales["tissue_hires_scalef"])
        image = ImageSource(hires, pixel_size_um=size)
    return PlatformSection(unit, options, image)


def _grid_scale(positions: TableFile) -> float | None:
    """um per full-resolution pixel of a Visium slide, from its spot lattice: the least-squares affine from the
    spots' lattice positions in um (array_col * 50, array_row * 50 sqrt(3)) to their pixels, whose scale is
    px per um. None with fewer than 3 in-tissue spots or a degenerate lattice.

    The manufactured 100 um pitch is the slide's one exact length; Space Ranger's spot_diameter_fullres (a
    "theoretical 65 um spot") differs from it by ~7% on the DLPFC slides."""
    import pandas as pd

    cols = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    frames = [raw.frame for raw in positions.chunks(100_000, cols)]  # one slide: <= 4,992 spots
    f = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    f = f[pd.to_numeric(f["in_tissue"], errors="coerce") == 1]
    if len(f) < 3:
        return None
    lattice = np.stack([f.array_col * VISIUM_PITCH_UM / 2, f.array_row * VISIUM_PITCH_UM / 2 * np.sqrt(3)], 1)
    design = np.c_[lattice, np.ones(len(f))].astype(np.float64)
    pixels = f[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    det = abs(np.linalg.det(coef[:2]))
    return float(1.0 / np.sqrt(det)) if np.isfinite(det) and det > 1e-12 else None


PLATFORMS: dict[str, Callable[[Path, str], PlatformSection]] = {
    "xenium": xenium,
    "merscope": merscope,
    "cosmx": cosmx,
    "visium": visium,
    "visium_hd": visium,
}


def section_folders(source) -> dict[str, Path]:
    """Section id -> folder: one folder (its name; ``outs`` is named by its parent), a list of folders, or a
    dict ``{section id: folder}``."""
    if isinstance(source, dict):
        items = [(str(k), Path(v)) for k, v in source.items()]
    elif isinstance(source, (list, tuple)):
        items = [(_name(Path(p)), Path(p)) for p in source]
    elif isinstance(source, (str, Path)):
        items = [(_name(Path(source)), Path(source))]
    else:
        raise InputError(
            f"a platform input is a folder, a list of folders or a dict of them, not {type(source).__name__}"
        )
    if not items:
        raise InputError("no section folders given")
    ids = [k for k, _ in items]
    dup = sorted({k for k in ids if ids.count(k) > 1})
    if dup:
        raise InputError(f"section folders {dup} have the same name; pass a dict {{section id: folder}} to name them")
    for sid, p in items:
        if not p.is_dir():
            raise InputError(
                f"section {sid!r}: {p} is not a folder; a platform input is the instrument's output folder"
            )
    return dict(items)


def _name(p: Path) -> str:
    return p.resolve().parent.name if p.name == "outs" else p.name


def read_platform(platform: str, source) -> list[tuple[str, PlatformSection]]:
    """(section id, :class:`PlatformSection`) per folder of ``source`` read as ``platform``."""
    if platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    return [(sid, PLATFORMS[platform](folder, sid)) for sid, folder in section_folders(source).items()]

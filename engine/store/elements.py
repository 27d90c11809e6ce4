"""Elements of an atlas store: one format class per element and encoding version.

Every group (and the expression matrix ``/X``) records what it is and which encoding wrote it, as anndata
does: attrs ``encoding-type`` (``lamina.deformation``) and ``encoding-version`` (``"1"``). Readers dispatch
on the pair (:func:`element_of`), so the format can evolve element by element: a new encoding gets a new
class, the old class stays to read old stores (spatialdata keeps one format class per element and version
the same way). A format class names the members and attrs its element must hold; :meth:`Element.validate`
checks them, so a stage that forgets one fails before its result is marked complete.

Elements designed for the stages to come (the ``enhance`` and ``embed`` issues):

* ``/images/<section>`` (:class:`ImageV1`): a multiscale pyramid, levels ``0, 1, ...`` each ``[c, y, x]``
  and 2x smaller than the one before, with OME-NGFF-like ``multiscales`` metadata (axes with units, a
  scale per level), the pixel size in um, and the affine from image pixels (col, row) to the section's raw
  um frame. After registration the image is placed in the atlas frame by the section's transforms.
* ``/embeddings/<key>`` (:class:`EmbeddingV1`): ``values [cell, dim]`` chunk-aligned with ``/cells``, with
  its provenance (the stage, the inputs it read, radius / neighbours, model).
"""

from __future__ import annotations

import uuid
from typing import ClassVar, TypeVar, cast

import numpy as np

from ..errors import FormatVersionError, StoreError

TYPE, VERSION = "encoding-type", "encoding-version"


class Element:
    """Base class of the format classes. ``members``: arrays or groups the element holds; ``attrs``: attrs it
    carries; ``dims``: the dimension names of some members (checked when given)."""

    encoding_type: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    members: ClassVar[tuple[str, ...]] = ()
    attrs: ClassVar[tuple[str, ...]] = ()
    dims: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def stamp(cls, node) -> None:
        node.attrs.update({TYPE: cls.encoding_type, VERSION: cls.version})

    @classmethod
    def validate(cls, node, where: str) -> None:
        """Raise :class:`StoreError` naming what ``node`` lacks to be this element."""
        missing = [m for m in cls.members if m not in node]
        missing_attrs = [a for a in cls.attrs if a not in node.attrs]
        if missing or missing_attrs:
            raise StoreError(
                f"{where} is not a complete {cls.encoding_type} element (encoding {cls.version}): "
                f"missing {', '.join(missing + [f'attr {a}' for a in missing_attrs])}; "
                f"re-run the stage that writes it"
            )
        for name, dims in cls.dims.items():
            if name in node:
                found = tuple(getattr(node[name].metadata, "dimension_names", None) or ())
                if found and found != dims:
                    raise StoreError(
                        f"{where}/{name} has dimensions {found}, expected {dims} for {cls.encoding_type} {cls.version}"
                    )


def _element(encoding_type: str, members=(), attrs=(), dims=None, version: str = "1", doc: str = ""):
    cls = type(
        f"{encoding_type.split('.')[-1].title().replace('-', '')}V{version}",
        (Element,),
        {
            "encoding_type": encoding_type,
            "version": version,
            "members": tuple(members),
            "attrs": tuple(attrs),
            "dims": dict(dims or {}),
            "__doc__": doc,
        },
    )
    return cls


CellsV1 = _element("lamina.cells", ("section", "x", "y"), doc="/cells: one 1-D array per column over [cell]")
SectionsV1 = _element("lamina.sections", ("id", "z", "cell_start", "cell_stop"), doc="/sections over [section]")
GenesV1 = _element("lamina.genes", ("name",), doc="/genes/name over [gene]")
MatrixV1 = _element("lamina.matrix", attrs=("normalization",), doc="/X [cell, gene] float32")
QCV1 = _element(
    "lamina.section-stats",
    ("n_cells", "centroid_x", "centroid_y", "xmin", "xmax", "ymin", "ymax"),
    doc="/qc: per-section QC table",
)
RasterV1 = _element(
    "lamina.raster",
    ("cells", "centroid"),
    ("origin", "spacing"),
    {"cells": ("section", "channel", "y", "x")},
    doc="/raster: [section, channel, y, x] images",
)
RasterV2 = _element(
    "lamina.raster",
    ("cells", "half", "centroid"),
    ("origin", "spacing"),
    {"cells": ("section", "channel", "y", "x"), "half": ("section", "channel", "y", "x")},
    version="2",
    doc="/raster: [section, channel, y, x] images of all cells and of the check half of them",
)
TransformsV1 = _element("lamina.transforms", ("affine", "pairs"), doc="/transforms: affine stage + pair QC")
DeformationV1 = _element(
    "lamina.deformation",
    ("affine", "displacement", "inverse", "sections"),
    ("origin", "spacing"),
    {"displacement": ("section", "xy", "y", "x")},
    doc="/deformation: affine + displacement grids",
)
DeformationV2 = _element(
    "lamina.deformation",
    ("affine", "displacement", "inverse", "sections"),
    ("origin", "spacing"),
    {"displacement": ("section", "xy", "y", "x"), "sections/refined": ("section",)},
    version="2",
    doc="/deformation: affine + displacement grids; sections/ holds per section the held-out checks, the "
    "Jacobian range, whether the warp was kept and (attr reasons) why not",
)
AlignedV1 = _element("lamina.aligned", ("x", "y", "z"), doc="/aligned: atlas-frame x, y, z [cell]")
PCAV1 = _element(
    "lamina.pca",
    ("components", "mean", "scale", "explained_variance", "pcs"),
    dims={"pcs": ("cell", "pc")},
    doc="/pca: components, mean, scale, per-cell PCs",
)
FlowV1 = _element(
    "lamina.flow",
    ("forward", "backward", "loss", "sections"),
    ("model",),
    doc="/flow: the graph-SDE models' state_dicts as arrays",
)
InterpolatedV1 = _element(
    "lamina.interpolated",
    ("x", "y", "z", "weight", "gap", "direction", "pcs"),
    doc="/interpolated: generated cell layers",
)
VolumeV1 = _element(
    "lamina.volume",
    ("pcs", "density"),
    ("voxel_um", "origin"),
    {"pcs": ("pc", "z", "y", "x")},
    doc="/volume: mean PCs and density per voxel",
)
ExpressionVolumeV1 = _element(
    "lamina.expression-volume",
    ("values", "gene"),
    ("voxel_um", "origin"),
    {"values": ("gene", "z", "y", "x")},
    doc="/expression: genes per voxel",
)
ImagesV1 = _element("lamina.images", doc="/images: one ImageV1 per section, named by the section id")
EmbeddingsV1 = _element("lamina.embeddings", doc="/embeddings: one EmbeddingV1 per key")
HistologyV1 = _element(
    "lamina.histology",
    ("cells", "feature_mean", "feature_scale"),
    ("sections", "spot_diameter_um", "spot_pitch_um", "feature_names"),
    {"cells/features": ("cell", "feature")},
    doc="/histology: cells/features [cell, feature] (each spot's footprint mean; NaN outside the sections read) and "
    "one HistologySectionV1 per section with an image",
)
HistologySectionV1 = _element(
    "lamina.histology-section",
    ("features",),
    ("section", "superpixel_um", "grid_to_section", "image_level", "pixels_per_superpixel", "spot_radius_um"),
    {"features": ("feature", "y", "x")},
    doc="/histology/<section>: features [feature, y, x] on the superpixel grid (grid_to_section: 3x3 from "
    "(col, row, 1) to the section's raw um)",
)
EnhanceV1 = _element(
    "lamina.enhance",
    ("model", "cells"),
    ("sections", "spot_diameter_um", "spot_pitch_um", "residual_sigma_um", "rank"),
    {"cells/scores": ("cell", "metagene"), "model/loadings": ("metagene", "gene")},
    doc="/enhance: model/ (NMF loadings [metagene, gene], the image head), cells/scores [cell, metagene] and one "
    "EnhanceSectionV1 per enhanced section",
)
EnhanceSectionV1 = _element(
    "lamina.enhance-section",
    ("embedding",),
    ("section", "superpixel_um", "grid_to_section"),
    {"embedding": ("metagene", "y", "x"), "genes": ("gene", "y", "x")},
    doc="/enhance/<section>: embedding [metagene, y, x] on the superpixel grid (grid_to_section: 3x3 from "
    "(col, row, 1) to the section's raw um), optional gene maps genes [gene, y, x] with their names in gene",
)


class ImageV1(Element):
    """``/images/<section>``: levels ``"0", "1", ...`` each ``[c, y, x]``, level k 2^k times coarser.

    Attrs: ``multiscales`` (OME-NGFF 0.4-like: axes c/y/x with units, one dataset per level with its scale
    in um), ``pixel_size_um`` (level 0), ``image_to_section`` (3x3: level-0 pixel (col, row, 1) -> the
    section's raw (x, y, 1) um), ``section`` (id), ``source`` (the file it came from).
    """

    encoding_type = "lamina.image"
    version = "1"
    members = ("0",)
    attrs = ("multiscales", "pixel_size_um", "image_to_section", "section")
    dims = {"0": ("c", "y", "x")}

    @staticmethod
    def multiscales(n_levels: int, pixel_size_um: float, name: str) -> list[dict]:
        return [
            {
                "version": "0.4",
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": str(k),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, pixel_size_um * 2**k, pixel_size_um * 2**k]}
                        ],
                    }
                    for k in range(n_levels)
                ],
            }
        ]

    @classmethod
    def write(
        cls,
        parent,
        section: str,
        image,
        pixel_size_um: float,
        image_to_section,
        source: str = "",
        chunk: int = 2048,
        min_size: int = 256,
    ) -> None:
        """Write ``image`` (``[c, y, x]`` or ``[y, x]``; NumPy or dask) as ``parent/<section>``: level 0 as
        given, then 2x2 means down to ``min_size`` px, each level written chunk-aligned (``chunk`` px)."""
        import dask.array as da

        from . import arrays

        if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise StoreError(
                f"image of section {section!r}: pixel size must be a positive number of um, got {pixel_size_um!r}"
            )
        affine = np.asarray(image_to_section, np.float64)
        if affine.shape != (3, 3) or not np.all(np.isfinite(affine)):
            raise StoreError(f"image of section {section!r}: image_to_section must be a finite 3x3 affine")
        level = da.asarray(image)
        if level.ndim == 2:
            level = level[None]
        group = parent.create_group(section, overwrite=True)
        k = 0
        while True:
            c, h, w = level.shape
            level = level.rechunk((c, min(chunk, h), min(chunk, w)))
            target = arrays.create(
                group, str(k), level.shape, level.dtype, (c, min(chunk, h), min(chunk, w)), ("c", "y", "x")
            )
            # dask chunks == zarr chunks: no two tasks share a chunk
            da.store(level, target, lock=False)  # type: ignore[arg-type]  # a zarr.Array is a valid target
            if min(h, w) // 2 < min_size:
                break
            level = da.coarsen(
                np.mean, da.from_zarr(target)[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32), {1: 2, 2: 2}
            ).astype(target.dtype)
            k += 1
        group.attrs.update(
            {
                "multiscales": cls.multiscales(k + 1, float(pixel_size_um), section),
                "pixel_size_um": float(pixel_size_um),
                "image_to_section": affine.tolist(),
                "section": section,
                "source": str(source),
                "written": uuid.uuid4().hex,  # identifies this copy: stages that read the image hash it
            }
        )
        cls.stamp(group)

    @staticmethod
    def levels(group) -> list:
        """The pyramid as lazy dask arrays ``[c, y, x]``, finest first."""
        import dask.array as da

        out, k = [], 0
        while str(k) in group:
            out.append(da.from_zarr(group[str(k)], chunks=group[str(k)].chunks))
            k += 1
        return out

    @staticmethod
    def pixel_to_section(group, level: int = 0) -> np.ndarray:
        """3x3 map from pixel (col, row) of ``level`` to the section's raw um."""
        s = 2.0**level
        return np.asarray(group.attrs["image_to_section"], np.float64) @ np.diag([s, s, 1.0])


class EmbeddingV1(Element):
    """``/embeddings/<key>``: ``values [cell, dim]`` float32, rows = /cells rows, chunked like /cells.

    Attrs: ``stage`` (what wrote it), ``inputs`` (the stages / arrays it read), ``params`` (radius, k,
    model, ...); optional ``dim_names``."""

    encoding_type = "lamina.embedding"
    version = "1"
    members = ("values",)
    attrs = ("stage", "inputs", "params")
    dims = {"values": ("cell", "dim")}

    @classmethod
    def create(cls, parent, key: str, n_cells: int, dim: int, cell_chunk: int, stage: str, inputs, params: dict):
        """An empty embedding ``parent/<key>`` whose rows tasks fill chunk by chunk; returns the values array."""
        from . import arrays

        group = parent.create_group(key, overwrite=True)
        values = arrays.create(group, "values", (n_cells, dim), np.float32, (cell_chunk, dim), ("cell", "dim"))
        group.attrs.update({"stage": stage, "inputs": list(inputs), "params": params})
        cls.stamp(group)
        return values

    @staticmethod
    def values(group):
        import dask.array as da

        return da.from_zarr(group["values"], chunks=group["values"].chunks)


#: (encoding type, version) -> format class
ELEMENTS: dict[tuple[str, str], type[Element]] = {
    (c.encoding_type, c.version): c
    for c in (
        CellsV1,
        SectionsV1,
        GenesV1,
        MatrixV1,
        QCV1,
        RasterV1,
        RasterV2,
        TransformsV1,
        DeformationV1,
        DeformationV2,
        AlignedV1,
        PCAV1,
        FlowV1,
        InterpolatedV1,
        VolumeV1,
        ExpressionVolumeV1,
        ImagesV1,
        ImageV1,
        EmbeddingsV1,
        EmbeddingV1,
        HistologyV1,
        HistologySectionV1,
        EnhanceV1,
        EnhanceSectionV1,
    )
}
#: the current encoding of each element type
CURRENT: dict[str, type[Element]] = {}
for _cls in ELEMENTS.values():
    if _cls.encoding_type not in CURRENT or int(_cls.version) > int(CURRENT[_cls.encoding_type].version):
        CURRENT[_cls.encoding_type] = _cls
#: where each element lives in a format-1 store (which wrote no encoding attrs): what ``lamina upgrade`` stamps
LEGACY_PATHS: dict[str, str] = {
    "cells": "lamina.cells",
    "sections": "lamina.sections",
    "genes": "lamina.genes",
    "X": "lamina.matrix",
    "qc": "lamina.section-stats",
    "raster": "lamina.raster",
    "transforms": "lamina.transforms",
    "deformation": "lamina.deformation",
    "aligned": "lamina.aligned",
    "pca": "lamina.pca",
    "flow": "lamina.flow",
    "interpolated": "lamina.interpolated",
    "volume": "lamina.volume",
    "expression": "lamina.expression-volume",
}


def element_of(node, where: str) -> type[Element] | None:
    """The format class ``node`` was written with (None when it carries no encoding: a format-1 store).
    A type or version this lamina does not know is a :class:`FormatVersionError` naming the element."""
    kind, version = node.attrs.get(TYPE), node.attrs.get(VERSION)
    if kind is None:
        return None
    cls = ELEMENTS.get((str(kind), str(version)))
    if cls is None:
        known = sorted(v for (t, v) in ELEMENTS if t == kind)
        raise FormatVersionError(
            f"{where} is a {kind} element of encoding version {version}, which this lamina does not read "
            f"(it reads {', '.join(known) or 'no version of it'}); upgrade lamina (pip install -U lamina)"
        )
    return cls


E = TypeVar("E", bound=Element)


def expect(node, kind: type[E], where: str) -> type[E]:
    """The format class ``node`` was written with, which must be an encoding of ``kind``'s element type
    (nodes of a format-1 store, which carry no encoding, read as ``kind``)."""
    cls = element_of(node, where)
    if cls is None:
        return kind
    if cls.encoding_type != kind.encoding_type:
        raise StoreError(f"{where} is a {cls.encoding_type} element, not {kind.encoding_type}")
    return cast(type[E], cls)

"""lamina: serial 2D spatial-omics sections -> 3D single-cell atlas, out of core, on Dask.

Python API::

    import lamina
    client = lamina.connect()                         # local cluster sized to this machine
    atlas = lamina.ingest("cells.parquet", "my.lamina.zarr", x="x", y="y", section="slice", genes="rest")
    lamina.align(atlas, client=client)                # section_stats -> rasterize -> register -> refine -> warp
    ds = atlas.to_xarray()                            # lazy, dask-backed

``import lamina`` loads the store and ingest layers (numpy, pandas, zarr, dask); every other name is
imported on first use (PEP 562), so ``lamina --version`` and a script that only opens a store never pay for
torch or distributed.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import (
    ClusterError,
    ConfigError,
    FormatVersionError,
    InputError,
    LaminaError,
    MissingInputError,
    StoreError,
    TooLargeError,
    UnknownGeneError,
    UnknownOptionError,
    UnknownSectionError,
)
from .ingest import (
    IngestSpec,
    import_isost,
    ingest,
    ingest_blocks,
)  # eager: the function shadows its own subpackage's name

#: public name -> module that defines it (relative to this package)
_LAZY = {
    "config": ".config",
    "datasets": ".datasets",
    "stages": ".stages",
    "kernels": ".kernels",
    "connect": ".cluster",
    "Atlas": ".store",
    "FORMAT_VERSION": ".store",
    "to_atlas": ".transforms",
    "to_section": ".transforms",
    "map_tiles": ".maps",
    "map_neighbourhoods": ".maps",
    "domains": ".domains",
    "add_image": ".ingest.images",
    "mark_aligned": ".stages.warp",
    "export_spatialdata": ".spatialdata_zarr",
    "export_enhanced": ".export_enhance",
    "enhance_cells": ".enhance_cells",
    "export_enhanced_cells": ".enhance_cells",
    "image_in_atlas": ".atlas_image",
    "export_image": ".atlas_image",
    "enhance": ".stages.pipeline",  # the pipeline histology -> enhance (lamina.stages.enhance is the stage alone)
    **{
        name: ".stages"
        for name in (
            "align",
            "reconstruct",
            "section_stats",
            "rasterize",
            "register",
            "refine",
            "warp",
            "pca",
            "train_flow",
            "interpolate",
            "voxelize",
            "invert",
            "embed",
            "niche",
            "encoder",
            "histology",
            "export_expression_parquet",
        )
    },
}

__all__ = [
    "Atlas",
    "ClusterError",
    "ConfigError",
    "FORMAT_VERSION",
    "FormatVersionError",
    "IngestSpec",
    "InputError",
    "LaminaError",
    "MissingInputError",
    "StoreError",
    "TooLargeError",
    "UnknownGeneError",
    "UnknownOptionError",
    "UnknownSectionError",
    "__version__",
    "add_image",
    "align",
    "config",
    "connect",
    "datasets",
    "embed",
    "encoder",
    "enhance",
    "enhance_cells",
    "export_enhanced",
    "export_enhanced_cells",
    "export_expression_parquet",
    "histology",
    "export_image",
    "export_spatialdata",
    "image_in_atlas",
    "import_isost",
    "ingest",
    "ingest_blocks",
    "interpolate",
    "invert",
    "kernels",
    "map_neighbourhoods",
    "map_tiles",
    "mark_aligned",
    "niche",
    "pca",
    "rasterize",
    "reconstruct",
    "refine",
    "register",
    "section_stats",
    "stages",
    "to_atlas",
    "to_section",
    "train_flow",
    "voxelize",
    "warp",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lamina' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name in ("config", "datasets", "stages", "kernels") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

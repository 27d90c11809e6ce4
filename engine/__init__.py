"""lamina: serial 2D spatial-omics sections -> 3D single-cell atlas, out of core, on Dask.

Python API::

    import lamina
    client = lamina.connect()                         # local cluster sized to this machine
    atlas = lamina.ingest("cells.parquet", "my.lamina.zarr", x="x", y="y", section="slice", genes="rest")
    lamina.section_stats(atlas)
    ds = atlas.to_xarray()                            # lazy, dask-backed
"""
from . import config, datasets
from ._version import __version__
from .cluster import connect
from .errors import (ClusterError, ConfigError, FormatVersionError, InputError, LaminaError, StoreError,
                     TooLargeError)
from .ingest import IngestSpec, import_isost, ingest
from .stages import (align, export_expression_parquet, interpolate, invert, pca, rasterize, reconstruct, refine,
                     register, section_stats, train_flow, voxelize, warp)
from .store import FORMAT_VERSION, Atlas
from .transforms import to_atlas, to_section

__all__ = ["config", "Atlas", "FORMAT_VERSION", "IngestSpec", "connect", "datasets", "ingest", "import_isost", "align", "section_stats", "rasterize", "register", "refine", "warp", "to_atlas", "to_section",
           "pca", "train_flow", "interpolate", "voxelize", "invert", "reconstruct", "export_expression_parquet",
           "LaminaError", "InputError", "ConfigError", "StoreError", "FormatVersionError", "ClusterError",
           "TooLargeError", "__version__"]

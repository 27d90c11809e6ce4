"""The atlas store (Zarr v3) and its format."""

from .atlas import Atlas
from .format import FORMAT_VERSION

__all__ = ["Atlas", "FORMAT_VERSION"]

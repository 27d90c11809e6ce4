"""Section images (H&E, DAPI morphology) into ``/images/<section>``, read tile by tile where the format allows.

TIFF / OME-TIFF (tiled or striped, pyramidal or not) is read through tifffile's Zarr view: a task reads only
the tiles under its chunk, so a whole slide is never decoded at once. PNG and JPEG cannot be read by region;
they are decoded whole (Space Ranger's ``tissue_hires_image.png`` is ~2000 px). Axes become ``[c, y, x]``:
RGB samples and channels are ``c``; a z stack (Xenium's ``morphology.ome.tif``) is max-projected, tile by tile.

The map from image pixels to the section's um frame (``image_to_section``, 3x3 on (col, row, 1)) comes from
the platform layout (Xenium: pixel size; Visium: scale factors) or is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff", ".btf")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")


class TiffRegion:
    """A lazy ``[c, y, x]`` view of series 0 (pyramid ``level``) of a TIFF: ``region[c, y0:y1, x0:x1]`` opens the
    file and reads the tiles under it. Holds only the path, so it travels to workers."""

    def __init__(self, path, level: int = 0):
        import tifffile

        self.path, self.level = str(path), int(level)
        try:
            with tifffile.TiffFile(self.path) as tf:
                series = tf.series[0]
                if self.level >= len(series.levels):
                    raise InputError(f"{path}: has {len(series.levels)} pyramid level(s); level {level} does not exist")
                page = series.levels[self.level]
                self.axes, raw_shape, self.dtype = page.axes, tuple(page.shape), np.dtype(page.dtype)
                self.pixel_size_um = _ome_pixel_size(tf) if self.level == 0 else None
        except InputError:
            raise
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... for damaged files
            raise InputError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc}); copy the file again") from exc
        if "Y" not in self.axes or "X" not in self.axes:
            raise InputError(f"{path}: image axes {self.axes!r} have no Y and X")
        extra = [a for a, n in zip(self.axes, raw_shape) if a not in "YXCSZ" and n > 1]
        if extra:
            raise InputError(
                f"{path}: image axes {self.axes!r}: axis {extra[0]} (size > 1) is not supported; save one plane"
            )
        self.raw_shape = raw_shape
        size = dict(zip(self.axes, raw_shape))
        self.shape = (size.get("C", 1) * size.get("S", 1), size["Y"], size["X"])
        self.ndim = 3

    def __getitem__(self, key):
        import tifffile
        import zarr

        cs, ys, xs = key
        index = []
        for a in self.axes:
            index.append({"Y": ys, "X": xs}.get(a, slice(None) if a in "CSZ" else 0))
        with tifffile.TiffFile(self.path) as tf:
            z = zarr.open(tf.series[0].aszarr(level=self.level), mode="r")
            block = np.asarray(z[tuple(index)])
        axes = [a for a in self.axes if a in "YXCSZ"]
        if "Z" in axes:
            block = block.max(axis=axes.index("Z"))
            axes.remove("Z")
        for a in ("C", "S"):
            if a not in axes:
                block, axes = block[..., None], [*axes, a]
        block = np.moveaxis(block, [axes.index(a) for a in ("C", "S", "Y", "X")], [0, 1, 2, 3])
        block = block.reshape(-1, *block.shape[2:])
        return block[cs]


def _ome_pixel_size(tf) -> float | None:
    """PhysicalSizeX of an OME-TIFF in um (None when absent or in another unit)."""
    if not tf.is_ome or not tf.ome_metadata:
        return None
    import tifffile

    try:
        pixels = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
        size = float(pixels["PhysicalSizeX"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    unit = str(pixels.get("PhysicalSizeXUnit", "µm"))
    return size if unit in ("µm", "um", "micron", "micrometer") else None


def open_image(path, level: int = 0, chunk: int = 2048):
    """The image at ``path`` as a lazy dask array ``[c, y, x]`` and its pixel size in um from the file's
    metadata (None when the file does not say)."""
    import dask.array as da

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist; check the path")
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        region = TiffRegion(path, level)
        c, h, w = region.shape
        arr = da.from_array(region, chunks=(c, min(chunk, h), min(chunk, w)), asarray=True, fancy=False)
        return arr, region.pixel_size_um
    if name.endswith(PIL_SUFFIXES):
        from PIL import Image

        # a whole-slide H&E is legitimately beyond PIL's decompression-bomb guard (89 M px): the caller chose the file
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA", "CMYK") else im)
        except Exception as exc:  # PIL raises its own UnidentifiedImageError, OSError, DecompressionBombError
            raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        return da.from_array(pixels, chunks=(pixels.shape[0], chunk, chunk)), None
    raise InputError(f"{path}: unsupported image type; lamina reads {', '.join(TIFF_SUFFIXES + PIL_SUFFIXES)}")


@dataclass
class ImageSource:
    """One section's image: ``path``; ``pixel_size_um`` (None: from the file's metadata); ``image_to_section``
    (3x3, level-0 pixel (col, row, 1) -> the section's raw um; None: ``diag(pixel_size_um, pixel_size_um, 1)``,
    i.e. the image's pixel (0, 0) is the section's origin); ``level``: the file's pyramid level to store."""

    path: Path
    pixel_size_um: float | None = None
    image_to_section: list | None = None
    level: int = 0

    def __post_init__(self):
        self.path = Path(self.path)

    def resolve(self):
        """(lazy ``[c, y, x]`` array, pixel size um, 3x3 affine) with every default filled and checked."""
        arr, meta_size = open_image(self.path, self.level)
        size = self.pixel_size_um if self.pixel_size_um is not None else meta_size
        if size is None and self.image_to_section is not None:
            affine = np.asarray(self.image_to_section, np.float64)
            size = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
        if size is None:
            raise InputError(
                f"image {self.path}: its pixel size is not in the file; pass pixel_size_um (um per pixel) or "
                f"image_to_section"
            )
        affine = (
            np.diag([size, size, 1.0]) if self.image_to_section is None else np.asarray(self.image_to_section, float)
        )
        if affine.shape != (3, 3) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:2, :2])) < 1e-12:
            raise InputError(f"image {self.path}: image_to_section must be an invertible, finite 3x3 affine")
        return arr, float(size), affine

    def fingerprint(self):
        st = self.path.stat()
        affine = None if self.image_to_section is None else np.asarray(self.image_to_section, float).tolist()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns, self.pixel_size_um, affine, self.level]


def as_source(value) -> ImageSource:
    """An :class:`ImageSource` from a path, a dict of its fields, or an ImageSource."""
    if isinstance(value, ImageSource):
        return value
    if isinstance(value, (str, Path)):
        return ImageSource(Path(value))
    if isinstance(value, dict):
        unknown = set(value) - {"path", "pixel_size_um", "image_to_section", "level"}
        if unknown or "path" not in value:
            raise InputError(
                f"image {value!r}: give path and optionally pixel_size_um, image_to_section, level "
                f"(unknown: {sorted(unknown)})"
            )
        return ImageSource(**value)
    raise InputError(f"image {value!r}: give a path, a dict with path=..., or an ImageSource")


def write_images(root, sources: dict[str, ImageSource], sections: list[str]) -> list[str]:
    """Write each section's image into ``root/images/<section>`` (a pyramid, see
    :class:`~lamina.store.elements.ImageV1`); returns the sections written."""
    from ..store.elements import ImagesV1, ImageV1

    unknown = [s for s in sources if s not in set(sections)]
    if unknown:
        raise InputError(
            f"images given for section(s) {unknown} that the atlas does not have; its sections: {sections[:10]}"
        )
    if not sources:
        return []
    parent = root.require_group("images")
    ImagesV1.stamp(parent)
    for sid, src in sources.items():
        arr, size, affine = src.resolve()
        ImageV1.write(parent, sid, arr, size, affine, source=str(src.path))
    return list(sources)


def add_image(atlas, section, image, *, pixel_size_um=None, image_to_section=None, level: int = 0):
    """Store ``image`` (a path, or an :class:`ImageSource`) as ``/images/<section>`` of ``atlas`` (an Atlas or
    a store path) and return the Atlas; an existing image of the section is replaced only once the new one is
    complete. ``pixel_size_um`` / ``image_to_section`` / ``level`` as in :class:`ImageSource`."""
    import shutil
    import uuid

    from ..store import arrays
    from ..store.atlas import Atlas, _is_url
    from ..store.elements import ImagesV1, ImageV1
    from ..store.lock import writer

    atlas = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas, mode="r+")
    if _is_url(atlas.path):
        raise InputError(f"add_image writes to a local or shared filesystem store; {atlas.path} is a URL")
    sid = str(atlas.sections.id.iloc[atlas.section_index(section)])
    src = image if isinstance(image, ImageSource) else ImageSource(Path(image), pixel_size_um, image_to_section, level)
    arr, size, affine = src.resolve()  # checked before the store is touched
    with writer(atlas.path):
        root = arrays.open_root(atlas.path, "r+")
        parent = root.require_group("images")
        ImagesV1.stamp(parent)
        tmp = f".tmp-{sid}-{uuid.uuid4().hex[:8]}"
        folder = Path(atlas.path) / "images"
        try:
            ImageV1.write(parent, tmp, arr, size, affine, source=str(src.path))
            group = arrays.open_root(atlas.path, "r+")[f"images/{tmp}"]
            group.attrs["multiscales"] = ImageV1.multiscales(len(ImageV1.levels(group)), size, sid)
            group.attrs["section"] = sid
            old = folder / sid
            trash = folder / f".old-{sid}-{uuid.uuid4().hex[:8]}"
            if old.exists():
                old.rename(trash)
            (folder / tmp).rename(old)
            shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(folder / tmp, ignore_errors=True)
            raise
        arrays.consolidate(atlas.path)
    return Atlas.open(atlas.path, mode="r+")

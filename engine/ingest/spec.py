"""What to read from the input and how: column names, units, sections, genes (one validated object)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError


def _field(default, config: str, doc: str):
    """A spec field: its default, its place in a config's ``input:`` block and a one-line doc."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"config": config, "doc": doc})
    return field(default=default, metadata={"config": config, "doc": doc})


UNIT_SCALE = {"um": 1.0, "mm": 1000.0, "nm": 1e-3}
GENE_JOINS = ("strict", "union", "intersection")
NORMALIZE = ("none", "log1p")


@dataclass
class IngestSpec:
    """Column mapping and options of an ingest.

    x, y, section, z, cell_type, cell_id: column names in the input (``section``/``z``/``cell_type``/``cell_id``
    may be None). In a folder of one file per section, a missing section column means "the file's stem".
    block: the column naming the block (donor, patient, specimen) of each cell; a store holds one block (a
    stack is never aligned across blocks): pick it with ``only_blocks``, or let :func:`lamina.ingest_blocks`
    / ``lamina build`` write one store per block. only_sections / only_blocks: read a subset of the rows.
    genes: None (no expression), a list of column names, or ``"rest"`` (every column not used otherwise).
    obs: further columns to keep; strings become categorical codes, numbers stay numeric.
    na_values: labels that mean "missing" in text columns (cell type, obs, cell id), in every input format;
    by default only empty CSV fields and Parquet / AnnData nulls are missing, and "NA" is a label.
    units: ``um`` | ``mm`` | ``nm`` | ``px`` (with ``pixel_size`` um per pixel; without it the scale is
    unknown: coordinates are kept in pixels and the store records ``units: px`` and ``scale_known: false``).
    section_order / section_z / section_spacing: where z comes from when there is no z column
    (``section_z`` maps id -> um; otherwise sections are ``section_spacing`` um apart in ``section_order``
    or in order of first appearance).
    gene_join: what to do when files have different genes: ``strict`` (error), ``union`` (missing genes
    are 0 and recorded in /sections/gene_measured), ``intersection``.
    """

    x: str = _field("x", "columns.x", "column of x")
    y: str = _field("y", "columns.y", "column of y")
    section: str | None = _field(
        "section",
        "columns.section",
        "column of the section id (null in a folder of one file per section: the file name)",
    )
    z: str | None = _field(None, "columns.z", "column of z (um); null: from sections.z or sections.spacing")
    cell_type: str | None = _field(None, "columns.cell_type", "column of cell-type labels")
    cell_id: str | None = _field(None, "columns.cell_id", "column of cell ids")
    block: str | None = _field(
        None, "columns.block", "column of the block (donor / patient / specimen): each block is its own stack"
    )
    genes: list[str] | Literal["rest"] | None = _field(
        None, "genes", "gene columns: a list, 'rest' (every other column) or null (no expression)"
    )
    obs: list[str] = _field([], "obs", "further columns to keep (text becomes categorical)")
    na_values: list[str] = _field(
        [], "na_values", "labels that mean missing in text columns, e.g. [NA] for tables written by R (any format)"
    )
    units: Literal["um", "mm", "nm", "px"] = _field("um", "units", "unit of x, y (px: pixel_size, or unknown scale)")
    pixel_size: float | None = _field(None, "pixel_size", "micrometres per pixel when units is px (null: unknown)")
    section_order: list[str | int] | None = _field(None, "sections.order", "section ids in z order")
    section_z: dict | None = _field(None, "sections.z", "section id -> z (um)")
    section_spacing: float = _field(10.0, "sections.spacing", "distance between sections (um) when z is not given")
    only_sections: list[str | int] | None = _field(None, "sections.only", "read only these section ids (null: all)")
    only_blocks: list[str | int] | None = _field(
        None, "blocks", "read only these blocks (null: all; needs a block column)"
    )
    gene_join: Literal["strict", "union", "intersection"] = _field(
        "strict", "gene_join", "files with different genes: error, union (missing = 0), or intersection"
    )
    normalize: Literal["none", "log1p"] = _field("none", "normalize", "none, or log1p(10^4 counts / total)")
    min_cells_per_section: int = _field(10, "sections.min_cells", "sections with fewer cells are an error")
    spatial_key: str | None = _field(None, "spatial_key", "h5ad: the obsm key holding (x, y)")
    read_rows: int | None = _field(None, "chunks.read_rows", "rows per read chunk (default from the column count)")
    cell_chunk: int | None = _field(
        None, "chunks.cell_chunk", "rows per Zarr chunk (default ~32 MiB of expression per chunk)"
    )
    gene_chunk: int = _field(512, "chunks.gene_chunk", "genes per Zarr chunk of /X")

    def __post_init__(self):
        if self.units not in (*UNIT_SCALE, "px"):
            raise ConfigError(f"units={self.units!r} is not one of um, mm, nm, px")
        if self.pixel_size is not None and not (self.pixel_size > 0 and self.pixel_size < float("inf")):
            raise ConfigError(f"pixel_size={self.pixel_size!r} must be a positive number of micrometres per pixel")
        if self.pixel_size is not None and self.units != "px":
            raise ConfigError(f"pixel_size applies to units='px' only (units is {self.units!r}); drop one of them")
        if self.gene_join not in GENE_JOINS:
            raise ConfigError(f"gene_join={self.gene_join!r} is not one of {', '.join(GENE_JOINS)}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize={self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        if isinstance(self.genes, str) and self.genes != "rest":
            raise ConfigError(f"genes={self.genes!r}: give a list of gene columns, 'rest', or None")
        if self.section_order is not None:
            seen, dup = set(), []
            for s in map(str, self.section_order):
                (dup.append(s) if s in seen else seen.add(s))
            if dup:
                raise ConfigError(f"section_order lists duplicate section ids {dup}; each section once")
        if self.section_spacing is None or self.section_spacing <= 0:
            raise ConfigError(f"section_spacing={self.section_spacing!r} must be a positive distance in um")
        for name in ("only_sections", "only_blocks"):
            value = getattr(self, name)
            if value is not None and not len(value):
                raise ConfigError(f"{name} is an empty list; give the ids to keep, or null for all")
        if self.only_blocks is not None and not self.block:
            raise ConfigError("only_blocks selects blocks of the block column: set block: <column> too")
        if self.min_cells_per_section < 1:
            raise ConfigError("min_cells_per_section must be >= 1")

    @property
    def scale(self) -> float:
        """Micrometres per input coordinate unit; 1 for pixels of unknown size (see :attr:`scale_known`)."""
        if self.units == "px":
            return float(self.pixel_size) if self.pixel_size else 1.0
        return UNIT_SCALE[self.units]

    @property
    def scale_known(self) -> bool:
        """False for ``units='px'`` without ``pixel_size``: lengths are then pixels, not micrometres."""
        return not (self.units == "px" and not self.pixel_size)

    @property
    def categorical(self) -> list[str]:
        """Columns always stored as categorical codes."""
        return [c for c in [self.cell_type] if c]

    def used_columns(self) -> list[str]:
        cols = [self.x, self.y, self.section, self.z, self.cell_type, self.cell_id, self.block, *self.obs]
        return [c for c in cols if c]

    @property
    def selects(self) -> bool:
        """True when only some rows are read (a section or block subset)."""
        return self.only_sections is not None or self.only_blocks is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

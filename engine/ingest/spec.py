"""What to read from the input and how: column names, units, sections, genes (one validated object)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError

UNIT_SCALE = {"um": 1.0, "mm": 1000.0, "nm": 1e-3}
GENE_JOINS = ("strict", "union", "intersection")
NORMALIZE = ("none", "log1p")


@dataclass
class IngestSpec:
    """Column mapping and options of an ingest.

    x, y, section, z, cell_type, cell_id: column names in the input (``section``/``z``/``cell_type``/``cell_id``
    may be None). In a folder of one file per section, a missing section column means "the file's stem".
    genes: None (no expression), a list of column names, or ``"rest"`` (every column not used otherwise).
    obs: further columns to keep; strings become categorical codes, numbers stay numeric.
    units: ``um`` | ``mm`` | ``nm`` | ``px`` (then ``pixel_size`` um per pixel is required).
    section_order / section_z / section_spacing: where z comes from when there is no z column
    (``section_z`` maps id -> um; otherwise sections are ``section_spacing`` um apart in ``section_order``
    or in order of first appearance).
    gene_join: what to do when files have different genes: ``strict`` (error), ``union`` (missing genes
    are 0 and recorded in /sections/gene_measured), ``intersection``.
    """

    x: str = "x"
    y: str = "y"
    section: str | None = "section"
    z: str | None = None
    cell_type: str | None = None
    cell_id: str | None = None
    genes: list | str | None = None
    obs: list = field(default_factory=list)
    units: str = "um"
    pixel_size: float | None = None
    section_order: list | None = None
    section_z: dict | None = None
    section_spacing: float = 10.0
    gene_join: str = "strict"
    normalize: str = "none"
    min_cells_per_section: int = 10
    spatial_key: str | None = None     # h5ad: obsm key holding (x, y) instead of obs columns
    read_rows: int | None = None       # rows per read chunk (default from the column count)
    cell_chunk: int | None = None      # rows per Zarr chunk (default ~32 MiB of expression per chunk)
    gene_chunk: int = 512

    def __post_init__(self):
        if self.units not in (*UNIT_SCALE, "px"):
            raise ConfigError(f"units={self.units!r} is not one of um, mm, nm, px")
        if self.units == "px" and not (self.pixel_size and self.pixel_size > 0):
            raise ConfigError("units='px' needs pixel_size (micrometres per pixel), e.g. pixel_size=0.2125")
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
        if self.min_cells_per_section < 1:
            raise ConfigError("min_cells_per_section must be >= 1")

    @property
    def scale(self) -> float:
        """Micrometres per input coordinate unit."""
        return float(self.pixel_size) if self.units == "px" else UNIT_SCALE[self.units]

    @property
    def categorical(self) -> list[str]:
        """Columns always stored as categorical codes."""
        return [c for c in [self.cell_type] if c]

    def used_columns(self) -> list[str]:
        return [c for c in [self.x, self.y, self.section, self.z, self.cell_type, self.cell_id, *self.obs] if c]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

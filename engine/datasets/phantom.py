"""Synthetic serial-section phantom with exact ground truth.

A 3D tissue (a lobed outline; curved, wavy layers; a tube winding through z) carries a smooth low-rank expression
field over G genes. The outline and the layers do not move with depth: an image-based registration cannot tell a
tissue that shifts with z from a misaligned section, so ground-truth errors are only meaningful when the bulk stays
put. What is curved along z is the tube (``tube_travel_um`` from the first section to the last), so "a curved
structure stays curved" can be checked. It is cut into S sections; every section is deformed by a known smooth
non-linear warp and a known affine (rotation, scale, translation, optional reflection), loses cells to random dropout
and a tear, and gets expression noise.

Ground truth, per section ``s`` (coordinates in um)::

    true (x, y) = q + v_s(q),   q = A_s^{-1} (observed x, y)        v_s: a sum of 3 smooth sine modes
    observed    = A_s (I + v_s)^{-1} (true x, y)

and the field ``f(x, y, z) = mu + m(x, y, z) M + phi(x, y, z) W`` (``m``: soft type memberships,
``phi``: low-frequency Fourier features). Observed expression = ``f`` at the cell's true position plus
N(0, noise^2); it is not clipped, so values can be slightly negative (it plays log-normalised data).

Generation streams: cells are produced in chunks of at most ``chunk_rows`` per section from seeds derived
from (seed, section, chunk), so any part can be regenerated alone and 10M cells never sit in memory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..kernels.fields import fourier_features, soft_bins
from ..kernels.geometry import affine_matrix, apply_affine, fourier_displacement, invert_displacement

N_WARP_MODES = 3


@dataclass(frozen=True)
class PhantomSpec:
    n_cells: int = 20_000
    n_sections: int = 10
    n_genes: int = 50
    section_spacing: float = 35.0  # um between sections
    extent: tuple = (2000.0, 1600.0)  # um, tissue bounding box (x, y) in the true frame
    n_types: int = 5  # n_types - 1 curved layers + 1 tube
    rank: int = 8  # Fourier components of the field (on top of one per type)
    max_rotation_deg: float = 180.0
    max_translation_um: float = 1000.0
    scale_range: float = 0.10  # isotropic scale in [1 - r, 1 + r]
    warp_um: float = 30.0  # amplitude of each of the 3 warp modes (um)
    flip_fraction: float = 0.0  # share of sections mirrored (reflection)
    dropout: float = 0.05  # share of cells lost at random
    tear_fraction: float = 0.05  # up to this share of each section's area lost to one tear
    noise: float = 0.3  # sd of expression noise
    type_noise: float = 0.03  # share of cells whose type label is random
    tube_travel_um: float = 300.0  # lateral travel of the tube from the first section to the last
    # validation families (issue 20); the defaults leave the phantom as it always was
    tube_span: tuple = (0.0, 1.0)  # share of the depth where the tube exists: it appears and vanishes
    layer_drift_um: float = 0.0  # amplitude of a wave in the layer boundaries that travels along x with depth
    layer_drift_period_um: float = 1000.0  # depth over which that wave travels one wavelength
    damaged_fraction: float = 0.0  # share of sections badly damaged: a tear of 25-40% of the area
    tube_growth: float = 0.0  # the tube's radius grows from (1 - g/2) to (1 + g/2) of its default over the depth
    seed: int = 0
    chunk_rows: int = 200_000

    def __post_init__(self):
        if self.n_sections < 1 or self.n_cells < self.n_sections:
            raise ConfigError(
                f"phantom needs n_sections >= 1 and n_cells >= n_sections "
                f"(got {self.n_cells} cells, {self.n_sections} sections); ask for more cells or fewer sections"
            )
        if self.n_types < 2 or self.n_genes < 1:
            raise ConfigError(f"phantom needs n_types >= 2 and n_genes >= 1 (got {self.n_types}, {self.n_genes})")


class Phantom:
    """A phantom atlas: streams observed cells and answers ground-truth questions exactly."""

    def __init__(self, spec: PhantomSpec | None = None, **kwargs):
        self.spec = spec or PhantomSpec(**kwargs)
        sp = self.spec
        rng = np.random.default_rng([sp.seed, 0xA71A5])
        S, G, K = sp.n_sections, sp.n_genes, sp.n_types
        self.width, self.height = map(float, sp.extent)
        self.z = np.arange(S, dtype=np.float64) * sp.section_spacing
        self.depth = max(float(self.z[-1]), sp.section_spacing)
        self.section_ids = [f"S{s:03d}" for s in range(S)]
        self.type_names = [f"L{k + 1}" for k in range(K - 1)] + ["tube"]
        self.gene_names = [f"g{g:04d}" for g in range(G)]

        # cells per section: equal shares of n_cells (every section has the same outline)
        n = np.full(S, sp.n_cells // S, dtype=np.int64)
        n[: sp.n_cells - n.sum()] += 1
        self.n_per_section = n
        self.cell_offset = np.concatenate([[0], np.cumsum(n)])

        # per-section transforms: observed = A (I + v)^-1 (true)
        center = (self.width / 2, self.height / 2)
        theta = np.deg2rad(rng.uniform(-sp.max_rotation_deg, sp.max_rotation_deg, S))
        scale = rng.uniform(1 - sp.scale_range, 1 + sp.scale_range, S)
        shift = rng.uniform(-sp.max_translation_um, sp.max_translation_um, (S, 2))
        flips = rng.random(S) < sp.flip_fraction
        self.affine = np.stack([affine_matrix(theta[s], scale[s], shift[s], center, bool(flips[s])) for s in range(S)])
        self.flipped = flips
        direction = rng.uniform(0, 2 * np.pi, (S, N_WARP_MODES))
        wavelength = rng.uniform(800.0, 2000.0, (S, N_WARP_MODES))
        self.warp_k = np.stack([np.cos(direction), np.sin(direction)], -1) * (2 * np.pi / wavelength)[..., None]
        self.warp_phase = rng.uniform(0, 2 * np.pi, (S, N_WARP_MODES))
        amp_dir = rng.uniform(0, 2 * np.pi, (S, N_WARP_MODES))
        self.warp_amp = np.stack([np.cos(amp_dir), np.sin(amp_dir)], -1) * sp.warp_um

        # the field: mu + memberships @ M + fourier @ W
        self.field_mu = rng.uniform(0.5, 1.5, G)
        markers = rng.integers(0, K, G)
        self.field_types = rng.normal(0.0, 0.3, (K, G))
        self.field_types[markers, np.arange(G)] += 2.0
        wl = rng.uniform(400.0, 1500.0, sp.rank)
        d = rng.normal(size=(sp.rank, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        self.field_freqs = d * (2 * np.pi / wl)[:, None]
        self.field_phases = rng.uniform(0, 2 * np.pi, sp.rank)
        self.field_weights = rng.normal(0.0, 0.6, (sp.rank, G))
        # a generator of its own: the draws above (and so the default phantom) stay what they always were
        extra = np.random.default_rng([sp.seed, 0xDA4A6E])
        self.damaged = np.zeros(S, bool)
        n_damaged = int(round(sp.damaged_fraction * S))
        if n_damaged:
            self.damaged[extra.choice(S, n_damaged, replace=False)] = True

    # ------------------------------------------------------------------ geometry of the true tissue
    def _center(self, z):
        return self.width / 2, self.height / 2

    def _radii(self, z):
        return 0.40 * self.width, 0.40 * self.height

    def _inside(self, xyz: np.ndarray) -> np.ndarray:
        cx, cy = self._center(xyz[:, 2])
        rx, ry = self._radii(xyz[:, 2])
        u, v = (xyz[:, 0] - cx) / rx, (xyz[:, 1] - cy) / ry
        ang = np.arctan2(v, u)
        lobes = 1 + 0.10 * np.sin(ang + 0.5) + 0.06 * np.sin(3 * ang + 1)  # asymmetric: no rotational ambiguity
        return np.hypot(u, v) < lobes

    def tube_center(self, z) -> tuple[np.ndarray, np.ndarray]:
        """True (x, y) of the tube's axis at depth ``z`` (um): an arc of ``tube_travel_um`` over the stack."""
        t = np.asarray(z, dtype=np.float64) / self.depth
        travel = self.spec.tube_travel_um
        return 0.38 * self.width + travel * t, 0.58 * self.height + 0.4 * travel * np.sin(np.pi * t)

    def tube_radius(self, z) -> np.ndarray:
        """True radius (um) of the tube at depth ``z`` (um), where its membership is 0.5."""
        t = np.asarray(z, dtype=np.float64) / self.depth
        return 0.07 * self.width * (1.0 + self.spec.tube_growth * (t - 0.5))

    def memberships(self, xyz: np.ndarray) -> np.ndarray:
        """Soft cell-type memberships ``[n, n_types]`` at true positions ``xyz`` ``[n, 3]`` (um); rows sum to 1."""
        cx, cy = self._center(xyz[:, 2])
        rx, ry = self._radii(xyz[:, 2])
        depth = (xyz[:, 1] - (cy - ry)) / (2 * ry) + 0.08 * np.sin(3 * np.pi * xyz[:, 0] / self.width)
        if self.spec.layer_drift_um:  # layer boundaries that bend differently at each depth
            phase = 2 * np.pi * (xyz[:, 0] / self.width + xyz[:, 2] / self.spec.layer_drift_period_um)
            depth = depth + self.spec.layer_drift_um / (2 * ry) * np.sin(phase)
        n_layers = self.spec.n_types - 1
        layers = soft_bins(depth, np.arange(1, n_layers) / n_layers, width=0.015)
        tx, ty = self.tube_center(xyz[:, 2])
        radius = self.tube_radius(xyz[:, 2])
        tube = 0.5 * (1.0 + np.tanh((radius - np.hypot(xyz[:, 0] - tx, xyz[:, 1] - ty)) / 16.0))
        t0, t1 = self.spec.tube_span
        t = xyz[:, 2] / self.depth
        tube = np.where((t >= t0) & (t <= t1), tube, 0.0)
        return np.concatenate([layers * (1 - tube)[:, None], tube[:, None]], axis=1)

    def field(self, xyz: np.ndarray) -> np.ndarray:
        """The true expression field ``[n, G]`` at true positions ``xyz`` ``[n, 3]`` (um)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return (
            self.field_mu
            + self.memberships(xyz) @ self.field_types
            + fourier_features(xyz, self.field_freqs, self.field_phases) @ self.field_weights
        )

    # ------------------------------------------------------------------ known transforms
    def to_true(self, section: int, xy_observed: np.ndarray) -> np.ndarray:
        """Observed (x, y) of section ``section`` -> true (x, y), um, exactly (closed form)."""
        q = apply_affine(np.linalg.inv(self.affine[section]), np.asarray(xy_observed, dtype=np.float64))
        return q + fourier_displacement(q, self.warp_k[section], self.warp_phase[section], self.warp_amp[section])

    def to_observed(self, section: int, xy_true: np.ndarray) -> np.ndarray:
        """True (x, y) -> observed (x, y) of section ``section`` (warp inverted by fixed point to 1e-9 um)."""
        q = invert_displacement(
            np.asarray(xy_true, dtype=np.float64),
            self.warp_k[section],
            self.warp_phase[section],
            self.warp_amp[section],
        )
        return apply_affine(self.affine[section], q)

    # ------------------------------------------------------------------ streaming cells
    def _sample_true_xy(self, rng, z: float, n: int, damaged: bool = False) -> np.ndarray:
        cx, cy = self._center(z)
        rx, ry = self._radii(z)
        tear_r = np.sqrt(rng.uniform(0, self.spec.tear_fraction) * rx * ry)
        if damaged:  # drawn after the default tear, so that undamaged sections are what they always were
            tear_r = np.sqrt(rng.uniform(0.25, 0.40) * rx * ry)  # a disc of that share of the outline
        tear_c = np.array([cx, cy]) + rng.uniform(-0.7, 0.7, 2) * np.array([rx, ry])
        keep_p = 1.0 - self.spec.dropout
        out, have = [], 0
        while have < n:
            m = int((n - have) * 1.6 / keep_p) + 64
            xy = np.stack(
                [rng.uniform(cx - 1.2 * rx, cx + 1.2 * rx, m), rng.uniform(cy - 1.2 * ry, cy + 1.2 * ry, m)], 1
            )
            ok = self._inside(np.column_stack([xy, np.full(m, z)]))
            ok &= np.hypot(xy[:, 0] - tear_c[0], xy[:, 1] - tear_c[1]) > tear_r
            ok &= rng.random(m) < keep_p
            out.append(xy[ok])
            have += int(ok.sum())
        return np.concatenate(out)[:n]

    def section_chunks(self, section: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """Observed cell table chunks of one section and their true positions ``[n, 3]`` (um).

        Table columns: section, x, y (observed, um), cell_type, cell_id, then one column per gene.
        """
        sp = self.spec
        n_total = int(self.n_per_section[section])
        z = float(self.z[section])
        for c, start in enumerate(range(0, n_total, sp.chunk_rows)):
            n = min(sp.chunk_rows, n_total - start)
            rng = np.random.default_rng([sp.seed, section, c])
            true_xy = self._sample_true_xy(rng, z, n, bool(self.damaged[section]))
            xyz = np.column_stack([true_xy, np.full(n, z)])
            member = self.memberships(xyz)
            types = np.argmax(member, axis=1)
            scramble = rng.random(n) < sp.type_noise
            types[scramble] = rng.integers(0, sp.n_types, int(scramble.sum()))
            expr = self.field(xyz) + rng.normal(0.0, sp.noise, (n, sp.n_genes))
            obs_xy = self.to_observed(section, true_xy)
            frame = pd.DataFrame(
                {
                    "section": self.section_ids[section],
                    "x": obs_xy[:, 0],
                    "y": obs_xy[:, 1],
                    "cell_type": pd.Categorical.from_codes(types, self.type_names),
                    "cell_id": np.arange(n, dtype=np.int64) + self.cell_offset[section] + start,
                }
            )
            genes = pd.DataFrame(expr.astype(np.float32), columns=self.gene_names)
            yield pd.concat([frame, genes], axis=1), xyz

    # ------------------------------------------------------------------ writing
    def write_parquet(self, folder: str | Path, row_group_rows: int = 16_384) -> list[Path]:
        """One Parquet file per section (``S000.parquet`` ...), written chunk by chunk.

        Row groups are capped at ``row_group_rows``: a Parquet reader holds one row group at a time, so this
        bounds the memory of whoever streams the files back.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for s, sid in enumerate(self.section_ids):
            path = folder / f"{sid}.parquet"
            writer = None
            for frame, _ in self.section_chunks(s):
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table, row_group_size=row_group_rows)
            writer.close()
            paths.append(path)
        return paths

    def write_truth(self, path: str | Path) -> Path:
        """Write the ground truth as a Zarr store (cells in observed order; transforms; field parameters)."""
        import zarr

        from ..store import arrays

        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        root.attrs.update(
            {
                "kind": "lamina.phantom.truth",
                "units": "um",
                "spec": dataclasses.asdict(self.spec),
                "section_ids": self.section_ids,
                "type_names": self.type_names,
                "equation": "true_xy = q + v(q), q = inv(affine) @ observed_xy; "
                "v(q) = sin(q @ warp_k.T + warp_phase) @ warp_amp",
            }
        )
        n = int(self.cell_offset[-1])
        cells = root.create_group("cells")
        chunk = self.spec.chunk_rows
        out = {k: arrays.create(cells, k, (n,), np.float64, (chunk,), ("cell",)) for k in ("x", "y", "z")}
        out["cell_id"] = arrays.create(cells, "cell_id", (n,), np.int64, (chunk,), ("cell",))
        for s in range(self.spec.n_sections):
            pos = int(self.cell_offset[s])
            for frame, xyz in self.section_chunks(s):
                m = len(frame)
                for i, k in enumerate(("x", "y", "z")):
                    out[k][pos : pos + m] = xyz[:, i]
                out["cell_id"][pos : pos + m] = frame["cell_id"].to_numpy()
                pos += m
        sec = root.create_group("sections")
        for name, values, dims in [
            ("id", np.array(self.section_ids), ("section",)),
            ("z", self.z, ("section",)),
            ("n_cells", self.n_per_section, ("section",)),
            ("affine", self.affine, ("section", "i", "j")),
            ("warp_k", self.warp_k, ("section", "mode", "xy")),
            ("warp_phase", self.warp_phase, ("section", "mode")),
            ("warp_amp", self.warp_amp, ("section", "mode", "xy")),
        ]:
            arrays.write_small(sec, name, values, dims)
        fld = root.create_group("field")
        for name, values, dims in [
            ("mu", self.field_mu, ("gene",)),
            ("type_loadings", self.field_types, ("type", "gene")),
            ("freqs", self.field_freqs, ("rank", "xyz")),
            ("phases", self.field_phases, ("rank",)),
            ("weights", self.field_weights, ("rank", "gene")),
        ]:
            arrays.write_small(fld, name, values, dims)
        return Path(path)

    def describe(self) -> str:
        sp = self.spec
        return (
            f"phantom: {int(self.cell_offset[-1]):,} cells, {sp.n_sections} sections {sp.section_spacing:g} um apart, "
            f"{sp.n_genes} genes, {sp.n_types} cell types; rotations up to {sp.max_rotation_deg:g} deg, "
            f"translations up to {sp.max_translation_um:g} um, scale +-{100 * sp.scale_range:g}%, "
            f"warp {sp.warp_um:g} um/mode, dropout {100 * sp.dropout:g}%, seed {sp.seed}"
        )

    def spec_json(self) -> str:
        return json.dumps(dataclasses.asdict(self.spec), sort_keys=True)


def phantom(n_cells: int = 20_000, n_sections: int = 10, n_genes: int = 50, seed: int = 0, **kwargs) -> Phantom:
    """Build a :class:`Phantom` (nothing is generated until its cells are streamed)."""
    return Phantom(PhantomSpec(n_cells=n_cells, n_sections=n_sections, n_genes=n_genes, seed=seed, **kwargs))

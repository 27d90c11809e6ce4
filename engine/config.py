"""`lamina build` configuration: YAML validated against a small schema with messages that name the key and the fix."""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from .errors import ConfigError
from .ingest.spec import IngestSpec

REQUIRED = object()
#: key -> (allowed types, default) or a nested dict. ``None`` in types means "may be null".
SCHEMA = {
    "store": ((str,), REQUIRED),
    "overwrite": ((bool,), False),
    "input": {
        "path": ((str, list), REQUIRED),
        "paste": ((list,), []),
        "pattern": ((str, None), None),
        "columns": {
            "x": ((str,), "x"), "y": ((str,), "y"), "section": ((str, None), "section"), "z": ((str, None), None),
            "cell_type": ((str, None), None), "cell_id": ((str, None), None),
        },
        "spatial_key": ((str, None), None),
        "genes": ((list, str, None), None),
        "obs": ((list,), []),
        "units": ((str,), "um"),
        "pixel_size": ((float, int, None), None),
        "sections": {
            "order": ((list, None), None), "z": ((dict, None), None), "spacing": ((float, int), 10.0),
            "min_cells": ((int,), 10),
        },
        "gene_join": ((str,), "strict"),
        "normalize": ((str,), "none"),
        "chunks": {"read_rows": ((int, None), None), "cell_chunk": ((int, None), None), "gene_chunk": ((int,), 512)},
    },
    "cluster": {
        "scheduler": ((str, None), None), "n_workers": ((int, None), None),
        "threads_per_worker": ((int, None), None), "gpu": ((bool,), False),
    },
    "stages": {
        "section_stats": ((bool,), True),
        "register": {
            "enabled": ((bool,), True), "reflect": ((bool,), False), "pixel_um": ((float, int, None), None),
            "reference": ((str, int, None), None), "channels": ((str,), "auto"),
            "matcher": ((str,), "sift"), "matcher_weights": ((str, None), None), "batch": ((int,), 4),
            "fine": {"enabled": ((bool,), True), "z_sigma_sections": ((float, int, None), 3.0),
                     "alpha_px": ((float, int), 8.0), "lddmm_rounds": ((int,), 2), "affine_rounds": ((int,), 3)},
        },
        "reconstruct": {
            "enabled": ((bool,), False), "n_pcs": ((int, None), None), "dz_um": ((float, int), 10.0),
            "voxel_um": ((float, int, None), None), "interpolate": ((bool,), True),
            "flow": {"steps": ((int,), 600), "subsample": ((int,), 512), "k": ((int,), 10),
                     "hidden": ((int,), 64), "seed": ((int,), 0)},
        },
    },
    "report": {"enabled": ((bool,), True), "out": ((str, None), None)},
}

_TYPE_NAMES = {str: "a string", list: "a list", dict: "a mapping", bool: "true/false", int: "an integer",
               float: "a number", None: "null"}


def _check(value, types, key, where):
    ok = any((t is None and value is None) or (t is not None and isinstance(value, t)
                                                   and not (t in (int, float) and isinstance(value, bool)))
             for t in types)
    if not ok:
        want = " or ".join(_TYPE_NAMES[t] for t in types)
        raise ConfigError(f"{where}: '{key}' must be {want}, got {value!r} ({type(value).__name__})")


def _validate(node: dict, schema: dict, prefix: str, where: str) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys, got {node!r}")
    out = {}
    for key in node:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; allowed: {', '.join(schema)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
    for key, rule in schema.items():
        if isinstance(rule, dict):
            out[key] = _validate(node.get(key) or {}, rule, f"{prefix}{key}.", where)
            continue
        types, default = rule
        if key not in node:
            if default is REQUIRED:
                raise ConfigError(f"{where}: required key '{prefix}{key}' is missing")
            out[key] = default
            continue
        _check(node[key], types, prefix + key, where)
        out[key] = node[key]
    return out


def load_config(path: str | Path) -> dict:
    """Read and validate a build config; relative paths are taken from the config file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    cfg = _validate(raw, SCHEMA, "", str(path))
    base = path.parent
    resolve = lambda p: str(p if Path(p).is_absolute() or "://" in str(p) else (base / p))  # noqa: E731
    inp = cfg["input"]
    inp["path"] = [resolve(p) for p in inp["path"]] if isinstance(inp["path"], list) else resolve(inp["path"])
    inp["paste"] = [resolve(p) for p in inp["paste"]]
    for p in ([inp["path"]] if isinstance(inp["path"], str) else inp["path"]) + inp["paste"]:
        if not Path(p).exists():
            raise ConfigError(f"{path}: input.path / input.paste: {p} does not exist; fix the path (relative paths "
                              f"are taken from the config file's folder {base})")
    cfg["store"] = resolve(cfg["store"])
    reg = cfg["stages"]["register"]
    if reg["matcher_weights"]:
        reg["matcher_weights"] = resolve(reg["matcher_weights"])
    if cfg["report"]["out"]:
        cfg["report"]["out"] = resolve(cfg["report"]["out"])
    try:
        ingest_spec(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: input: {exc}") from exc
    from .stages.rasterize import CHANNELS

    if reg["batch"] < 1:
        raise ConfigError(f"{path}: 'stages.register.batch' (pairs / sections fitted as one batch) must be >= 1, "
                          f"got {reg['batch']}")
    channels = cfg["stages"]["register"]["channels"]
    if channels not in CHANNELS:
        raise ConfigError(f"{path}: 'stages.register.channels' must be one of {', '.join(CHANNELS)}, got {channels!r}")
    return cfg


def ingest_spec(cfg: dict) -> IngestSpec:
    inp = cfg["input"]
    cols, sec, ch = inp["columns"], inp["sections"], inp["chunks"]
    return IngestSpec(x=cols["x"], y=cols["y"], section=cols["section"], z=cols["z"], cell_type=cols["cell_type"],
                      cell_id=cols["cell_id"], genes=inp["genes"], obs=list(inp["obs"]), units=inp["units"],
                      pixel_size=inp["pixel_size"], section_order=sec["order"], section_z=sec["z"],
                      section_spacing=float(sec["spacing"]), gene_join=inp["gene_join"], normalize=inp["normalize"],
                      min_cells_per_section=sec["min_cells"], spatial_key=inp["spatial_key"],
                      read_rows=ch["read_rows"], cell_chunk=ch["cell_chunk"], gene_chunk=ch["gene_chunk"])

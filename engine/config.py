"""`lamina build` configuration: YAML validated with messages that name the key and the fix.

The schema is derived, not written out: ``input:`` from the fields of :class:`~lamina.IngestSpec` (each
names its place, e.g. ``columns.x``), ``stages.<name>:`` from each registered stage's options dataclass
(plus ``enabled``), ``run:`` from the registry's pipelines and stages. So a new stage or option is validated,
defaulted and documented the moment it is declared.

```yaml
store: atlas.lamina.zarr
input: {path: cells.parquet, columns: {cell_type: type}, genes: rest}
run: [align, reconstruct]          # pipelines or stage names (default: align)
stages:
  register: {reflect: true}        # options of one stage
  refine: false                    # a stage switched off (here: the affine stage's result is kept)
```
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from .errors import ConfigError
from .ingest.spec import IngestSpec
from .stages.options import convert

REQUIRED = object()
#: fixed top-level blocks: key -> (annotation, default); ``input``, ``stages`` and ``run`` are derived
CLUSTER = {
    "mode": (str, "auto"),
    "threads_below": (int, 1_000_000),
    "scheduler": (str | None, None),
    "n_workers": (int | None, None),
    "threads_per_worker": (int | None, None),
    "gpu": (bool, False),
}
REPORT = {"enabled": (bool, True), "out": (str | None, None)}
INPUT_EXTRA = {
    "path": (str | list[str], REQUIRED),
    "paste": (list[str], []),
    "pattern": (str | None, None),
    # an instrument's output folder per section (path: a folder or a list): xenium, merscope, cosmx, visium
    "platform": (str | None, None),
    # with a platform: store the images its folders hold in /images (true / false); otherwise a mapping
    # {section id: path | {path, pixel_size_um, image_to_section, level}} of one image per section
    "images": (bool | dict, True),
}
TOP = ("store", "overwrite", "run", "input", "cluster", "stages", "report")
#: keys of the format before the stage contract, and where their settings went
MOVED = {
    "stages.reconstruct": "list 'reconstruct' under run: (run: [align, reconstruct]) and give the options to "
    "their stages: stages.pca.n_pcs, stages.train_flow (dz_um, steps, subsample, k, ...), "
    "stages.voxelize.voxel_um; interpolate: false voxelizes the sections only",
    "stages.register.fine": "the fine stage is the stage 'refine': stages.refine (enabled, z_sigma_sections, "
    "alpha_px, lddmm_rounds, affine_rounds, batch)",
    "stages.register.pixel_um": "the canvas is drawn by the stage 'rasterize': stages.rasterize.pixel_um",
    "stages.register.channels": "the raster channels are drawn by the stage 'rasterize': stages.rasterize.channels",
    "stages.register.enabled": "to skip registration, leave 'align' out of run:",
}


def _unknown(key: str, prefix: str, allowed, where: str) -> ConfigError:
    full = f"{prefix}{key}"
    if full in MOVED:
        return ConfigError(f"{where}: '{full}' is no longer a key: {MOVED[full]}")
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; allowed: {', '.join(map(str, allowed))}"
    return ConfigError(f"{where}: unknown key '{full}'{hint}")


def _mapping(node, key: str, where: str) -> dict:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{key or 'the file'}' must be a mapping of keys, got {node!r}")
    return node


def _block(node, schema: dict, prefix: str, where: str) -> dict:
    """Validate a flat block against ``schema`` (key -> (annotation, default))."""
    node = _mapping(node, prefix.rstrip("."), where)
    for key in node:
        if key not in schema:
            raise _unknown(key, prefix, schema, where)
    out = {}
    for key, (tp, default) in schema.items():
        if key not in node:
            if default is REQUIRED:
                raise ConfigError(f"{where}: required key '{prefix}{key}' is missing")
            out[key] = default
        else:
            out[key] = convert(node[key], tp, prefix + key, where)
    return out


def input_schema() -> dict:
    """The ``input:`` block as nested key -> (annotation, default), from :class:`IngestSpec`'s fields."""
    hints = typing.get_type_hints(IngestSpec)
    tree: dict = {k: v for k, v in INPUT_EXTRA.items()}
    for f in dataclasses.fields(IngestSpec):
        *parents, leaf = f.metadata["config"].split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        node[leaf] = (hints[f.name], default)
    return tree


def _nested(node, schema: dict, prefix: str, where: str) -> dict:
    node = _mapping(node, prefix.rstrip("."), where)
    for key in node:
        if key not in schema:
            raise _unknown(key, prefix, schema, where)
    out = {}
    for key, rule in schema.items():
        if isinstance(rule, dict):
            out[key] = _nested(node.get(key), rule, f"{prefix}{key}.", where)
        else:
            out.update(_block({key: node[key]} if key in node else {}, {key: rule}, prefix, where))
    return out


def _stages(node, where: str) -> tuple[dict[str, dict], list[str]]:
    """``stages:`` -> (stage -> options as given, converted), stages switched off."""
    from .stages.registry import all_stages

    stages = all_stages()
    node = _mapping(node, "stages", where)
    options: dict[str, dict] = {}
    disabled = []
    for name, value in node.items():
        if name not in stages:
            raise _unknown(name, "stages.", stages, where)
        prefix = f"stages.{name}."
        if isinstance(value, bool):
            value = {"enabled": value}
        value = dict(_mapping(value, f"stages.{name}", where))
        for key in value:
            if f"{prefix}{key}" in MOVED:
                raise _unknown(key, prefix, [], where)
        enabled = convert(value.pop("enabled", True), bool, prefix + "enabled", where)
        if not enabled:
            disabled.append(name)
        parsed = stages[name].options.parse(value, where=where, prefix=prefix)
        options[name] = {k: getattr(parsed, k) for k in value}  # as given, converted: plans fill the defaults
    return options, disabled


def _run(node, where: str) -> list[str]:
    from .stages.registry import all_stages, pipelines

    known = [*pipelines(), *all_stages()]
    node = ["align"] if node is None else [node] if isinstance(node, str) else node
    if not isinstance(node, list):
        raise ConfigError(f"{where}: 'run' must be a list of pipelines or stages ({', '.join(known)}), got {node!r}")
    for name in node:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{where}: 'run' names {name!r}, which is no pipeline or stage{hint}; choose from {', '.join(known)}"
            )
    return list(node)


def load_config(path: str | Path) -> dict:
    """Read and validate a build config; relative paths are taken from the config file's folder.

    Returns ``{"store", "overwrite", "run", "input", "cluster", "stages" (stage -> options given),
    "disabled" (stages switched off), "report"}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    where = str(path)
    raw = _mapping(raw, "", where)
    for key in raw:
        if key not in TOP:
            raise _unknown(key, "", TOP, where)
    cfg = _block(
        {k: raw[k] for k in ("store", "overwrite") if k in raw},
        {"store": (str, REQUIRED), "overwrite": (bool, False)},
        "",
        where,
    )
    cfg["run"] = _run(raw.get("run"), where)
    cfg["input"] = _nested(raw.get("input"), input_schema(), "input.", where)
    cfg["cluster"] = _block(raw.get("cluster"), CLUSTER, "cluster.", where)
    cfg["stages"], cfg["disabled"] = _stages(raw.get("stages"), where)
    cfg["report"] = _block(raw.get("report"), REPORT, "report.", where)
    base = path.parent

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() or "://" in str(p) else (base / p))

    inp = cfg["input"]
    inp["path"] = [resolve(p) for p in inp["path"]] if isinstance(inp["path"], list) else resolve(inp["path"])
    inp["paste"] = [resolve(p) for p in inp["paste"]]
    for p in ([inp["path"]] if isinstance(inp["path"], str) else inp["path"]) + inp["paste"]:
        if not Path(p).exists():
            raise ConfigError(
                f"{path}: input.path / input.paste: {p} does not exist; fix the path (relative paths "
                f"are taken from the config file's folder {base})"
            )
    if isinstance(inp["images"], dict):
        images = {}
        for sid, value in inp["images"].items():
            entry = dict(value) if isinstance(value, dict) else {"path": value}
            if "path" not in entry:
                raise ConfigError(f"{path}: input.images.{sid}: give path (and pixel_size_um or image_to_section)")
            entry["path"] = resolve(str(entry["path"]))
            if not Path(entry["path"]).exists():
                raise ConfigError(
                    f"{path}: input.images.{sid}: {entry['path']} does not exist; fix the path (relative paths "
                    f"are taken from the config file's folder {base})"
                )
            images[str(sid)] = entry
        inp["images"] = images
    if inp["platform"] is not None:
        from .ingest.platforms import PLATFORMS

        if inp["platform"] not in PLATFORMS:
            raise ConfigError(f"{path}: input.platform {inp['platform']!r} is not one of {', '.join(PLATFORMS)}")
    cfg["store"] = resolve(cfg["store"])
    weights = cfg["stages"].get("register", {}).get("matcher_weights")
    if weights:
        cfg["stages"]["register"]["matcher_weights"] = resolve(weights)
    if cfg["report"]["out"]:
        cfg["report"]["out"] = resolve(cfg["report"]["out"])
    try:
        ingest_spec(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: input: {exc}") from exc
    return cfg


def ingest_spec(cfg: dict) -> IngestSpec:
    """The :class:`IngestSpec` of a validated config's ``input:`` block."""
    values = {}
    for f in dataclasses.fields(IngestSpec):
        node = cfg["input"]
        for part in f.metadata["config"].split("."):
            node = node[part]
        values[f.name] = node
    return IngestSpec(**values)

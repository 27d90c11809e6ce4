"""Stage options: one frozen dataclass per stage, the single source of each option's type, default and doc.

An option is a dataclass field made with :func:`option`; its annotation is the type every value is converted
through (``alpha_px: 8`` from YAML becomes ``8.0`` for a ``float`` option, a list becomes a tuple), so equal
settings hash equally whatever their source. Supported annotations: ``bool``, ``int``, ``float``, ``str``
(a path given as ``pathlib.Path`` becomes its string), ``dict``, ``Literal[...]``, ``tuple[T, ...]``,
``list[T]``, ``X | None`` and unions of these.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from ..errors import ConfigError, UnknownOptionError

_NAMES = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
    dict: "a mapping",
}


def option(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A stage option: ``default``, a one-line ``doc``, and optional bounds checked on every value."""
    return dataclasses.field(default=default, metadata={"doc": doc, "ge": ge, "gt": gt, "le": le})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of the stages' option dataclasses."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def parse(cls, values: dict | None = None, where: str = "", prefix: str = "") -> Options:
        """An instance from ``values`` (missing keys take their defaults), every value converted through its
        declared type and checked against its bounds; an unknown key is an :class:`UnknownOptionError`
        naming the known ones (and the closest). ``where`` (a file, a function) and ``prefix`` (the keys'
        place in a config, e.g. ``stages.register.``) only shape the messages."""
        import difflib

        values = dict(values or {})
        known = [f.name for f in cls.fields()]
        unknown = [k for k in values if k not in known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known: {', '.join(known)}"
            raise UnknownOptionError(f"{_where(where)}unknown option '{prefix}{unknown[0]}'{hint}")
        hints = cls.types()
        out = {}
        for f in cls.fields():
            if f.name not in values:
                continue
            key = prefix + f.name
            value = convert(values[f.name], hints[f.name], key, where)
            _check_bounds(value, f, key, where)
            out[f.name] = value
        return cls(**out)

    def to_dict(self) -> dict:
        """Option name -> value (tuples stay tuples; :func:`lamina.stages.runner.params_hash` lists them)."""
        return {f.name: getattr(self, f.name) for f in self.fields()}

    def replace(self, **changes) -> Options:
        return type(self).parse({**self.to_dict(), **changes})


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def type_name(tp) -> str:
    """Human words for an annotation (``a number or null``, ``one of auto, types``)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (tuple, list):
        arg = get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(arg, '(' + type_name(arg) + ')')}"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value, tp, key: str, where: str = ""):
    """``value`` converted through annotation ``tp`` or a :class:`ConfigError` naming ``key`` and the type."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        else:
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return convert(value, arg, key, where)
                except ConfigError:
                    continue
        raise _type_error(value, tp, key, where)
    if origin is Literal:
        if isinstance(value, (str, int, float, bool)) and value in get_args(tp):
            return value
        raise _type_error(value, tp, key, where)
    if origin is tuple:
        if hasattr(value, "ndim") and value.ndim == 1:  # a NumPy vector
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, where)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], key, where) for v in value)
        if len(args) != len(value):
            raise _type_error(value, tp, key, where)
        return tuple(convert(v, a, key, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, where)
        return [convert(v, get_args(tp)[0], key, where) for v in value]
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if hasattr(value, "dtype") and value.dtype.kind in "iu":  # numpy integers
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hasattr(value, "dtype") and value.dtype.kind in "iuf":
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # a path option given as a Path
            return os.fspath(value)
    else:
        raise ConfigError(f"{_where(where)}option '{key}' has an annotation lamina cannot check: {tp!r}")
    raise _type_error(value, tp, key, where)


def _type_error(value, tp, key: str, where: str) -> ConfigError:
    return ConfigError(f"{_where(where)}'{key}' must be {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_bounds(value, f: dataclasses.Field, key: str, where: str) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    meta = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        for bound, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
        ):
            limit = meta.get(bound)
            if limit is not None and not (math.isfinite(v) and ok(v, limit)):
                raise ConfigError(f"{_where(where)}'{key}' ({meta['doc']}) must be {word} {limit:g}, got {v!r}")


def describe(cls: type[Options]) -> list[dict]:
    """One row per option: name, type (in words), default, doc (what docs and ``lamina stages`` print)."""
    hints = cls.types()
    return [
        {"name": f.name, "type": type_name(hints[f.name]), "default": f.default, "doc": f.metadata.get("doc", "")}
        for f in cls.fields()
    ]

"""Canonical hashes of parameters: what a stage's completion record and an ingest's identity are made of."""

from __future__ import annotations

import hashlib
import json


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def params_hash(*parts) -> str:
    """SHA-256 of the canonical JSON of ``parts`` (dict keys sorted, paths and numpy values stringified)."""
    blob = json.dumps(jsonable(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()

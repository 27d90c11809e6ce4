"""torch state_dicts <-> Zarr arrays: model weights and optimizer state live in the store, never in pickles.

A flat ``{name: tensor | number}`` mapping is written as one array per entry (0-d values as shape ``[1]``
with attr ``scalar``); nested optimizer state is flattened with dotted keys by :func:`flatten`.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

from . import arrays


def write_state(group: zarr.Group, state: dict) -> None:
    """Write ``{name: tensor or number}`` into ``group`` (replacing arrays of the same name)."""
    for name, value in state.items():
        v = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        scalar = v.ndim == 0
        arr = arrays.write_small(group, name, v.reshape(1) if scalar else v, [f"d{i}" for i in range(max(v.ndim, 1))])
        arr.attrs["scalar"] = bool(scalar)


def read_state(group: zarr.Group) -> dict[str, torch.Tensor]:
    """Inverse of :func:`write_state`: ``{name: tensor}`` (0-d for scalars)."""
    out = {}
    for name in sorted(group.array_keys()):
        arr = arrays.get_array(group, name)
        v = np.asarray(arr[...])
        out[name] = torch.from_numpy(v.reshape(()) if arr.attrs.get("scalar") else v.copy())
    return out


def flatten(state: dict, prefix: str = "") -> dict:
    """Nested dict of tensors/numbers -> ``{"a.b.c": value}``; lists/other leaves are left to the caller."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """An optimizer's per-parameter tensors as a flat dict (hyper-parameters come from the code, not the store)."""
    return flatten({str(i): s for i, s in opt.state_dict()["state"].items()}, "state.")


def load_optimizer_state(opt: torch.optim.Optimizer, flat: dict) -> None:
    """Inverse of :func:`optimizer_state` for an optimizer built with the same parameters and settings."""
    sd = opt.state_dict()
    state: dict = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)

"""Pretrained image encoders from a local path only: nothing is downloaded, nothing is unpickled.

Weights are read from ``.safetensors`` or with ``torch.load(weights_only=True)`` (``.pt``, ``.pth``, ``.bin``:
tensors only; a full pickle of a model, as some published checkpoints are, is refused with its reason). The
architecture is rebuilt from the weights' shapes (:class:`lamina.kernels.vit.ViT`, timm's ViT layout: e.g. UNI's
``pytorch_model.bin``). A worker keeps the last models it built (keyed by path, size and mtime), so its tiles do
not reload a large model each.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import InputError

#: key prefixes that wrappers (DataParallel, Lightning, timm's "model." exports) put before timm's names
PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def fingerprint(path) -> list:
    """What identifies a weights file for the stage hash: resolved path, size, mtime (ns)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"encoder weights {p} do not exist; give the local path of a .safetensors or .pt/.bin file")
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def load_state(path) -> dict:
    """The tensors of ``path`` by name (``state_dict`` / ``model`` wrappers and :data:`PREFIXES` removed)."""
    import torch

    p = Path(path)
    fingerprint(p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, torch and pickle raise many types for a bad or unsafe file
        raise InputError(
            f"encoder weights {p}: not readable as tensors ({type(exc).__name__}: {str(exc)[:200]}); lamina reads "
            f".safetensors or a weights-only torch file (a state_dict), never a pickled model"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"encoder weights {p}: not a state_dict (a mapping of names to tensors)")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


@functools.lru_cache(maxsize=2)
def _cached(path: str, size: int, mtime: int, heads: int | None, device: str):
    from .kernels.vit import ViT

    state = load_state(path)
    try:
        model = ViT.from_state_dict({k: v.float() for k, v in state.items()}, heads)
    except KeyError as exc:
        raise InputError(
            f"encoder weights {path}: key {exc.args[0]!r} is missing; lamina builds a ViT in timm's layout "
            f"(patch_embed.proj, pos_embed, cls_token, blocks.N.attn.qkv, ...; e.g. UNI)"
        ) from exc
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"encoder weights {path}: {exc}") from exc
    return model.to(device)


def vit_encoder(path, heads: int | None = None, device: str = "cpu"):
    """The ViT whose weights are at ``path`` (built once per worker and file version), in eval mode."""
    _, size, mtime = fingerprint(path)
    return _cached(str(Path(path).resolve()), size, mtime, heads, device)


def encoder_features(
    block,
    origin: tuple[int, int] = (0, 0),
    *,
    factor: int,
    path: str,
    heads: int | None,
    shape_sp: tuple[int, int],
    halo_sp: int,
    mean=None,
    components=None,
):
    """A foundation model's patch tokens per superpixel of an image block ``[C, H, W]`` (superpixels of
    ``factor`` px; the block starts at pixel ``origin`` of an image of ``shape_sp`` superpixels): the image is
    resampled so one ``P x P`` patch is one superpixel, tokens come from windows on the image's global grid
    (:func:`lamina.kernels.vit.patch_token_map`) -> ``[D, h, w]``, or ``[k, h, w]`` projected on ``components``
    ``[k, D]`` after removing ``mean`` ``[D]`` (float32)."""
    import numpy as np
    import torch

    from .kernels.vit import patch_pixels, patch_token_map

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = vit_encoder(path, heads, device)
    rgb = patch_pixels(block, factor, model.patch).to(device)
    tokens = patch_token_map(model, rgb, (origin[0] // factor, origin[1] // factor), shape_sp, halo_sp)
    D, h, w = tokens.shape
    t = tokens.reshape(D, -1).T.double().cpu().numpy()
    if components is not None:
        t = (t - np.asarray(mean)) @ np.asarray(components).T
    return t.T.reshape(-1, h, w).astype(np.float32)

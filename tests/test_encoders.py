"""Foundation-model weights from a local path: read as tensors only, a ViT rebuilt from their shapes, tokens
per superpixel that do not depend on the tiling."""

import numpy as np
import pytest
import torch
import zarr

import lamina
from lamina.encoders import encoder_features, load_state, vit_encoder
from lamina.kernels.vit import ViT, patch_pixels, patch_token_map, token_halo
from lamina.maps import map_tiles
from lamina.store import arrays


def _tiny(tmp_path, fmt="safetensors", reg=0, seed=0, **kw):
    torch.manual_seed(seed)
    model = ViT(dim=32, patch=4, depth=2, heads=2, hidden=64, grid=6, reg=reg, layer_scale=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path, model


def test_weights_load_as_tensors_into_the_architecture_their_shapes_give(tmp_path):
    st, model = _tiny(tmp_path)
    pt, _ = _tiny(tmp_path, "pt")
    a, b = vit_encoder(st, heads=2), vit_encoder(pt, heads=2)
    assert (a.dim, a.patch, a.grid, len(a.blocks)) == (32, 4, 6, 2)
    images = torch.rand(3, 3, 24, 24)
    with torch.inference_mode():
        ta, tb, tm = a(images), b(images), model.eval()(images)
    assert ta.shape == (3, 32, 6, 6)
    torch.testing.assert_close(ta, tb)
    torch.testing.assert_close(ta, tm)
    # a register token and position embeddings without the class token are read from the shapes too
    (tmp_path / "r").mkdir()
    r, _ = _tiny(tmp_path / "r", reg=4, embed_class=False)
    m = vit_encoder(r, heads=2)
    assert m.reg_token.shape == (1, 4, 32) and not m.embed_class and m.grid == 6


def test_unreadable_or_unsafe_weights_name_the_file_and_the_fix(tmp_path):
    st, model = _tiny(tmp_path)
    with pytest.raises(lamina.InputError, match="do not exist"):
        load_state(tmp_path / "none.safetensors")
    torch.save(model, tmp_path / "pickled.pt")  # a whole pickled model: refused, never unpickled
    with pytest.raises(lamina.InputError, match="never a pickled model"):
        load_state(tmp_path / "pickled.pt")
    state = load_state(st)
    del state["blocks.1.mlp.fc2.weight"]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(lamina.InputError, match="blocks.1.mlp.fc2.weight"):
        vit_encoder(tmp_path / "cut.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(lamina.InputError, match="not readable as tensors"):
        load_state(tmp_path / "junk.bin")


def test_tokens_per_superpixel_do_not_depend_on_the_tiling(tmp_path):
    path, _ = _tiny(tmp_path)
    factor, hs, ws = 3, 41, 35
    rng = np.random.default_rng(0)
    image = (rng.random((3, hs * factor - 2, ws * factor - 1)) * 255).astype(np.uint8)
    halo = token_halo(6)
    kw = {"factor": factor, "path": str(path), "heads": 2, "shape_sp": (hs, ws), "halo_sp": halo}
    whole = encoder_features(image, (0, 0), **kw)
    assert whole.shape == (32, hs, ws) and np.isfinite(whole).all()
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    arrays.create(root, "img", image.shape, np.uint8, (3, 50, 50), ("c", "y", "x"))[...] = image
    for tile in (9, 16):
        arrays.create(root, f"t{tile}", (32, hs, ws), np.float32, (32, tile, tile), ("f", "y", "x"))
        n = map_tiles(encoder_features, str(tmp_path / "t.zarr"), "img", f"t{tile}", halo=halo * factor,
                      factor=factor, batch_dims=0, with_origin=True, kwargs=kw)  # fmt: skip
        assert n == -(-hs // tile) * -(-ws // tile)
        np.testing.assert_allclose(root[f"t{tile}"][...], whole, atol=1e-5)
    # the projection keeps the leading directions: k columns of (tokens - mean) @ components.T
    comps = np.linalg.qr(rng.normal(size=(32, 5)))[0].T
    mean = whole.reshape(32, -1).mean(1)
    proj = encoder_features(image, (0, 0), mean=mean, components=comps, **kw)
    np.testing.assert_allclose(proj, np.einsum("kd,dyx->kyx", comps, whole - mean[:, None, None]), atol=1e-4)
    # too little context is refused, not silently different
    model = vit_encoder(path, 2)
    rgb = patch_pixels(image[:, 30:90, 30:90], factor, 4)
    with pytest.raises(ValueError, match="halo of 2 tokens is too small"):
        patch_token_map(model, rgb, (10, 10), (hs, ws), halo=2)

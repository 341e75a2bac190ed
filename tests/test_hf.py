"""DINO's ViT in and out of Hugging Face transformers' ViTModel layout (facebook/dino-vits16's):
our export loads in transformers (PyTorch, CPU) warning-free with add_pooling_layer=False and
gives our features, every token, at the stored size and, position embedding resized as
transformers resizes it, at another; a transformers ViTModel (safetensors, or a
pytorch_model.bin read without torch) loads into ours with its features; a q/k swap, a
spatially transposed patch kernel or a position embedding left behind breaks the bound; other
models and configs our ViT cannot run are refused, naming what was found."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers.parity import max_rel_err
from safetensors.numpy import load_file, save_file

from dino_jax.interop.hf import HFModelError, load_hf, save_hf
from dino_jax.interop.safetensors_io import abstract_variables
from dino_jax.models import DINOHead, MultiCropNetwork
from dino_jax.models.pos_embed import bicubic_matrix
from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32, both sides at full matmul precision
SIZE, OTHER = 16, 24  # the stored image size (4 x 4 patches) and another one (6 x 6)
VIT = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=4, img_size=SIZE)


def random_params(model, seed=0):
    """Random values everywhere (biases and LayerNorm offsets too, unlike an init)."""
    rng = np.random.default_rng(seed)
    shapes = abstract_variables(model)["params"]
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def images(size, seed=0):
    """(NHWC for us, NCHW for transformers) of the same random images."""
    x = np.random.default_rng(seed).normal(size=(3, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def our_tokens(model, params, x):
    """(B, 1 + N, D): the final-norm CLS and patch tokens of our ViT."""
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    return np.concatenate([np.asarray(out.cls)[:, None], np.asarray(out.patch_tokens)], axis=1)


def their_tokens(hf_model, x, **kw):
    with torch.no_grad():
        return hf_model(x, **kw).last_hidden_state.numpy()


def hf_resized(pos_embed, n):
    """transformers' interpolate_pos_encoding: bicubic by size (scale n / g), no offset."""
    g = int(np.sqrt(pos_embed.shape[1] - 1))
    m = bicubic_matrix(g, n, n / g).astype(np.float32)
    grid = pos_embed[0, 1:].reshape(g, g, -1)
    resized = np.einsum("rg,ghd,ch->rcd", m, grid, m).reshape(1, n * n, -1)
    return np.concatenate([pos_embed[:, :1], resized], axis=1)


def test_export_loads_in_transformers_with_our_features(tmp_path):
    params = random_params(VIT)
    network = MultiCropNetwork(backbone=VIT, head=DINOHead(out_dim=8, hidden_dim=8))
    save_hf(tmp_path, network, {"params": {"backbone": params, "head": {}}})  # head left out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    assert (config["hidden_size"], config["intermediate_size"], config["layer_norm_eps"]) == (
        32,
        128,
        1e-6,
    )
    hf, info = transformers.ViTModel.from_pretrained(
        tmp_path, add_pooling_layer=False, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    x, x_nchw = images(SIZE)
    theirs = their_tokens(hf.eval(), x_nchw)
    assert max_rel_err(our_tokens(VIT, params, x), theirs) < TOL
    # Another size: theirs resizes the position embedding by size, ours (the official
    # code's) by scale factor (n + 0.1) / g: the same once ours is given theirs.
    x, x_nchw = images(OTHER, seed=1)
    theirs = their_tokens(hf, x_nchw, interpolate_pos_encoding=True)
    at_other = VIT.clone(img_size=OTHER)
    resized = {**params, "pos_embed": hf_resized(np.asarray(params["pos_embed"]), OTHER // 4)}
    assert max_rel_err(our_tokens(at_other, resized, x), theirs) < TOL
    assert max_rel_err(our_tokens(VIT, params, x), theirs) > 100 * TOL
    # Without add_pooling_layer=False transformers adds a random pooler, DINO has none.
    _, info = transformers.ViTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}


def test_plausible_wrong_exports_break_the_bound(tmp_path):
    params = random_params(VIT, seed=2)
    save_hf(tmp_path / "right", VIT, {"params": params})
    x, x_nchw = images(SIZE, seed=2)
    ours = our_tokens(VIT, params, x)
    hf = transformers.ViTModel.from_pretrained(tmp_path / "right", add_pooling_layer=False)
    assert max_rel_err(ours, their_tokens(hf.eval(), x_nchw)) < TOL
    state = load_file(tmp_path / "right" / "model.safetensors")
    q, k = (f"encoder.layer.1.attention.attention.{n}.weight" for n in ("query", "key"))
    patch, pos = "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings"
    wrong = {
        "q and k swapped": {q: state[k], k: state[q]},
        "patch kernel H and W swapped": {patch: np.swapaxes(state[patch], 2, 3)},
        "position embedding left behind": {pos: np.zeros_like(state[pos])},
    }
    for what, changes in wrong.items():
        directory = tmp_path / what.replace(" ", "_")
        shutil.copytree(tmp_path / "right", directory)
        changed = {**state, **{n: np.ascontiguousarray(v) for n, v in changes.items()}}
        save_file(changed, directory / "model.safetensors", metadata={"format": "pt"})
        hf = transformers.ViTModel.from_pretrained(directory, add_pooling_layer=False)
        assert max_rel_err(ours, their_tokens(hf.eval(), x_nchw)) > 100 * TOL, what


@pytest.mark.parametrize(("qkv_bias", "eps"), [(True, 1e-12), (False, 1e-6)])
def test_transformers_model_loads_into_ours(tmp_path, qkv_bias, eps):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=48,
        image_size=SIZE,
        patch_size=8,
        qkv_bias=qkv_bias,
        layer_norm_eps=eps,  # 1e-12: what the facebook/dino-* configs hold
    )
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for tensor in hf.state_dict().values():
            tensor.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "st")
    model, variables = load_hf(tmp_path / "st")
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (24, 2, 3, 8)
    assert (model.mlp_ratio, model.qkv_bias, model.img_size) == (2.0, qkv_bias, SIZE)
    x, x_nchw = images(SIZE, seed=3)
    assert max_rel_err(our_tokens(model, variables["params"], x), their_tokens(hf, x_nchw)) < TOL
    # pytorch_model.bin (torch.save of transformers 5's state_dict names), read without torch
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, from_bin = load_hf(tmp_path / "bin")
    jax.tree.map(np.testing.assert_array_equal, from_bin, variables)


def write_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def test_other_models_and_configs_are_refused(tmp_path):
    save_hf(tmp_path, VIT, {"params": random_params(VIT)})
    load_hf(tmp_path)  # as written: fine
    refusals = {
        "dinov2": ({"model_type": "dinov2"}, r"model_type is 'dinov2', DINOv2.*model_type 'vit'"),
        "classifier": (
            {"architectures": ["ViTForImageClassification"]},
            r"ViTForImageClassification.*model\.vit\.save_pretrained",
        ),
        "values": (
            {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "image_size": [16, 24]},
            r"hidden_act is 'gelu_new'(.|\n)*layer_norm_eps is 1e-05(.|\n)*image_size is \[16",
        ),
        "depth": (
            {"num_hidden_layers": 3},
            r"encoder\.layer\.2\.attention\.attention\.key\.bias is missing",
        ),
        "grid": ({"image_size": 32}, r"pos_embed has shape \(1, 17, 32\), expected \(1, 65, 32\)"),
    }
    for what, (changes, message) in refusals.items():
        case = tmp_path / what
        shutil.copytree(tmp_path, case, ignore=shutil.ignore_patterns(*refusals))
        write_config(case, **changes)
        with pytest.raises(HFModelError, match=message):
            load_hf(case)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HFModelError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(HFModelError, match=r"no config\.json"):
        load_hf(tmp_path)


def test_unsupported_exports_and_tensors_are_refused(tmp_path):
    resnet = ResNet(stem_width=4, widths=(4, 8, 8, 8), depths=(1, 1, 1, 1))
    with pytest.raises(HFModelError, match=r"ResNet \(resnet\).*layout='official'"):
        save_hf(tmp_path, resnet, {"params": {}})
    params = random_params(VIT)
    with pytest.raises(HFModelError, match=r"params/pos_embed is missing"):
        save_hf(tmp_path, VIT, {"params": {k: v for k, v in params.items() if k != "pos_embed"}})
    save_hf(tmp_path, VIT, {"params": params})
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layer.0.attention.attention.extra.weight"] = np.zeros(2, np.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFModelError, match=r"attention\.extra\.weight is not part of DINO's ViT"):
        load_hf(tmp_path)


def test_a_tanh_gelu_model_exports_as_transformers_tanh_gelu_and_back(tmp_path):
    """model.gelu='tanh' is transformers' 'gelu_pytorch_tanh': same features both ways; the
    exact-GELU reading of the same weights is measurably off."""
    tanh_vit = VIT.clone(gelu="tanh")
    params = random_params(tanh_vit)
    save_hf(tmp_path, tanh_vit, {"params": params})
    assert json.loads((tmp_path / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    hf = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    x, x_nchw = images(SIZE)
    theirs = their_tokens(hf, x_nchw)
    assert max_rel_err(our_tokens(tanh_vit, params, x), theirs) < TOL
    assert max_rel_err(our_tokens(VIT, params, x), theirs) > 10 * TOL
    model, _ = load_hf(tmp_path)
    assert model.gelu == "tanh"

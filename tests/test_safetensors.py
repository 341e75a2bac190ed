"""Our weights as .safetensors files: a ViT network with a BatchNorm head, a ResNet and an XCiT
(both with BatchNorm statistics), DINOv2's and DINOv3's ViTs go through either layout (DINOv3's:
the Flax one) bit for bit, float32 and bfloat16, module included; the official layout is the
official state dict (names, layouts, dtypes) for safetensors' own numpy and torch readers; bad
variables, foreign files and tampered files are refused with the reason."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dino_jax.interop.dinov2 import dinov2_state_dict
from dino_jax.interop.official import official_state_dict
from dino_jax.interop.safetensors_io import (
    LAYOUTS,
    SafetensorsFileError,
    abstract_variables,
    load_safetensors,
    save_safetensors,
)
from dino_jax.models import DINOHead, MultiCropNetwork
from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import VisionTransformer
from dino_jax.models.vit2 import DinoVisionTransformer
from dino_jax.models.vit3 import VisionTransformer3
from dino_jax.models.xcit import XCiT


def vit_network(param_dtype=jnp.float32):
    vit = VisionTransformer(
        patch_size=4, embed_dim=16, depth=2, num_heads=2, img_size=16, param_dtype=param_dtype
    )
    head = DINOHead(out_dim=32, use_bn=True, hidden_dim=16, bottleneck_dim=8)
    return MultiCropNetwork(backbone=vit, head=head)


MODELS = {
    "vit_network": vit_network,
    "resnet": lambda: ResNet(stem_width=4, widths=(4, 8, 8, 8), depths=(1, 1, 1, 1)),
    "xcit": lambda: XCiT(patch_size=8, embed_dim=16, depth=1, num_heads=2),
    "vit_bfloat16": lambda: vit_network(jnp.bfloat16).backbone,
    "dinov2": lambda: DinoVisionTransformer(
        patch_size=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        img_size=16,
        num_register_tokens=2,
        init_values=1.0,
        ffn="swiglufused",
    ),
    "dinov3": lambda: VisionTransformer3(
        patch_size=4, embed_dim=16, depth=1, num_heads=2, n_storage_tokens=1
    ),
}
ROUND_TRIPS = [
    (n, layout) for n in MODELS for layout in LAYOUTS if (n, layout) != ("dinov3", "official")
]


def random_variables(model, seed=0):
    """Random values of the module's shapes and dtypes (BatchNorm statistics too: variances
    positive, counts ints), so that no value is a default that hides a misplaced tensor."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if np.issubdtype(leaf.dtype, np.integer):
            return np.asarray(rng.integers(1, 1000), leaf.dtype).reshape(leaf.shape)
        values = rng.normal(size=leaf.shape)
        return np.asarray(np.abs(values) if "'var'" in name else values).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model))


def assert_bit_identical(a, b):
    flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        assert x.tobytes() == y.tobytes(), where


@pytest.mark.parametrize(("name", "layout"), ROUND_TRIPS)
def test_round_trip_is_bit_identical(tmp_path, name, layout):
    model = MODELS[name]()
    variables = random_variables(model)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model, variables, layout=layout)
    loaded, back = load_safetensors(path)
    assert loaded == model  # the same class and fields, dtypes included
    assert_bit_identical(variables, back)
    assert set(back) == set(variables)  # batch_stats exactly where the module has them


@pytest.mark.parametrize("name", ["vit_network", "resnet", "xcit", "vit_bfloat16", "dinov2"])
def test_official_layout_is_the_official_state_dict(tmp_path, name):
    import torch
    from safetensors.torch import load_file as torch_load_file

    model = MODELS[name]()
    variables = random_variables(model, seed=1)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model, variables, layout="official")
    network = isinstance(model, MultiCropNetwork)
    params, stats = variables["params"], variables.get("batch_stats")
    if not network:  # a backbone alone: the released *_pretrain.pth names, no prefix
        params, stats = {"backbone": params}, stats and {"backbone": stats}
    expected = {
        (k if network else k.removeprefix("backbone.")): v
        for k, v in official_state_dict(params, batch_stats=stats).items()
    }
    if name == "dinov2":  # the released DINOv2 backbone's names (interop/dinov2.py)
        assert expected.keys() == dinov2_state_dict(variables["params"]).keys()
    found = load_file(path)
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert (found[key].dtype, found[key].shape) == (value.dtype, value.shape), key
        assert found[key].tobytes() == value.tobytes(), key
    some = {"vit_network": "backbone.blocks.1.attn.qkv.weight", "resnet": "conv1.weight"}
    some.update(xcit="blocks.0.attn.temperature", vit_bfloat16="patch_embed.proj.weight")
    some.update(dinov2="blocks.0.ls1.gamma")
    assert some[name] in found
    if name == "resnet":
        assert found["bn1.num_batches_tracked"].dtype == np.int64  # torch's dtype
    # torch's reader gets the same tensors (bfloat16 as torch.bfloat16)
    tensors = torch_load_file(path)
    for key, value in expected.items():
        t = tensors[key]
        if value.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16, key
            t = t.view(torch.int16)
            value = value.view(np.int16)
        np.testing.assert_array_equal(t.numpy(), value, err_msg=key)


def test_metadata_describes_the_module(tmp_path):
    from safetensors import safe_open

    model = MODELS["resnet"]()
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model, random_variables(model), layout="official")
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    assert meta["dino_jax.layout"] == "official" and meta["dino_jax.family"] == "resnet"
    described = json.loads(meta["dino_jax.model"])
    assert described["class"] == "ResNet"
    assert described["fields"]["widths"] == [4, 8, 8, 8]
    assert described["fields"]["param_dtype"] == {"dtype": "float32"}


def test_load_overrides_backbone_fields(tmp_path):
    model = MODELS["vit_network"]()
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model, random_variables(model))
    loaded, _ = load_safetensors(path, dtype=jnp.bfloat16, attention_impl="xla")
    assert loaded.backbone.dtype == jnp.bfloat16 and loaded.backbone.attention_impl == "xla"
    assert loaded.head == model.head
    with pytest.raises(SafetensorsFileError, match="no field"):
        load_safetensors(path, attention="xla")


def test_variables_that_are_not_the_modules_are_refused_before_writing(tmp_path):
    model = MODELS["resnet"]()
    variables = random_variables(model)
    path = tmp_path / "w.safetensors"
    with pytest.raises(SafetensorsFileError, match=r"batch_stats/bn1/mean is missing"):
        save_safetensors(path, model, {"params": variables["params"]})
    wrong = MODELS["xcit"]()
    with pytest.raises(SafetensorsFileError, match="not those of the XCiT"):
        save_safetensors(path, wrong, variables)
    with pytest.raises(SafetensorsFileError, match="layout"):
        save_safetensors(path, model, variables, layout="torch")
    dinov3 = VisionTransformer3(patch_size=4, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(SafetensorsFileError, match=r"DINOv3.*layout='flax'"):
        save_safetensors(path, dinov3, {}, layout="official")
    with pytest.raises(SafetensorsFileError, match="neither one of our backbones"):
        save_safetensors(path, DINOHead(out_dim=8), {})
    assert not path.exists()


def test_foreign_and_tampered_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, foreign)
    with pytest.raises(SafetensorsFileError, match="not written by save_safetensors"):
        load_safetensors(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SafetensorsFileError, match="not a readable"):
        load_safetensors(junk)
    # our description, with one tensor of another shape and one missing
    model = MODELS["xcit"]()
    path = tmp_path / "w.safetensors"
    save_safetensors(path, model, random_variables(model))
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    tensors = load_file(path)
    del tensors["params/cls_token"]
    tensors["params/pos_embeder/token_projection/bias"] = np.zeros(3, np.float32)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(SafetensorsFileError) as err:
        load_safetensors(path)
    assert "params/cls_token is missing" in str(err.value)
    assert "token_projection/bias has shape (3,)" in str(err.value)
    meta["dino_jax.model"] = json.dumps({"class": "os.system", "fields": {}})
    save_file(tensors, path, metadata=meta)
    with pytest.raises(SafetensorsFileError, match="not one of"):
        load_safetensors(path)

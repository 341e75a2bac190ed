"""ViT initialisation, stochastic depth, dtypes and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.models import DINOHead, MultiCropNetwork, VisionTransformer, build_vit


@pytest.fixture(scope="module")
def small():
    model = VisionTransformer(patch_size=8, embed_dim=64, depth=3, num_heads=4, img_size=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return model, params


def test_official_initialisation(small):
    _, params = small
    p = params["params"]
    for name in ("qkv", "proj"):
        w = np.asarray(p["blocks_0"]["attn"][name]["kernel"])
        assert abs(w.std() - 0.02) < 2e-3 and abs(w.mean()) < 2e-3
        np.testing.assert_array_equal(p["blocks_0"]["attn"][name]["bias"], 0.0)
    for name in ("cls_token", "pos_embed"):
        assert abs(np.asarray(p[name]).std() - 0.02) < 4e-3
    # patch embedding keeps PyTorch's default conv init: U(+-1/sqrt(3 * 8 * 8))
    bound = (3 * 8 * 8) ** -0.5
    for leaf in ("kernel", "bias"):
        w = np.asarray(p["patch_embed"]["proj"][leaf])
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    np.testing.assert_array_equal(p["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["norm"]["bias"], 0.0)


def test_drop_path_only_in_training(small):
    model, params = small
    dropping = VisionTransformer(
        patch_size=8, embed_dim=64, depth=3, num_heads=4, img_size=32, drop_path_rate=0.5
    )
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    eval_out = dropping.apply(params, x).cls
    np.testing.assert_array_equal(eval_out, model.apply(params, x).cls)
    a = dropping.apply(params, x, train=True, rngs={"drop_path": jax.random.key(2)}).cls
    b = dropping.apply(params, x, train=True, rngs={"drop_path": jax.random.key(3)}).cls
    assert not np.allclose(a, b)
    # per-sample: some images keep every branch of the first block, others differ
    assert not np.allclose(a, eval_out)
    # rate 0 in the first block (linspace starts at 0): a depth-1 net never drops
    one = VisionTransformer(
        patch_size=8, embed_dim=64, depth=1, num_heads=4, img_size=32, drop_path_rate=0.9
    )
    p1 = one.init(jax.random.key(0), x[:1])
    np.testing.assert_array_equal(
        one.apply(p1, x, train=True, rngs={"drop_path": jax.random.key(4)}).cls,
        one.apply(p1, x).cls,
    )


def test_bfloat16_compute_with_float32_params(small):
    _, params = small
    bf16 = VisionTransformer(
        patch_size=8, embed_dim=64, depth=3, num_heads=4, img_size=32, dtype=jnp.bfloat16
    )
    x = jax.random.normal(jax.random.key(1), (4, 48, 40, 3))
    out16 = bf16.apply(params, x, return_attention=True)
    out32 = VisionTransformer(patch_size=8, embed_dim=64, depth=3, num_heads=4, img_size=32).apply(
        params, x, return_attention=True
    )
    assert out16.cls.dtype == jnp.bfloat16 and out16.attention.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(out16.cls.astype(jnp.float32), out32.cls, atol=0.1)


def test_network_logits_float32_from_bfloat16_head():
    net = MultiCropNetwork(
        backbone=build_vit("vit_tiny", patch_size=8, img_size=16, depth=1, dtype=jnp.bfloat16),
        head=DINOHead(out_dim=32, hidden_dim=16, bottleneck_dim=8, dtype=jnp.bfloat16),
    )
    crops = [jnp.zeros((2, 2, 16, 16, 3)), jnp.zeros((2, 3, 8, 8, 3))]
    params = net.init(jax.random.key(0), crops)
    logits = net.apply(params, crops)
    assert logits.shape == (5, 2, 32) and logits.dtype == jnp.float32


def test_bad_inputs_are_refused(small):
    model, params = small
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.apply(params, jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="n_last_blocks"):
        model.apply(params, jnp.zeros((1, 32, 32, 3)), n_last_blocks=4)
    with pytest.raises(ValueError, match="unknown arch"):
        build_vit("vit_huge")

"""DINOv3 parity (tests/fixtures/dinov3.npz): RoPE, the RoPE block and ViT, the Gram loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import max_rel_err, nchw_to_nhwc
from jax.sharding import PartitionSpec

from dino_jax import parallel
from dino_jax.gram import gram_loss
from dino_jax.models import rope, vit3, vit3_layers

TOL = 1e-5  # acceptance: max abs error <= 1e-5 * max |reference|
# bfloat16 RoPE: the official computes every op in float32 and rounds it to bfloat16. A
# faithful port can then differ only where its float32 sin / cos (or a division) falls on
# the other side of a bfloat16 rounding boundary: one bfloat16 step, 2**-8 for values in
# [0.5, 1) (|sin|, |cos| <= 1, max |ref| = 1). The fixture's float32-vs-float64 deviations
# of the float32 cases (<= 6.3e-7) are 1/6000 of that step, so they cannot add a second one.
BF16_TOL = 2.0**-8
GRIDS = ((4, 4), (3, 5))
HEAD_DIM = 16
N_PREFIX = 5  # CLS + 4 storage tokens in the block fixture


@pytest.fixture(scope="module")
def data(fixtures_dir):
    return np.load(fixtures_dir / "dinov3.npz")


@pytest.fixture(scope="module")
def meta(data):
    return json.loads(str(data["meta"]))


def _rope_kwargs(case: dict) -> dict:
    return dict(
        head_dim=HEAD_DIM,
        base=case["base"],
        min_period=case.get("min_period"),
        max_period=case.get("max_period"),
        normalize_coords=case["normalize_coords"],
        dtype=jnp.bfloat16 if case["dtype"] == "torch.bfloat16" else jnp.float32,
    )


def _sin_cos(case: dict, h: int, w: int):
    s, c = rope.rope_embedding(h, w, **_rope_kwargs(case))
    return np.asarray(s, np.float32), np.asarray(c, np.float32)


FP32_CASES = (
    "base100_separate_fp32",
    "base100_max_fp32",
    "base100_min_fp32",
    "period_0.5_40_separate_fp32",
)


@pytest.mark.parametrize("name", FP32_CASES)
def test_rope_sin_cos_match_official(data, meta, name):
    case = meta["rope"]["cases"][name]
    kw = _rope_kwargs(case)
    periods = rope.rope_periods(
        HEAD_DIM, base=kw["base"], min_period=kw["min_period"], max_period=kw["max_period"]
    )
    assert max_rel_err(periods, data[f"out/rope/{name}/periods"]) <= TOL
    for h, w in GRIDS:
        sin, cos = _sin_cos(case, h, w)
        assert max_rel_err(sin, data[f"out/rope/{name}/sin_{h}x{w}"]) <= TOL, (h, w)
        assert max_rel_err(cos, data[f"out/rope/{name}/cos_{h}x{w}"]) <= TOL, (h, w)


def test_rope_wrong_layouts_fail(data, meta):
    """The 3x5 grid separates the coordinate conventions the 4x4 one cannot."""
    ref = data["out/rope/base100_separate_fp32/sin_3x5"]
    case = meta["rope"]["cases"]["base100_separate_fp32"]
    sin, _ = _sin_cos(case, 3, 5)
    # columns before rows (meshgrid "xy" order)
    swapped = _sin_cos(case, 5, 3)[0].reshape(5, 3, HEAD_DIM).transpose(1, 0, 2).reshape(15, -1)
    assert max_rel_err(swapped, ref) > TOL
    # interleaved layout: each angle repeated in place instead of the half tiled
    interleaved = np.repeat(sin[:, : HEAD_DIM // 2], 2, axis=-1)
    assert max_rel_err(interleaved, ref) > TOL
    # "max" normalisation where "separate" is asked for
    wrong = _sin_cos({**case, "normalize_coords": "max"}, 3, 5)[0]
    assert max_rel_err(wrong, ref) > TOL


def test_rope_bfloat16_matches_official(data, meta):
    name = "base100_separate_bf16"
    case = meta["rope"]["cases"][name]
    periods = rope.rope_periods(HEAD_DIM, base=100.0, dtype=jnp.bfloat16)
    assert periods.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(periods, np.float32), data[f"out/rope/{name}/periods"])
    fp32 = meta["rope"]["cases"]["base100_separate_fp32"]
    wrong_errs = {"float32, rounded at the end": 0.0, "bfloat16 with a bfloat16 2 pi": 0.0}
    for h, w in GRIDS:
        sin, cos = _sin_cos(case, h, w)
        ref_sin, ref_cos = (
            data[f"out/rope/{name}/sin_{h}x{w}"],
            data[f"out/rope/{name}/cos_{h}x{w}"],
        )
        assert max_rel_err(sin, ref_sin) <= BF16_TOL
        assert max_rel_err(cos, ref_cos) <= BF16_TOL
        # Wrong variants: float32 arithmetic rounded only at the end, and bfloat16 arrays
        # with JAX's weak-typed scalars (2 pi rounded to bfloat16 first; torch keeps the
        # Python scalar in float32; on the 4x4 grid that happens to give the same values).
        variants = {
            "float32, rounded at the end": (
                jnp.asarray(v).astype(jnp.bfloat16) for v in _sin_cos(fp32, h, w)
            ),
            "bfloat16 with a bfloat16 2 pi": _naive_bf16_sin_cos(h, w),
        }
        for variant, (s, c) in variants.items():
            err = max(max_rel_err(s, ref_sin), max_rel_err(c, ref_cos))
            wrong_errs[variant] = max(wrong_errs[variant], err)
    assert min(wrong_errs.values()) > BF16_TOL, wrong_errs


def _naive_bf16_sin_cos(h, w):
    bf16 = jnp.bfloat16
    periods = jnp.asarray(100.0, bf16) ** (2 * jnp.arange(4, dtype=bf16) / 8)
    ch = (jnp.arange(h, dtype=bf16) + 0.5) / h
    cw = (jnp.arange(w, dtype=bf16) + 0.5) / w
    coords = jnp.stack(jnp.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2) * 2 - 1
    angles = jnp.tile((2 * np.pi * coords[:, :, None] / periods).reshape(h * w, -1), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def _interleaved_rotate(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)


def _fp32_rope_4x4():
    return rope.rope_embedding(4, 4, head_dim=HEAD_DIM, base=100.0)


def test_rope_apply_matches_official(data):
    q, ref = data["in/rope_apply/q"], data["out/rope_apply/q_rotated"]  # (B, heads, HW, hd)
    sin, cos = _fp32_rope_4x4()
    assert max_rel_err(rope.rope_apply(q, sin, cos), ref) <= TOL
    # the same through apply_rope in our (B, N, heads, hd) layout, no prefix tokens
    q_ours = jnp.swapaxes(q, 1, 2)
    rotated, _ = rope.apply_rope(q_ours, q_ours, sin, cos)
    assert max_rel_err(jnp.swapaxes(rotated, 1, 2), ref) <= TOL
    assert max_rel_err(q * cos + _interleaved_rotate(q) * sin, ref) > TOL


def _block_model():
    return vit3_layers.Block(
        num_heads=3,
        ffn_layer="swiglu64",
        qkv_bias=True,
        mask_k_bias=True,
        layerscale_init=1e-5,
        norm_eps=1e-5,
    )


def _state_dict(data, prefix):
    return {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/" + prefix)}


def test_block_matches_official(data):
    model = _block_model()
    params = {"params": vit3.from_official_state_dict(model, _state_dict(data, "block/"), "block/")}
    x = data["in/block/x"]
    sin_cos = _fp32_rope_4x4()
    assert max_rel_err(model.apply(params, x, sin_cos), data["out/block/out_rope"]) <= TOL
    assert max_rel_err(model.apply(params, x, None), data["out/block/out_norope"]) <= TOL


def test_rope_attention_matches_official(data, monkeypatch):
    """`out/block/attn_*` is `block.attn(x, rope)` on the raw x (no norm1). The block output
    is mostly its residual (RoPE moves it by only 6.5e-5 relative), so the wrong variants
    are measured here, on the attention output itself."""
    attn = vit3_layers.RopeAttention(num_heads=3, mask_k_bias=True)
    params = vit3.from_official_state_dict(_block_model(), _state_dict(data, "block/"), "block/")
    variables = {"params": params["attn"]}
    x, ref = data["in/block/x"], data["out/block/attn_rope"]
    sin, cos = _fp32_rope_4x4()
    assert max_rel_err(attn.apply(variables, x, (sin, cos)), ref) <= TOL
    assert max_rel_err(attn.apply(variables, x, None), data["out/block/attn_norope"]) <= TOL

    wrong = {}
    # CLS and storage tokens rotated too (given the first patch's position)
    pad = lambda t: jnp.concatenate([jnp.repeat(t[:1], N_PREFIX, 0), t])
    wrong["prefix rotated"] = attn.apply(variables, x, (pad(sin), pad(cos)))
    wrong["no rope"] = attn.apply(variables, x, None)
    unmasked = vit3_layers.RopeAttention(num_heads=3, mask_k_bias=False)
    wrong["k bias used"] = unmasked.apply(variables, x, (sin, cos))
    with monkeypatch.context() as m:
        m.setattr(rope, "rotate_half", _interleaved_rotate)
        wrong["interleaved"] = attn.apply(variables, x, (sin, cos))
    errs = {k: max_rel_err(v, ref) for k, v in wrong.items()}
    assert min(errs.values()) > TOL, errs


def _vit3(meta, **overrides):
    c = meta["vit3"]["ctor"]
    kw = dict(
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        ffn_ratio=c["ffn_ratio"],
        ffn_layer=c["ffn_layer"],
        norm_layer=c["norm_layer"],
        qkv_bias=c["qkv_bias"],
        mask_k_bias=c["mask_k_bias"],
        layerscale_init=c["layerscale_init"],
        n_storage_tokens=c["n_storage_tokens"],
        rope_base=c["pos_embed_rope_base"],
        rope_normalize_coords=c["pos_embed_rope_normalize_coords"],
        rope_rescale_coords=c["pos_embed_rope_rescale_coords"],
        rope_dtype=c["pos_embed_rope_dtype"],
    )
    return vit3.VisionTransformer3(**{**kw, **overrides})


VIT3_OUTPUTS = {
    "cls": "x_norm_clstoken",
    "storage_tokens": "x_storage_tokens",
    "patch_tokens": "x_norm_patchtokens",
    "prenorm": "x_prenorm",
}
VIT3_CASES = {"x64": ("x64", None), "x48x80": ("x48x80", None), "x64_masked": ("x64", "masks_x64")}


def test_vit3_matches_official(data, meta):
    """One set of parameters on a 4x4 and a 3x5 patch grid: no position table to resize."""
    model = _vit3(meta)
    sd = _state_dict(data, "vit3/")
    params = {"params": vit3.from_official_state_dict(model, sd, "vit3/")}
    assert "pos_embed" not in params["params"]
    for case, (x_name, mask_name) in VIT3_CASES.items():
        x = jnp.asarray(nchw_to_nhwc(data[f"in/vit3/{x_name}"]))
        masks = None if mask_name is None else jnp.asarray(data[f"in/vit3/{mask_name}"])
        out = jax.jit(model.apply)(params, x, masks=masks)
        for ours, theirs in VIT3_OUTPUTS.items():
            ref = data[f"out/vit3/{case}/{theirs}"]
            assert max_rel_err(getattr(out, ours), ref) <= TOL, (case, ours)
        np.testing.assert_array_equal(out.feature, out.cls)
    # Wrong variants on the 3x5 grid: aspect-keeping "max" coordinates, an unmasked k bias.
    x = jnp.asarray(nchw_to_nhwc(data["in/vit3/x48x80"]))
    ref = data["out/vit3/x48x80/x_norm_patchtokens"]
    for wrong in (dict(rope_normalize_coords="max"), dict(mask_k_bias=False)):
        out = _vit3(meta, **wrong).apply(params, x)
        assert max_rel_err(out.patch_tokens, ref) > TOL, wrong


def test_vit3_init_has_the_official_parameters(data, meta):
    model = _vit3(meta)
    imported = vit3.from_official_state_dict(model, _state_dict(data, "vit3/"), "vit3/")
    x = jnp.zeros((1, 48, 80, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, imported)
    # bfloat16 compute (float32 params) runs and gives bfloat16 features
    out = _vit3(meta, dtype=jnp.bfloat16).apply({"params": imported}, x)
    assert out.feature.dtype == jnp.bfloat16 and out.patch_tokens.shape == (1, 15, 48)


def test_official_buffers_are_checked(data, meta):
    model = _vit3(meta)
    sd = _state_dict(data, "vit3/")
    nan_mask = {**sd, "vit3/blocks.0.attn.qkv.bias_mask": np.full(144, np.nan, np.float32)}
    with pytest.raises(ValueError, match="k-bias mask"):
        vit3.from_official_state_dict(model, nan_mask, "vit3/")
    with pytest.raises(ValueError, match="periods"):
        vit3.from_official_state_dict(_vit3(meta, rope_base=10.0), sd, "vit3/")


def test_vit3_training_mode_draws_rope_rescale_and_subset_drop_path(data, meta):
    model = _vit3(meta, drop_path_rate=0.5)
    params = {"params": vit3.from_official_state_dict(model, _state_dict(data, "vit3/"), "vit3/")}
    x = jnp.asarray(nchw_to_nhwc(data["in/vit3/x64"]))
    eval_out = model.apply(params, x).prenorm

    def train(seed):
        keys = jax.random.split(jax.random.key(seed))
        rngs = {"rope": keys[0], "drop_path": keys[1]}
        return model.apply(params, x, train=True, rngs=rngs).prenorm

    np.testing.assert_array_equal(train(0), train(0))  # a pure function of the keys
    assert max_rel_err(train(0), train(1)) > TOL
    assert max_rel_err(train(0), eval_out) > TOL
    with pytest.raises(Exception, match="rope"):
        model.apply(params, x, train=True, rngs={"drop_path": jax.random.key(0)})


def test_rope_coordinate_augmentations():
    coords = rope.rope_coords(4, 6)  # even sides: no coordinate is 0
    key = jax.random.key(3)
    shifted = rope.augment_coords(coords, key, shift=0.1)
    delta = np.asarray(shifted - coords)
    assert np.allclose(delta, delta[:1], atol=1e-6) and np.all(np.abs(delta) <= 0.1)
    rescaled = np.asarray(rope.augment_coords(coords, key, rescale=2.0))
    ratio = rescaled / np.asarray(coords)
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-6) and 0.5 <= ratio.flat[0] <= 2.0
    jittered = np.asarray(rope.augment_coords(coords, key, jitter=2.0)) / np.asarray(coords)
    assert np.allclose(jittered, jittered[:1], rtol=1e-6)  # one factor per axis
    assert not np.isclose(jittered[0, 0], jittered[0, 1])


GRAM_FLAGS = {"apply_norm": True, "remove_neg": True, "remove_only_teacher_neg": False}


def _gram(data, meta, name, **overrides):
    case = meta["gram"]["cases"][name]
    kw = {**GRAM_FLAGS, **case["ctor"], "img_level": case["img_level"], **overrides}
    return gram_loss(data["in/gram/student"], data["in/gram/teacher"], **kw)


GRAM_CASES = (
    "default_imglevel",
    "default_batchlevel",
    "config_imglevel",
    "config_batchlevel",
    "only_teacher_neg_imglevel",
    "nonorm_imglevel",
)


@pytest.mark.parametrize("name", GRAM_CASES)
def test_gram_loss_matches_official(data, meta, name):
    assert max_rel_err(_gram(data, meta, name), data[f"out/gram/{name}"]) <= TOL


def test_gram_loss_selected_tokens_match_official(data):
    s, t = data["in/gram/student"], data["in/gram/teacher"]
    mask = np.zeros(s.shape[:2], bool)
    mask[:, ::3] = True  # as the fixture: student[mask] over the whole batch, one Gram
    ref = data["out/gram/config_flat_masked_tokens"]
    assert max_rel_err(gram_loss(s, t, img_level=False, token_mask=mask), ref) <= TOL
    assert max_rel_err(gram_loss(s[mask], t[mask], img_level=False), ref) <= TOL
    assert max_rel_err(gram_loss(s, t, img_level=False), ref) > TOL


def test_gram_loss_wrong_variants_fail(data, meta):
    errs = {
        "no L2 norm": max_rel_err(
            _gram(data, meta, "config_imglevel", apply_norm=False), data["out/gram/config_imglevel"]
        ),
        "no remove_neg clamp": max_rel_err(
            _gram(data, meta, "default_imglevel", remove_neg=False),
            data["out/gram/default_imglevel"],
        ),
        "image level for batch level": max_rel_err(
            _gram(data, meta, "config_batchlevel", img_level=True),
            data["out/gram/config_batchlevel"],
        ),
        "student clamped too": max_rel_err(
            _gram(
                data,
                meta,
                "only_teacher_neg_imglevel",
                remove_neg=True,
                remove_only_teacher_neg=False,
            ),
            data["out/gram/only_teacher_neg_imglevel"],
        ),
    }
    assert min(errs.values()) > TOL, errs
    with pytest.raises(ValueError, match="exclude"):
        _gram(data, meta, "default_imglevel", remove_only_teacher_neg=True)


def _random_patches(n_images=16, n=16, d=32):
    ks, kt = jax.random.split(jax.random.key(5))
    return jax.random.normal(ks, (n_images, n, d)), jax.random.normal(kt, (n_images, n, d))


def test_gram_loss_sharded_equals_unsharded():
    """Image level: the mean over images is the same over a sharded batch. Batch level: the
    official Gram is per GPU (its local batch, cross-image pairs inside it), averaged over
    GPUs; `group_size` = images per device reproduces that, sharded or not."""
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    batch = parallel.batch_sharding(mesh)
    s, t = _random_patches()
    per_device = s.shape[0] // mesh.size

    def both(fn):
        one = jax.jit(fn)(*jax.device_put((s, t), jax.devices()[0]))
        split = jax.jit(fn)(*jax.device_put((s, t), batch))
        return one, split

    def img(a, b):
        return gram_loss(a, b, img_level=True, remove_neg=True)

    one, split = both(img)
    assert max_rel_err(split, one) <= 1e-6
    g_one, g_split = both(jax.grad(img))
    assert g_split.sharding.is_equivalent_to(batch, g_split.ndim)
    assert max_rel_err(g_split, g_one) <= 1e-6

    def grouped(a, b):
        return gram_loss(a, b, img_level=False, group_size=per_device)

    one, split = both(grouped)
    assert max_rel_err(split, one) <= 1e-6
    # the official computation: each device's own Gram loss, then the mean over devices
    official = jax.jit(
        jax.shard_map(
            lambda a, b: jax.lax.pmean(gram_loss(a, b, img_level=False), parallel.DATA_AXIS),
            mesh=mesh,
            in_specs=(PartitionSpec(parallel.DATA_AXIS),) * 2,
            out_specs=PartitionSpec(),
        )
    )(*jax.device_put((s, t), batch))
    assert max_rel_err(split, official) <= 1e-6
    # one Gram over the whole global batch is a different objective
    global_gram = gram_loss(s, t, img_level=False)
    assert max_rel_err(global_gram, official) > TOL

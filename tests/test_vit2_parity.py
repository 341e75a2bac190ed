"""DINOv2 ViT parity with the official DinoVisionTransformer (tests/fixtures/vit2.npz): register
tokens, LayerScale, SwiGLU, the mask token, DINOv2's position-embedding resize, state-dict
import; each bound shown to catch a plausible wrong variant."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import fixture_params, max_rel_err, nchw_to_nhwc

from dino_jax import parallel
from dino_jax.interop import dinov2
from dino_jax.interop.official import OfficialCheckpointError
from dino_jax.interop.pth import save_pth
from dino_jax.models import pos_embed as pe
from dino_jax.models import pos_embed2 as pe2
from dino_jax.models.vit2 import DinoVisionTransformer, add_residual_subset

TOL = 1e-5  # acceptance: max abs error <= 1e-5 * max |reference|
SIZES = ("x56", "x84", "x42x70", "x28")
COMMON = dict(patch_size=14, embed_dim=48, depth=2, num_heads=3, num_register_tokens=4)
CFGS = {
    "cfgA": dict(ffn="swiglufused", init_values=1e-5, interpolate_antialias=False),
    "cfgB": dict(ffn="mlp", init_values=1e-5, interpolate_antialias=True),
}
OUTPUTS = {
    "x_norm_clstoken": "cls",
    "x_norm_regtokens": "register_tokens",
    "x_norm_patchtokens": "patch_tokens",
    "x_prenorm": "prenorm",
}


@pytest.fixture(scope="module")
def data(fixtures_dir):
    return np.load(fixtures_dir / "vit2.npz")


def model(cfg, **overrides):
    return DinoVisionTransformer(img_size=56, **COMMON, **{**CFGS[cfg], **overrides})


def variables(data, cfg):
    return {"params": fixture_params(data, cfg + "/")}


def image(data, size):
    return jnp.asarray(nchw_to_nhwc(data["in/" + size]))


def official_state_dict(data, cfg):
    prefix = f"param/{cfg}/"
    return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def errors(out, data, key):
    return {
        ref: max_rel_err(getattr(out, ours), data[f"{key}/{ref}"]) for ref, ours in OUTPUTS.items()
    }


def worst(m, params, data, cfg, sizes=SIZES):
    """The largest error over every output of the forwards at `sizes`."""
    return max(
        max(errors(m.apply(params, image(data, s)), data, f"out/{cfg}/{s}").values()) for s in sizes
    )


@pytest.mark.parametrize("cfg", CFGS)
def test_forward_matches_official(data, cfg):
    m, params = model(cfg), variables(data, cfg)
    for size in SIZES:
        out = m.apply(params, image(data, size))
        for name, err in errors(out, data, f"out/{cfg}/{size}").items():
            assert err <= TOL, (size, name, err)
    out = m.apply(params, image(data, "x56"))
    assert max_rel_err(out.feature, data[f"out/{cfg}/x56/forward_eval"]) <= TOL


@pytest.mark.parametrize("cfg", CFGS)
def test_masked_forward_matches_official(data, cfg):
    m, params = model(cfg), variables(data, cfg)
    masks = jnp.asarray(data["in/masks_x56"])
    out = m.apply(params, image(data, "x56"), masks=masks)
    for name, err in errors(out, data, f"out/{cfg}/x56_masked").items():
        assert err <= TOL, (name, err)
    # the mask token matters: without the masks the outputs are those of the plain forward
    plain = m.apply(params, image(data, "x56"))
    assert max_rel_err(plain.patch_tokens, data[f"out/{cfg}/x56_masked/x_norm_patchtokens"]) > TOL


@pytest.mark.parametrize("cfg", CFGS)
def test_intermediate_layers_match_official(data, cfg):
    m, params = model(cfg), variables(data, cfg)
    out = m.apply(params, image(data, "x56"), n_last_blocks=2)
    ours = np.stack([np.asarray(t) for t in out.intermediates])  # (layer, B, 1 + N, D)
    key = f"out/{cfg}/x56/intermediate_n2"
    assert max_rel_err(ours[:, :, 1:], data[key + "_patch"]) <= TOL  # registers dropped
    assert max_rel_err(ours[:, :, 0], data[key + "_cls"]) <= TOL
    np.testing.assert_array_equal(ours[-1][:, 1:], out.patch_tokens)


@pytest.mark.parametrize("cfg", CFGS)
def test_pos_embed_interpolation_matches_official(data, cfg):
    pos = jnp.asarray(data[f"param/{cfg}/pos_embed"])
    aa = CFGS[cfg]["interpolate_antialias"]
    for size in SIZES:
        x = data["in/" + size]
        ours = pe2.interpolate_pos_embed2(pos, x.shape[2] // 14, x.shape[3] // 14, antialias=aa)
        assert max_rel_err(ours, data[f"out/{cfg}/{size}/pos_embed"]) <= TOL, size


def test_wrong_interpolations_fail_the_bound(data):
    """DINO v1's (non-antialiased, A = -0.75) resize for cfgB, and offset 0 for cfgA."""
    pos_b, pos_a = (jnp.asarray(data[f"param/{c}/pos_embed"]) for c in ("cfgB", "cfgA"))
    for size in SIZES[1:]:  # the resized ones
        x = data["in/" + size]
        rows, cols = x.shape[2] // 14, x.shape[3] // 14
        v1 = pe.interpolate_pos_embed(pos_b, rows, cols)
        assert max_rel_err(v1, data[f"out/cfgB/{size}/pos_embed"]) > 1e-2, size
        no_offset = pe2.interpolate_pos_embed2(pos_a, rows, cols, offset=0.0)
        assert max_rel_err(no_offset, data[f"out/cfgA/{size}/pos_embed"]) > 1e-3, size
    sizes = SIZES[1:]
    assert (
        worst(
            model("cfgB", interpolate_antialias=False), variables(data, "cfgB"), data, "cfgB", sizes
        )
        > TOL
    )
    assert (
        worst(model("cfgA", interpolate_offset=0.0), variables(data, "cfgA"), data, "cfgA", sizes)
        > TOL
    )


def test_swapped_swiglu_halves_and_missing_layerscale_fail_the_bound(data):
    params = variables(data, "cfgA")
    assert worst(model("cfgA"), params, data, "cfgA") <= TOL
    swapped = jax.tree.map(np.copy, params)
    for i in range(2):
        w12 = swapped["params"][f"blocks_{i}"]["mlp"]["w12"]
        w12["kernel"] = np.roll(w12["kernel"], 128, axis=1)  # gate <-> value halves
        w12["bias"] = np.roll(w12["bias"], 128)
    assert worst(model("cfgA"), swapped, data, "cfgA") > TOL
    for cfg in CFGS:
        assert worst(model(cfg, init_values=None), variables(data, cfg), data, cfg) > TOL


def test_interpolation_matches_torch_where_the_fixture_has_no_case():
    """Offset 0 (the `_reg` backbones: an output size, not a scale factor), axes that keep
    their size (aten's antialiased kernel leaves them alone) and larger grids."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    g = 7
    pos = np.random.default_rng(0).normal(size=(1, 1 + g * g, 5)).astype(np.float32)
    grid = torch.tensor(pos[:, 1:]).reshape(1, g, g, 5).permute(0, 3, 1, 2)
    for antialias in (False, True):
        for offset in (0.0, 0.1):
            for rows, cols in ((3, 3), (10, 4), (7, 12), (12, 7), (2, 20), (16, 16)):
                scale = {"scale_factor": ((rows + offset) / g, (cols + offset) / g)}
                how = scale if offset else {"size": (rows, cols)}
                ref = F.interpolate(grid, mode="bicubic", antialias=antialias, **how)
                ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
                ours = pe2.interpolate_pos_embed2(
                    jnp.asarray(pos), rows, cols, offset=offset, antialias=antialias
                )
                assert max_rel_err(ours[:, 1:], ref) <= TOL, (antialias, offset, rows, cols)
                np.testing.assert_array_equal(ours[:, 0], pos[:, 0])


def test_pth_import_runs_the_official_weights(data, tmp_path):
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    save_pth(official_state_dict(data, "cfgA"), path)
    m, params = dinov2.load_dinov2_pth(
        path, num_heads=3, interpolate_offset=0.1, interpolate_antialias=False
    )
    assert (m.ffn, m.mlp_ratio, m.num_register_tokens, m.img_size, m.embed_dim) == (
        "swiglufused", 4.0, 4, 56, 48
    )  # fmt: skip
    assert worst(m, params, data, "cfgA") <= TOL
    assert worst(m.clone(interpolate_offset=0.0), params, data, "cfgA") > TOL
    # without the resize settings, those the released backbones with registers use
    default, _ = dinov2.load_dinov2_pth(path, num_heads=3)
    assert (default.interpolate_offset, default.interpolate_antialias) == (0.0, True)


def test_training_checkpoint_layouts_map_onto_the_same_params(data, tmp_path):
    """Teacher checkpoints name the backbone `backbone.*`, FSDP ones chunk the blocks
    (`blocks.<chunk>.<i>.*`), DDP adds `module.`: all give the released backbone's params."""
    state = official_state_dict(data, "cfgB")
    chunked = {
        k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
        for k, v in state.items()
    }
    wrapped = {"teacher": {"module.backbone." + k: v for k, v in chunked.items()}}
    wrapped["teacher"]["dino_head.mlp.0.weight"] = np.zeros((4, 48), np.float32)
    path = tmp_path / "teacher_checkpoint.pth"
    save_pth(wrapped, path)
    m, params = dinov2.load_dinov2_pth(path, num_heads=3, interpolate_offset=0.1)
    expected = dinov2.load_dinov2_backbone(state)
    jax.tree.map(np.testing.assert_array_equal, params["params"], expected)
    assert (m.ffn, m.mlp_ratio, m.interpolate_antialias) == ("mlp", 4.0, True)
    assert worst(m, params, data, "cfgB") <= TOL


def test_pth_import_refuses_what_is_not_the_architecture(data, tmp_path):
    state = official_state_dict(data, "cfgA")
    cases = {
        "missing": {k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"},
        "pos_embed": {**state, "pos_embed": state["pos_embed"][:, :11]},
        "norm.weight": {**state, "norm.weight": state["norm.weight"].astype(np.int32)},
        "cls_token": {"blocks.0.norm1.weight": state["blocks.0.norm1.weight"]},
    }
    for i, (message, bad) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.pth"
        save_pth(bad, path)
        with pytest.raises(OfficialCheckpointError, match=message):
            dinov2.load_dinov2_pth(path, num_heads=3)


def test_subset_stochastic_depth_adds_the_scaled_branch_to_a_fixed_number():
    x = jnp.arange(8 * 3 * 2, dtype=jnp.float32).reshape(8, 3, 2)
    out = add_residual_subset(x, lambda y: 2 * y + 1, 0.3, jax.random.key(1))
    changed = np.any(np.asarray(out) != np.asarray(x), axis=(1, 2))
    kept = int(8 * 0.7)  # max(int(B * (1 - rate)), 1), as the official
    assert changed.sum() == kept
    np.testing.assert_allclose(
        out[changed], x[changed] + (2 * x[changed] + 1) * 8 / kept, rtol=1e-6
    )


def test_drop_path_only_in_training_and_from_its_rng(data):
    m, params = model("cfgA", drop_path_rate=0.5, drop_path_uniform=True), variables(data, "cfgA")
    x = jnp.tile(image(data, "x56"), (4, 1, 1, 1))
    evaluated = m.apply(params, x)
    assert max_rel_err(evaluated.cls, np.tile(data["out/cfgA/x56/x_norm_clstoken"], (4, 1))) <= TOL

    @functools.partial(jax.jit, static_argnums=0)
    def train(subset, seed):
        rngs = {"drop_path": jax.random.key(seed)}
        return m.clone(drop_path_subset=subset).apply(params, x, train=True, rngs=rngs).cls

    a, b = train(True, 0), train(True, 1)
    np.testing.assert_array_equal(a, train(True, 0))
    assert not np.allclose(a, b) and not np.allclose(a, evaluated.cls)
    assert not np.allclose(train(False, 0), a)  # per-sample Bernoulli draws differently


def test_sharded_forward_equals_single_device(data):
    """Eval forward is per sample: a batch sharded over 8 devices gives the same tokens."""
    m, params = model("cfgB"), variables(data, "cfgB")
    x = jnp.tile(image(data, "x56"), (4, 1, 1, 1))  # 8 samples
    masks = jnp.tile(jnp.asarray(data["in/masks_x56"]), (4, 1))
    mesh = parallel.make_mesh()
    fn = jax.jit(lambda p, x, k: m.apply(p, x, masks=k).patch_tokens)
    shard = parallel.batch_sharding(mesh)
    sharded = fn(params, jax.device_put(x, shard), jax.device_put(masks, shard))
    single = fn(params, x, masks)
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)
    ref = np.tile(data["out/cfgB/x56_masked/x_norm_patchtokens"], (4, 1, 1))
    assert max_rel_err(sharded, ref) <= TOL

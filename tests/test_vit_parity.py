"""ViT parity with the official implementation (tests/fixtures/vit.npz, vit_p8.npz)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import fixture_params, max_rel_err, nchw_to_nhwc

from dino_jax.models import pos_embed as pe
from dino_jax.models.vit import VisionTransformer

TOL = 1e-5  # acceptance: max abs error <= 1e-5 * max |reference|

CASES = {
    "vit": dict(patch_size=16, embed_dim=96, depth=2, num_heads=3),
    "vit_p8": dict(patch_size=8, embed_dim=64, depth=2, num_heads=2),
}


def load(fixtures_dir, name):
    data = np.load(fixtures_dir / f"{name}.npz")
    model = VisionTransformer(img_size=224, **CASES[name])
    return data, model, {"params": fixture_params(data, "")}


def inputs(data):
    return sorted(k[3:] for k in data.files if k.startswith("in/"))


@pytest.mark.parametrize("name", CASES)
def test_cls_and_attention_match_official(fixtures_dir, name):
    data, model, params = load(fixtures_dir, name)
    for x_name in inputs(data):
        x = jnp.asarray(nchw_to_nhwc(data[f"in/{x_name}"]))
        out = model.apply(params, x, return_attention=True)
        assert max_rel_err(out.cls, data[f"out/cls_{x_name}"]) <= TOL, x_name
        if f"out/attn_{x_name}" in data:
            ref = data[f"out/attn_{x_name}"]
            # Near-uniform attention (~1/N everywhere): also bound the error relative to 1/N.
            err = np.max(np.abs(np.asarray(out.attention) - ref))
            assert err <= TOL * ref.max(), x_name
            assert err * ref.shape[-1] <= 1e-4, x_name


def test_fused_attention_path_equals_explicit(fixtures_dir):
    data, model, params = load(fixtures_dir, "vit")
    x = jnp.asarray(nchw_to_nhwc(data["in/x96"]))
    fused = model.apply(params, x).cls
    explicit = model.apply(params, x, return_attention=True).cls
    np.testing.assert_allclose(fused, explicit, atol=1e-6)
    assert max_rel_err(fused, data["out/cls_x96"]) <= TOL


def test_intermediate_layers_match_official(fixtures_dir):
    data, model, params = load(fixtures_dir, "vit")
    x = jnp.asarray(nchw_to_nhwc(data["in/x224"]))
    out = model.apply(params, x, n_last_blocks=2)
    ours = np.stack([np.asarray(t) for t in out.intermediates])
    assert max_rel_err(ours, data["out/intermediate_x224_n2"]) <= TOL
    # the last intermediate is the final output: CLS and patch tokens agree with it
    np.testing.assert_array_equal(ours[-1][:, 0], out.cls)
    np.testing.assert_array_equal(ours[-1][:, 1:], out.patch_tokens)


@pytest.mark.parametrize("name", CASES)
def test_pos_embed_interpolation_matches_official(fixtures_dir, name):
    data, _, params = load(fixtures_dir, name)
    p = CASES[name]["patch_size"]
    for key in (k for k in data.files if k.startswith("out/pos_embed_")):
        x = data["in/" + key.removeprefix("out/pos_embed_")]
        ours = pe.interpolate_pos_embed(
            jnp.asarray(params["params"]["pos_embed"]), x.shape[2] // p, x.shape[3] // p
        )
        assert max_rel_err(ours, data[key]) <= TOL, key


def test_jax_image_resize_would_not_match(fixtures_dir):
    """Guard against the tempting shortcut: jax.image.resize(bicubic) is a different resize."""
    import jax

    data, _, params = load(fixtures_dir, "vit")
    pos = np.asarray(params["params"]["pos_embed"])
    grid = pos[0, 1:].reshape(14, 14, -1)
    for key, (rows, cols) in {"out/pos_embed_x96": (6, 6), "out/pos_embed_xrect": (10, 14)}.items():
        resized = jax.image.resize(grid, (rows, cols, grid.shape[-1]), "bicubic")
        candidate = np.concatenate([pos[:, :1], np.asarray(resized).reshape(1, rows * cols, -1)], 1)
        assert max_rel_err(candidate, data[key]) > 100 * TOL, key


def test_tanh_gelu_would_not_match(fixtures_dir, monkeypatch):
    """The exact erf GELU matters at this tolerance: the tanh form fails the parity bound."""
    import flax.linen as nn

    import dino_jax.models.vit as vit

    monkeypatch.setattr(vit, "exact_gelu", lambda x: nn.gelu(x, approximate=True))
    data, model, params = load(fixtures_dir, "vit")
    x = jnp.asarray(nchw_to_nhwc(data["in/x224"]))
    # measured: ~5.5e-5, five times the parity bound
    assert max_rel_err(model.apply(params, x).cls, data["out/cls_x224"]) > 2 * TOL


def test_bicubic_matrix_rows_sum_to_one():
    for n_in, n_out in [(14, 6), (14, 10), (28, 8), (4, 9)]:
        mat = pe.bicubic_matrix(n_in, n_out, (n_out + 0.1) / n_in)
        np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-12)

"""The model-side speed options (model.attention_pad, model.gelu, model.remat): off by default,
and each gives what the default path gives (float32), except the tanh GELU, which is another
function by a known small amount."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import TINY_RESNET, TINY_XCIT, tiny_config

from dino_jax import recipe, validation
from dino_jax.config import ConfigError
from dino_jax.models.vit import (
    REMAT_POLICIES,
    Mlp,
    VisionTransformer,
    exact_gelu,
    fused_attention,
    tanh_gelu,
)
from dino_jax.models.vit2 import DinoVisionTransformer
from dino_jax.models.vit3 import VisionTransformer3

TIGHT = {"rtol": 1e-5, "atol": 1e-6}
# Whole models, where padding changes the shapes and so XLA's float32 summation order
MODEL = {"rtol": 1e-4, "atol": 1e-5}
# 14 x 14 + 1 (a 224 crop at patch 16) and 6 x 6 + 1 (a 96 local crop): lengths cuDNN's fused
# attention refuses in training
LENGTHS = (197, 37)
# The tiny ViTs below: patch 4, so a side of 4 * n gives an n x n grid
SMALL = {"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 24}


def quick_jit(fn):
    """jax.jit without XLA's backend optimisation passes: they take most of these tests' time
    and change none of the values compared (each side of a comparison is compiled alike)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def images(side: int, batch: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(0), (batch, side, side, 3))


def qkv(tokens: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (2, tokens, 2, 8)) for k in keys)


def pad_unmasked(q, k, v, implementation, pad_to):
    """The wrong variant: the padded (zero) keys take part in the softmax."""
    tokens = q.shape[1]
    widths = ((0, 0), (0, -tokens % pad_to), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)[:, :tokens]


def value_and_grads(attention, q, k, v):
    """The attention's output and the gradients of a random projection of it wrt q, k, v."""
    weights = jax.random.normal(jax.random.key(9), q.shape)
    loss = lambda *t: jnp.sum(attention(*t) * weights)
    return quick_jit(lambda *t: (attention(*t), jax.grad(loss, argnums=(0, 1, 2))(*t)))(q, k, v)


def assert_trees_close(got, want, tolerance=TIGHT):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, **tolerance)


def trees_close(a, b, tolerance=MODEL) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.allclose(x, y, **tolerance) for x, y in pairs)


@pytest.mark.parametrize("implementation", ["xla", None])
@pytest.mark.parametrize("tokens", LENGTHS)
def test_padded_attention_is_the_unpadded_attention(tokens, implementation):
    q, k, v = qkv(tokens)
    plain = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    want = value_and_grads(plain, q, k, v)
    for pad_to in (8, 64):
        padded = functools.partial(fused_attention, implementation=implementation, pad_to=pad_to)
        assert_trees_close(value_and_grads(padded, q, k, v), want)
    # Padding without the key mask changes every softmax: the comparison above would see it.
    wrong = functools.partial(pad_unmasked, implementation=implementation, pad_to=64)
    assert not np.allclose(quick_jit(wrong)(q, k, v), want[0], **MODEL)


def test_a_length_already_a_multiple_is_not_padded():
    q, k, v = qkv(32)
    jaxpr = jax.make_jaxpr(functools.partial(fused_attention, implementation="xla", pad_to=16))
    assert "pad" not in {e.primitive.name for e in jaxpr(q, k, v).jaxpr.eqns}
    got = quick_jit(functools.partial(fused_attention, implementation="xla", pad_to=16))
    np.testing.assert_array_equal(got(q, k, v), quick_jit(jax.nn.dot_product_attention)(q, k, v))


# (backbone class, its fields): DINOv2's with registers and LayerScale, DINOv3's with storage
# tokens and RoPE, so the padded sequences hold those prefix tokens too
VITS = {
    "vit": (VisionTransformer, SMALL),
    "dinov2": (DinoVisionTransformer, {**SMALL, "num_register_tokens": 2, "init_values": 0.5}),
    "dinov3": (
        VisionTransformer3,
        {**{k: v for k, v in SMALL.items() if k != "img_size"}, "n_storage_tokens": 2},
    ),
    # Stochastic depth on (DINOv2's: on a random subset of the batch, its training path); DINO's
    # rate ramps up from 0 in the first block, hence two blocks.
    "vit_drop": (VisionTransformer, {**SMALL, "depth": 2, "drop_path_rate": 0.5}),
    "dinov2_drop": (
        DinoVisionTransformer,
        {**SMALL, "drop_path_rate": 0.5, "drop_path_uniform": True, "init_values": 0.5},
    ),
    # DINOv3's training draws: subset drop path in the blocks, RoPE rescaling outside them
    "dinov3_drop": (
        VisionTransformer3,
        {
            **{k: v for k, v in SMALL.items() if k != "img_size"},
            "drop_path_rate": 0.5,
            "rope_rescale_coords": 2.0,
        },
    ),
}


@functools.cache
def vit_params(kind: str):
    """Random params of VITS[kind], N(0, 0.3^2) (drawn by NumPy: no init to compile). None
    depends on the input size (the position grid is img_size's): every crop size shares them."""
    cls, fields = VITS[kind]
    shapes = jax.eval_shape(cls(**fields).init, jax.random.key(1), images(24))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)


def outputs_and_grads(model, train: bool = False):
    """A jitted (params, images, drop-path key) -> (backbone outputs, gradients of a loss on
    them wrt the params)."""

    def run(params, x, key):
        def loss(p):
            out = model.apply({"params": p}, x, train=train, rngs={"drop_path": key})
            return jnp.sum(out.cls**2) + jnp.mean(out.patch_tokens), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads

    return quick_jit(run)


def test_padded_vit_attention_gives_the_same_outputs_and_gradients():
    cls, fields = VITS["vit"]
    args = vit_params("vit"), images(56), jax.random.key(0)  # 197 tokens
    want = outputs_and_grads(cls(**fields, attention_impl="xla"))(*args)
    got = outputs_and_grads(cls(**fields, attention_impl="xla", attention_pad=16))(*args)
    assert_trees_close(got, want, MODEL)


@pytest.mark.parametrize("kind, side", [("dinov2", 56), ("dinov3", 24)])  # 14 x 14, 6 x 6
def test_padded_attention_in_dinov2_and_dinov3_gives_the_same_tokens(kind, side):
    cls, fields = VITS[kind]
    x = images(side)
    run = lambda m: quick_jit(m.apply)({"params": vit_params(kind)}, x)
    want, got = run(cls(**fields)), run(cls(**fields, attention_pad=16))
    assert got.prenorm.shape == want.prenorm.shape  # 1 + 2 prefix tokens + patches
    assert_trees_close(got, want, MODEL)


def test_attention_maps_stay_unpadded():
    """Two blocks: the first attends through the padded kernel, the last gives the maps."""
    x = images(56)  # 197 tokens
    cls, fields = VITS["vit_drop"]
    model = cls(**fields)
    maps = lambda m, p: m.apply({"params": p}, x, return_attention=True)
    run = lambda m: quick_jit(functools.partial(maps, m))(vit_params("vit_drop"))
    want, got = run(model), run(model.clone(attention_pad=64))
    assert got.attention.shape == (2, 2, 197, 197)
    assert_trees_close(got, want)


def test_exact_gelu_is_the_erf_form_bit_for_bit_and_tanh_its_approximation():
    x = jnp.linspace(-6.0, 6.0, 24001)
    np.testing.assert_array_equal(exact_gelu(x), jax.nn.gelu(x, approximate=False))
    np.testing.assert_array_equal(tanh_gelu(x), jax.nn.gelu(x, approximate=True))
    # The approximation's known error: largest near |x| = 2.7, about 4.7e-4.
    gap = float(jnp.max(jnp.abs(tanh_gelu(x) - exact_gelu(x))))
    assert 4.5e-4 < gap < 4.8e-4


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_the_mlp_uses_the_chosen_gelu(gelu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16), np.float32)
    mlp = Mlp(hidden_dim=32, gelu=gelu)
    shapes = jax.eval_shape(mlp.init, jax.random.key(1), x)["params"]
    # weights of scale 0.5: hidden units over GELU's curved part (std 2), outputs of std ~3
    params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes)

    def by_hand(approximate: bool):
        h = x @ params["fc1"]["kernel"] + params["fc1"]["bias"]
        y = jax.nn.gelu(h, approximate=approximate)
        return y @ params["fc2"]["kernel"] + params["fc2"]["bias"]

    got = quick_jit(mlp.apply)({"params": params}, x)
    chosen, other = (quick_jit(functools.partial(by_hand, a))() for a in (True, False))
    if gelu == "exact":
        chosen, other = other, chosen
    np.testing.assert_allclose(got, chosen, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(got - other))) > 1e-4


def backbone(**changes):
    c = tiny_config(**changes)
    validation.validate(c, num_devices=1)
    return recipe.build_network(c).backbone


def primitives(fn, *args) -> set[str]:
    """Which of the GELUs' primitives (tanh, erfc) fn's jaxpr holds, nested calls included."""
    return set(re.findall(r"\b(tanh|erfc)\b", str(jax.make_jaxpr(fn)(*args))))


DINOV3_TINY = {"model.arch": "dinov3", "model.embed_dim": 16, "model.num_heads": 2}


@pytest.mark.parametrize("arch", [{}, {"model.arch": "dinov2"}, DINOV3_TINY, TINY_XCIT])
def test_the_chosen_gelu_reaches_every_transformer_family(arch):
    x = images(16)
    for gelu, primitive in (("exact", "erfc"), ("tanh", "tanh")):
        net = backbone(**arch, **{"model.gelu": gelu})
        assert net.gelu == gelu
        variables = jax.eval_shape(net.init, jax.random.key(1), x)
        # every GELU of the network is that one (only they use tanh or erfc)
        assert primitives(net.apply, variables, x) == {primitive}


def test_the_recipe_passes_the_options_to_the_backbone():
    for arch in ({}, {"model.arch": "dinov2"}, DINOV3_TINY):
        net = backbone(**arch, **{"model.attention_pad": 8, "model.remat": "dots"})
        assert (net.attention_pad, net.remat, net.gelu) == (8, "dots", "exact")
    default = backbone()
    assert (default.attention_pad, default.gelu, default.remat) == (0, "exact", "none")


def remat_policies(model, params, x) -> list:
    """The policy of every checkpointed (remat) call in the top level of the model's jaxpr."""
    eqns = jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params).jaxpr.eqns
    return [e.params["policy"] for e in eqns if "remat" in e.primitive.name]


def param_names(tree) -> list:
    return [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("kind", ["vit_drop", "dinov2_drop"])
def test_remat_keeps_names_values_gradients_and_randomness(kind):
    cls, fields = VITS[kind]
    params, x = vit_params(kind), images(24, batch=4)
    assert {f"blocks_{i}" for i in range(fields["depth"])} <= set(params)
    plain = outputs_and_grads(cls(**fields), train=True)
    want = plain(params, x, jax.random.key(3))
    for remat in ("block", "dots"):
        model = cls(**fields, remat=remat)
        shapes = jax.eval_shape(model.init, jax.random.key(1), x)["params"]
        assert param_names(shapes) == param_names(params)  # checkpoints and exporters rely on it
        policies = remat_policies(model, params, x)
        assert policies == [REMAT_POLICIES[remat]] * fields["depth"]
        assert_trees_close(outputs_and_grads(model, train=True)(params, x, jax.random.key(3)), want)
    # Other drop-path draws give other gradients: equal gradients above mean equal draws.
    assert not trees_close(plain(params, x, jax.random.key(4))[1], want[1])


def test_remat_in_evaluation_and_with_attention_maps():
    cls, fields = VITS["vit_drop"]
    x = images(24)
    maps = lambda m, p: m.apply({"params": p}, x, train=False, return_attention=True)
    run = lambda m: quick_jit(functools.partial(maps, m))(vit_params("vit_drop"))
    want = run(cls(**fields))
    for remat in ("block", "dots"):
        assert_trees_close(run(cls(**fields, remat=remat)), want)


def test_dinov3_remat_keeps_its_training_draws():
    cls, fields = VITS["dinov3_drop"]
    x = images(24, batch=4)
    rngs = {"drop_path": jax.random.key(3), "rope": jax.random.key(5)}
    forward = lambda m, p: m.apply({"params": p}, x, train=True, rngs=rngs)
    run = lambda m: quick_jit(functools.partial(forward, m))(vit_params("dinov3_drop"))
    want = run(cls(**fields))
    assert_trees_close(run(cls(**fields, remat="block")), want)


def errors(**changes) -> str:
    try:
        validation.validate(tiny_config(**changes), num_devices=1)
    except ConfigError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model.attention_pad": -8}, "model.attention_pad=-8: an int >= 0"),
        ({"model.gelu": "erf"}, "model.gelu='erf': use exact (the official nn.GELU) or tanh"),
        ({"model.remat": "full"}, "model.remat='full': use one of none, block, dots"),
        (
            {**TINY_RESNET, "model.gelu": "tanh"},
            "model.gelu='tanh' with model.arch='resnet': a ResNet has no GELU",
        ),
        (
            {**TINY_RESNET, "model.attention_pad": 8},
            "model.attention_pad=8 with model.arch='resnet': a ResNet has no attention",
        ),
        (
            {**TINY_RESNET, "model.remat": "block"},
            "model.remat='block' with model.arch='resnet': a ResNet has no transformer blocks",
        ),
        (
            {"model.arch": "dinov2", "model.ffn": "swiglufused", "model.gelu": "tanh"},
            "model.gelu='tanh' with model.ffn='swiglufused': the SwiGLU feed-forward has no GELU",
        ),
        (
            {**TINY_XCIT, "model.attention_pad": 8},
            "model.attention_pad=8 with model.arch='xcit': XCiT attends over channels",
        ),
        (
            {**TINY_XCIT, "model.remat": "dots"},
            "model.remat='dots' with model.arch='xcit': activation checkpointing is there for",
        ),
    ],
)
def test_bad_speed_options_are_refused_with_what_to_do(changes, message):
    assert message in errors(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"model.attention_pad": 64},  # with XLA's attention: allowed, only extra work
        {"model.gelu": "tanh", "model.remat": "dots"},
        {**TINY_XCIT, "model.gelu": "tanh"},
    ],
)
def test_good_speed_options_pass(changes):
    assert errors(**changes) == ""

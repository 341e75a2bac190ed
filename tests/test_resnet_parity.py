"""ResNet backbone and BatchNorm-head parity with the official code (tests/fixtures/resnet.npz).

The fixture is torchvision's ResNet with Bottleneck blocks, depths (1, 1, 1, 1), stem 16 and
widths 16/32/64/128 (fc = Identity, as main_dino.py --arch resnet50 uses it), and a DINOHead
with use_bn=True; its BatchNorm parameters and running statistics are perturbed so that
eval-mode BN is not the identity. Bounds: 20x the float32-vs-float64 deviation the fixture
records for each output, 1e-6 on the running statistics, exact `num_batches_tracked`. Each
bound is shown to reject a plausible wrong variant. (conftest.py sets float32 matmuls and convs
to full precision, as parity on an accelerator needs.)
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import nchw_to_nhwc

from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models.batchnorm import BatchNorm
from dino_jax.models.head import DINOHead
from dino_jax.models.resnet import ResNet

MODEL = dict(stem_width=16, widths=(16, 32, 64, 128), depths=(1, 1, 1, 1))
HEAD = dict(out_dim=64, use_bn=True, nlayers=3, hidden_dim=64, bottleneck_dim=32)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
BUFFER_TOL = 1e-6  # running_mean / running_var after train-mode calls


@pytest.fixture(scope="module")
def data(fixtures_dir):
    with np.load(fixtures_dir / "resnet.npz") as f:
        return {k: f[k] for k in f.files}


def bound(data, key: str) -> float:
    """20x how far the official float32 output is from the same computation in float64."""
    return 20 * json.loads(str(data["meta"]))["max_abs_dev_float32_vs_float64"][key]


def max_abs_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)))


def variables(data, model: str = "backbone") -> dict:
    """`params` and `batch_stats` of the fixture's backbone (unprefixed names) or its head."""
    state = {k[len("param/") :]: v for k, v in data.items() if k.startswith("param/")}
    if model == "head":
        params, stats = from_state_dict(state, "head/")
    else:
        params, stats = from_state_dict({k: v for k, v in state.items() if "/" not in k})
    return {"params": params, "batch_stats": stats}


def reference_stats(data, prefix: str) -> dict:
    """The official BN buffers stored under `prefix`, as a `batch_stats` tree."""
    n = len(prefix)
    params, stats = from_state_dict({k[n:]: data[k] for k in data if k.startswith(prefix)})
    assert not params
    return stats


def stats_errors(ours: dict, ref: dict) -> tuple[float, bool]:
    """(max |error| over every running mean / var, whether every count is exact)."""
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    ours, ref = jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(ref)
    err, counts_exact = 0.0, True
    for (path, a), b in zip(ours, ref, strict=True):
        if path[-1].key == "count":
            counts_exact &= a.dtype == jnp.int32 and int(a) == int(b)
        else:
            err = max(err, max_abs_err(a, b))
    return err, counts_exact


def image(data, name: str) -> jax.Array:
    return jnp.asarray(nchw_to_nhwc(data[f"in/{name}"]))


def eval_feature(data, **kw) -> jax.Array:
    return ResNet(**MODEL).apply(variables(data), image(data, "x64"), **kw).feature


# -- wrong variants, made by intercepting module calls (the model has no knobs for them) ----


def _run_conv(conv: nn.Conv, x: jax.Array, strides, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        conv.get_variable("params", "kernel"),
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv_override(override):
    """Every conv runs with `override(conv)` -> (strides, padding) instead of its own."""

    def interceptor(next_fun, args, kwargs, context):
        conv = context.module
        if not (isinstance(conv, nn.Conv) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        return _run_conv(conv, args[0], *override(conv))

    return nn.intercept_methods(interceptor)


def same_padding(kernel_size):
    """XLA's SAME padding on the convs of that kernel size."""
    return lambda c: (c.strides, "SAME" if c.kernel_size == kernel_size else c.padding)


def v1_layout(conv: nn.Conv):
    """Original ResNet / Caffe v1: the stride on the first 1x1 conv, not on the 3x3."""
    if getattr(conv.parent, "stride", 1) == 2 and conv.name in ("conv1", "conv2"):
        return ((2, 2) if conv.name == "conv1" else (1, 1)), conv.padding
    return conv.strides, conv.padding


def biased_running_var():
    """Running variance updated with the biased batch variance, as flax.linen.BatchNorm does."""

    def interceptor(next_fun, args, kwargs, context):
        bn = context.module
        if not (isinstance(bn, BatchNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        old = bn.get_variable("batch_stats", "var")
        y = next_fun(*args, **kwargs)
        if not (args[1] if len(args) > 1 else kwargs.get("use_running_average", True)):
            x = args[0].astype(jnp.float32)
            bn.put_variable(
                "batch_stats", "var", 0.9 * old + 0.1 * x.reshape(-1, x.shape[-1]).var(0)
            )
        return y

    return nn.intercept_methods(interceptor)


# -- tests ----------------------------------------------------------------------------------


def test_variables_match_the_official_names_shapes_and_init(data):
    model = ResNet(**MODEL)
    assert model.embed_dim == 512
    ours = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    ref = variables(data)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)
    assert shapes(ours) == shapes(ref)
    params = ours["params"]
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out * kh * kw))
    for path, fan_out in (("conv1", 16 * 49), ("layer4_0/conv3", 512), ("layer3_0/conv2", 576)):
        kernel = params
        for key in path.split("/"):
            kernel = kernel[key]
        assert abs(float(np.std(kernel["kernel"])) / (2 / fan_out) ** 0.5 - 1) < 0.05, path
    for bn in ("bn1", "bn2", "bn3"):  # zero_init_residual=False: bn3 starts at 1 too
        np.testing.assert_array_equal(params["layer2_0"][bn]["scale"], 1.0)
        np.testing.assert_array_equal(params["layer2_0"][bn]["bias"], 0.0)
    np.testing.assert_array_equal(ours["batch_stats"]["layer2_0"]["bn3"]["var"], 1.0)


@pytest.mark.parametrize("x_name", ["x64", "x48", "xrect"])
def test_eval_features_match_official(data, x_name):
    out = ResNet(**MODEL).apply(variables(data), image(data, x_name))
    key = f"out/eval/feat_{x_name}"
    assert max_abs_err(out.feature, data[key]) <= bound(data, key)


def test_eval_stages_match_official(data):
    out = ResNet(**MODEL).apply(variables(data), image(data, "x64"), return_stages=True)
    assert len(out.stages) == len(STAGES)
    for name, stage in zip(STAGES, out.stages, strict=True):
        key = f"out/eval/{name}_x64"
        assert max_abs_err(np.asarray(stage).transpose(0, 3, 1, 2), data[key]) <= bound(data, key)


@pytest.mark.parametrize("variant", ["same_stem", "same_3x3", "v1_stride"])
def test_wrong_layouts_fail_the_bound(data, variant):
    key = "out/eval/feat_x64"
    override = {
        "same_stem": same_padding((7, 7)),  # XLA's SAME pads the 7x7 stride-2 conv by (2, 3)
        "same_3x3": same_padding((3, 3)),  # ... and the stride-2 3x3 convs by (0, 1)
        "v1_stride": v1_layout,
    }[variant]
    with conv_override(override):
        wrong = eval_feature(data)
    assert max_abs_err(wrong, data[key]) > 10 * bound(data, key)


def test_train_mode_features_and_running_stats_match_official(data):
    model, state = ResNet(**MODEL), variables(data)
    for call, x_name in enumerate(["x64", "x48"]):  # call1 starts from call0's buffers
        ref = f"out/train/call{call}/"
        out, updates = model.apply(
            state, image(data, x_name), use_running_average=False, mutable=["batch_stats"]
        )
        key = ref + f"feat_{x_name}"
        assert max_abs_err(out.feature, data[key]) <= bound(data, key)
        err, counts_exact = stats_errors(
            updates["batch_stats"], reference_stats(data, ref + "buffers/")
        )
        assert err <= BUFFER_TOL and counts_exact, (call, err)
        state = {"params": state["params"], **updates}


def test_biased_running_var_fails_the_bound(data):
    with biased_running_var():
        _, updates = ResNet(**MODEL).apply(
            variables(data), image(data, "x64"), use_running_average=False, mutable=["batch_stats"]
        )
    err, _ = stats_errors(updates["batch_stats"], reference_stats(data, "out/train/call0/buffers/"))
    assert err > 10 * BUFFER_TOL


def head_calls(data):
    """(train-mode y, mlp_out, running stats after that call, eval-mode y with them)."""
    head, state = DINOHead(**HEAD), variables(data, "head")
    feats = jnp.asarray(data["in/head/feats"])
    train = dict(use_running_average=False, mutable=["batch_stats"])
    y, updates = head.apply(state, feats, **train)
    mlp_out, _ = head.apply(state, feats, method="mlp", **train)
    y_eval = head.apply({"params": state["params"], **updates}, feats)
    return y, mlp_out, updates["batch_stats"], y_eval


def test_head_with_batch_norm_matches_official(data):
    y, mlp_out, stats, y_eval = head_calls(data)
    for ours, key in ((y, "train/y"), (mlp_out, "train/mlp_out"), (y_eval, "eval_after/y")):
        assert max_abs_err(ours, data[f"out/head/{key}"]) <= bound(data, f"out/head/{key}"), key
    err, counts_exact = stats_errors(stats, reference_stats(data, "out/head/train/buffers/"))
    assert err <= BUFFER_TOL and counts_exact, err


def test_head_biased_running_var_fails_the_bound(data):
    with biased_running_var():
        _, _, stats, y_eval = head_calls(data)
    err, _ = stats_errors(stats, reference_stats(data, "out/head/train/buffers/"))
    assert err > 10 * BUFFER_TOL
    key = "out/head/eval_after/y"
    assert max_abs_err(y_eval, data[key]) > 10 * bound(data, key)

"""DINO head and loss parity with the official implementation (head.npz, loss.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import fixture_params, max_rel_err

from dino_jax.loss import dino_loss, update_center
from dino_jax.models.head import DINOHead

TOL = 1e-5

HEADS = {
    "cfgA": dict(nlayers=3),
    "cfgB": dict(nlayers=3),  # norm_last_layer=False: only the optimiser differs
    "cfgC": dict(nlayers=1),
}


@pytest.mark.parametrize("cfg", HEADS)
def test_head_matches_official(fixtures_dir, cfg):
    data = np.load(fixtures_dir / "head.npz")
    head = DINOHead(out_dim=128, hidden_dim=64, bottleneck_dim=32, **HEADS[cfg])
    params = {"params": fixture_params(data, f"{cfg}/")}
    feats = jnp.asarray(data["in/feats"])
    assert max_rel_err(head.apply(params, feats), data[f"out/{cfg}/y"]) <= TOL
    assert max_rel_err(head.apply(params, feats, method="mlp"), data[f"out/{cfg}/mlp_out"]) <= TOL
    if f"out/{cfg}/last_layer_weight" in data:
        weight = head.apply(params, method="prototypes")  # (bottleneck, K) = official W.T
        assert max_rel_err(weight.T, data[f"out/{cfg}/last_layer_weight"]) <= TOL


def test_head_init_follows_official_scheme():
    head = DINOHead(out_dim=4096, hidden_dim=512, bottleneck_dim=256, use_bn=True)
    params = head.init(jax.random.key(0), jnp.ones((8, 384)))["params"]
    assert sorted(params) == ["last_layer", "mlp_0", "mlp_1", "mlp_3", "mlp_4", "mlp_6"]
    np.testing.assert_array_equal(params["last_layer"]["weight_g"], 1.0)
    v = np.asarray(params["last_layer"]["weight_v"])
    assert np.abs(v).max() <= 256**-0.5 and np.abs(v).max() > 0.9 * 256**-0.5  # U(+-1/sqrt(in))
    assert abs(np.asarray(params["mlp_0"]["kernel"]).std() - 0.02) < 1e-3
    np.testing.assert_array_equal(params["mlp_1"]["scale"], 1.0)


def test_head_batch_norm_uses_batch_statistics():
    head = DINOHead(out_dim=16, hidden_dim=8, bottleneck_dim=4, use_bn=True)
    x = jax.random.normal(jax.random.key(1), (2, 6, 5))
    params = head.init(jax.random.key(0), x)

    def train_mode(x):  # as the official head in train mode: batch statistics
        return head.apply(params, x, use_running_average=False, mutable=["batch_stats"])[0]

    # statistics come from all rows of all leading axes at once: permuting rows permutes outputs
    perm = jnp.asarray([3, 0, 5, 1, 4, 2])
    y = train_mode(x)
    np.testing.assert_allclose(train_mode(x[:, perm]), y[:, perm], atol=1e-6)
    # ...and a different batch gives different statistics for the same row
    y2 = train_mode(x.at[1].multiply(3.0))
    assert not np.allclose(y2[0], y[0], atol=1e-4)
    # eval mode normalises with the running statistics: the rows are independent
    y_eval = head.apply(params, x)
    np.testing.assert_allclose(head.apply(params, x.at[1].multiply(3.0))[0], y_eval[0], atol=1e-6)


def _loss_inputs(data, name):
    ncrops = 6
    s = jnp.asarray(data[f"in/{name}/student_output"]).reshape(ncrops, -1, 128)
    t = jnp.asarray(data[f"in/{name}/teacher_output"]).reshape(2, -1, 128)
    return s, t, jnp.asarray(data[f"in/{name}/center_init"])


@pytest.mark.parametrize("name", ["setA", "setB"])
def test_loss_and_center_match_official(fixtures_dir, name):
    data = np.load(fixtures_dir / "loss.npz")
    s, t, center = _loss_inputs(data, name)
    for call in range(3):
        ref = f"out/{name}/call{call}/"
        temp = float(data[ref + "teacher_temp"])

        def loss_fn(s, center=center, temp=temp):
            return dino_loss(s, t, center, student_temp=0.1, teacher_temp=temp)

        loss, grad = jax.value_and_grad(loss_fn)(s)
        assert max_rel_err(loss, data[ref + "loss"]) <= TOL
        assert max_rel_err(grad.reshape(-1, 128), data[ref + "grad_student_output"]) <= TOL
        center = update_center(center, t, 0.9)
        assert max_rel_err(center, data[ref + "center_after"]) <= TOL


def test_loss_in_float32_for_bfloat16_logits(fixtures_dir):
    data = np.load(fixtures_dir / "loss.npz")
    s, t, center = _loss_inputs(data, "setB")
    kw = dict(student_temp=0.1, teacher_temp=0.04)
    # logits that are exactly representable in bf16 (the fixture's 4-bit mantissas) must give
    # the float32 loss, not a bf16-rounded one
    full = dino_loss(s, t, center, **kw)
    half = dino_loss(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), center, **kw)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, rtol=1e-6)


def test_teacher_gets_no_gradient(fixtures_dir):
    data = np.load(fixtures_dir / "loss.npz")
    s, t, center = _loss_inputs(data, "setB")
    grad_t = jax.grad(lambda t: dino_loss(s, t, center, student_temp=0.1, teacher_temp=0.04))(t)
    np.testing.assert_array_equal(grad_t, 0.0)


def test_loss_pairs_skip_same_crop_only():
    """Two student crops identical to the teacher's: the loss equals the brute-force pair mean."""
    key = jax.random.key(0)
    s = jax.random.normal(key, (5, 3, 7))
    t = jax.random.normal(jax.random.key(1), (2, 3, 7))
    c = jnp.zeros((1, 7))
    ours = dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.05)
    q = jax.nn.softmax(t / 0.05, -1)
    logp = jax.nn.log_softmax(s / 0.1, -1)
    pairs = [(i, v) for i in range(2) for v in range(5) if v != i]
    brute = sum(float(jnp.mean(jnp.sum(-q[i] * logp[v], -1))) for i, v in pairs) / len(pairs)
    np.testing.assert_allclose(ours, brute, rtol=1e-6)

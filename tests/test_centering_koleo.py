"""DINOv2 centering, Sinkhorn-Knopp, DINO loss terms and KoLeo against the official code
(centering.npz, koleo.npz), plus their behaviour on a batch sharded over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import max_rel_err
from jax.sharding import NamedSharding, PartitionSpec

from dino_jax import parallel
from dino_jax.centering import (
    dinov2_cross_entropy_sum,
    dinov2_dino_terms,
    sinkhorn_knopp,
)
from dino_jax.koleo import dinov2_koleo_term, koleo_distances, koleo_loss, koleo_loss_chunked
from dino_jax.loss import dino_loss, teacher_probs, update_center

TOL = 1e-5
B, K, N_LOCAL = 4, 64, 3  # centering.npz: batch per crop, prototypes, local crops
TEMPS = (0.04, 0.055, 0.07)  # teacher temperature of steps 0, 1, 2


@pytest.fixture(scope="module")
def cen(fixtures_dir):
    return dict(np.load(fixtures_dir / "centering.npz"))


@pytest.fixture(scope="module")
def kol(fixtures_dir):
    return dict(np.load(fixtures_dir / "koleo.npz"))


def _official_losses(data, step, probs):
    """The two official DINOLoss.forward calls of the fixture on (2B, K) teacher targets."""
    s_local = jnp.asarray(data[f"in/student_local_step{step}"]).reshape(N_LOCAL, B, K)
    s_global = jnp.asarray(data[f"in/student_global_step{step}"])[None]  # one list entry
    local = dinov2_cross_entropy_sum(s_local, probs.reshape(2, B, K))
    return local, dinov2_cross_entropy_sum(s_global, probs[None])


def test_ema_centering_matches_official_three_steps(cen):
    center = jnp.zeros((1, K))
    for step, temp in enumerate(TEMPS):
        ref = cen[f"out/center_used_step{step}"]
        if step == 0:
            np.testing.assert_array_equal(center, ref)  # the zero start (max|ref| = 0)
        else:
            assert max_rel_err(center, ref) <= TOL
        t = jnp.asarray(cen[f"in/teacher_step{step}"])
        probs = teacher_probs(t, center, temp)
        assert max_rel_err(probs, cen[f"out/softmax_center_step{step}"]) <= TOL
        local, glob = _official_losses(cen, step, probs)
        assert max_rel_err(local, cen[f"out/loss_local_step{step}"]) <= TOL
        assert max_rel_err(glob, cen[f"out/loss_global_step{step}"]) <= TOL
        # updating after the loss = the official update staged now and applied next step
        center = update_center(center, t.reshape(2, B, K), 0.9)
    assert max_rel_err(center, cen["out/center_final"]) <= TOL

    # Wrong variant: the step's own batch already in the center (no delay) fails the bound.
    t1 = jnp.asarray(cen["in/teacher_step1"])
    c1 = update_center(jnp.asarray(cen["out/center_used_step1"]), t1.reshape(2, B, K), 0.9)
    wrong = teacher_probs(t1, c1, TEMPS[1])
    assert max_rel_err(wrong, cen["out/softmax_center_step1"]) > 10 * TOL


def _sinkhorn_no_column_b(t, temp, n_iterations=3):
    """Wrong variant: the per-sample normalisation without its division by B."""
    q = np.exp(np.asarray(t, np.float64) / temp)
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(0, keepdims=True) * q.shape[1]
        q /= q.sum(1, keepdims=True)
    return q * q.shape[0]


def _sinkhorn_row_max_shift(t, temp, n_iterations=3):
    """Wrong variant: a per-sample max subtracted before exp (not a no-op after 3 steps)."""
    x = np.asarray(t, np.float64) / temp
    return np.asarray(sinkhorn_knopp(jnp.asarray(x - x.max(1, keepdims=True)), 1.0, n_iterations))


def test_sinkhorn_matches_official(cen):
    t0 = jnp.asarray(cen["in/teacher_step0"])
    for temp in TEMPS:
        ref = cen[f"out/sinkhorn_t{temp}"]
        q = sinkhorn_knopp(t0, temp)
        assert max_rel_err(q, ref) <= TOL
        # crop-major (2, B, K) gives the same targets: the sums run over all leading axes
        q_crops = sinkhorn_knopp(t0.reshape(2, B, K), temp)
        assert max_rel_err(q_crops.reshape(2 * B, K), ref) <= TOL
        np.testing.assert_allclose(np.sum(q, -1), 1.0, atol=1e-6)
        # the plausible wrong variants fail the same bound
        assert max_rel_err(sinkhorn_knopp(t0, temp, n_iterations=1), ref) > TOL
        assert max_rel_err(_sinkhorn_no_column_b(t0, temp), ref) > TOL
        assert max_rel_err(_sinkhorn_row_max_shift(t0, temp), ref) > TOL
    # 16 samples x 16 prototypes: steps 1 and 2's teachers, first 16 prototypes, at 0.055
    tall = np.concatenate([cen["in/teacher_step1"], cen["in/teacher_step2"]])[:, :16]
    assert max_rel_err(sinkhorn_knopp(jnp.asarray(tall), 0.055), cen["out/sinkhorn_tall"]) <= TOL
    local, glob = _official_losses(cen, 0, sinkhorn_knopp(t0, TEMPS[0]))
    assert max_rel_err(local, cen["out/loss_local_sinkhorn"]) <= TOL
    assert max_rel_err(glob, cen["out/loss_global_sinkhorn"]) <= TOL


def test_dinov2_dino_terms_match_ssl_meta_arch(cen):
    # The fixture teacher is in ssl_meta_arch's swapped crop order; ours is crop order.
    probs_swapped = jnp.asarray(cen["out/softmax_center_step0"]).reshape(2, B, K)
    student = jnp.concatenate(
        [
            jnp.asarray(cen["in/student_global_step0"]).reshape(2, B, K),
            jnp.asarray(cen["in/student_local_step0"]).reshape(N_LOCAL, B, K),
        ]
    )
    glob, local = dinov2_dino_terms(student, probs_swapped[::-1])
    ref_glob = cen["out/ssl_dino_global_crops_loss_step0"]
    ref_local = cen["out/ssl_dino_local_crops_loss_step0"]
    assert max_rel_err(glob, ref_glob) <= TOL
    assert max_rel_err(local, ref_local) <= TOL
    # With EMA centering the two terms add up to DINO v1's mean over pairs (dino_jax.loss).
    t = jnp.asarray(cen["in/teacher_step0"]).reshape(2, B, K)[::-1]
    v1 = dino_loss(student, t, jnp.zeros((1, K)), student_temp=0.1, teacher_temp=TEMPS[0])
    assert max_rel_err(v1, ref_glob + ref_local) <= TOL
    # Wrong variant: feeding the swapped teacher again pairs each crop with itself.
    wrong, _ = dinov2_dino_terms(student, probs_swapped)
    assert max_rel_err(wrong, ref_glob) > TOL


def _mesh_and_crop_sharding():
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    return mesh, NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))  # (crops, B, ...)


def test_sinkhorn_sharded_equals_unsharded(cen):
    mesh, crops = _mesh_and_crop_sharding()
    t = jax.random.uniform(jax.random.key(0), (2, 16, K), minval=-1.0, maxval=1.0)
    fn = jax.jit(sinkhorn_knopp, static_argnums=2)
    single = fn(jax.device_put(t, jax.devices()[0]), 0.04, 3)
    sharded = fn(jax.device_put(t, crops), 0.04, 3)
    assert sharded.sharding.is_equivalent_to(crops, sharded.ndim)  # stays batch-sharded
    assert max_rel_err(sharded, single) <= 1e-6
    # the official 16 x 16 case with its 16 rows split 2 per device
    tall = np.concatenate([cen["in/teacher_step1"], cen["in/teacher_step2"]])[:, :16]
    out = fn(jax.device_put(jnp.asarray(tall), parallel.batch_sharding(mesh)), 0.055, 3)
    assert max_rel_err(out, cen["out/sinkhorn_tall"]) <= TOL

    # Wrong variant: each device normalising its own rows only (no global sums) differs.
    def per_device(x):
        return sinkhorn_knopp(x, 0.04, 3, num_samples=x.shape[0] * x.shape[1] * mesh.size)

    local = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=crops.spec, out_specs=crops.spec)
    )(jax.device_put(t, crops))
    assert max_rel_err(local, single) > TOL


KOLEO_CASES = ("x_rand", "x_dup", "x_zero_row", "x_close")


def _koleo_no_diagonal_exclusion(x, eps=1e-8):
    """Wrong variant: every row is its own nearest neighbour."""
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    d = np.linalg.norm(x - x + eps, axis=1)
    return -np.mean(np.log(d + eps))


def _koleo_squared_distance(x, eps=1e-8):
    """Wrong variant: squared instead of plain distance."""
    _, d = koleo_distances(jnp.asarray(x), eps)
    return -jnp.mean(jnp.log(d * d + eps))


@pytest.mark.parametrize("case", KOLEO_CASES)
def test_koleo_matches_official(kol, case):
    x = jnp.asarray(kol[f"in/{case}"])
    index, distances = koleo_distances(x)
    np.testing.assert_array_equal(index, kol[f"out/nn_index_{case}"])
    assert max_rel_err(distances, kol[f"out/distances_{case}"]) <= TOL
    ref = kol[f"out/loss_{case}"]
    assert max_rel_err(koleo_loss(x), ref) <= TOL
    assert max_rel_err(_koleo_no_diagonal_exclusion(x), ref) > TOL
    assert max_rel_err(_koleo_squared_distance(x), ref) > TOL
    # duplicated and zero rows (eps paths) keep a finite gradient
    assert np.all(np.isfinite(jax.grad(koleo_loss)(x)))


def test_koleo_term_matches_ssl_meta_arch(kol):
    x = jnp.asarray(kol["in/x_rand"])
    ref = kol["out/ssl_koleo_x_rand_weight0.1_2chunks"]
    # chunk(2) of the (2B, D) global CLS features = the two global crops, crop-major
    assert max_rel_err(dinov2_koleo_term(x.reshape(2, 4, 16), weight=0.1), ref) <= TOL
    # Wrong variant: one KoLeo across both crops of every image.
    assert max_rel_err(2 * 0.1 * koleo_loss(x), ref) > TOL


def test_koleo_chunked_sharded_equals_per_chunk_on_one_device():
    _, crops = _mesh_and_crop_sharding()
    feats = jax.random.normal(jax.random.key(1), (2, 32, 16))  # (n_global, B, D)
    cpu0 = jax.devices()[0]
    for num_chunks in (8, 16):  # one chunk per device, two per device
        size = 32 // num_chunks
        one_device = 0.1 * sum(
            np.mean(
                [
                    float(koleo_loss(jax.device_put(feats[c, i * size : (i + 1) * size], cpu0)))
                    for i in range(num_chunks)
                ]
            )
            for c in range(2)
        )
        term = jax.jit(dinov2_koleo_term, static_argnames=("weight", "num_chunks"))
        x = jax.device_put(feats, crops)
        assert max_rel_err(term(x, weight=0.1, num_chunks=num_chunks), one_device) <= 1e-6
        # each chunk's B x B neighbour search stays on its device: only scalars are reduced
        hlo = term.lower(x, weight=0.1, num_chunks=num_chunks).compile().as_text()
        assert "all-gather" not in hlo
    # The global-batch KoLeo (one chunk, neighbours across devices) is another value.
    global_batch = jax.jit(koleo_loss_chunked, static_argnums=1)(jax.device_put(feats[0], cpu0), 1)
    per_device = koleo_loss_chunked(feats[0], 8)
    assert max_rel_err(global_batch, per_device) > TOL

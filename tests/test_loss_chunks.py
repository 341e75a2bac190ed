"""dino.loss_chunks: the student's last layer and DINO's cross-entropy made over chunks of the
batch (dino_jax.loss.dino_cross_entropy_chunked) give the loss, gradients and training states of
the default path, without ever holding the whole batch's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fault_helpers import logged
from helpers.states import assert_states_equal
from helpers.tiny import tiny_config

from dino_jax import parallel, validation
from dino_jax.config import ConfigError
from dino_jax.data.pipeline import to_global
from dino_jax.loss import dino_cross_entropy, dino_cross_entropy_chunked
from dino_jax.objective import dino_objective
from dino_jax.trainer import build_run, compile_step, initial_state, train

# float32, summation order only
TIGHT = {"rtol": 2e-6, "atol": 1e-7}
TEMP = 0.1


def problem(n_student=5, n_teacher=2, batch=8, dim=16, k=64):
    """L2-normalised embeddings, prototypes and sharp softmax targets."""
    keys = jax.random.split(jax.random.key(3), 3)
    z = jax.random.normal(keys[0], (n_student, batch, dim))
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    prototypes = jax.random.normal(keys[1], (dim, k))
    targets = jax.nn.softmax(5.0 * jax.random.normal(keys[2], (n_teacher, batch, k)), axis=-1)
    return z, prototypes, targets


def unchunked(z, prototypes, targets, dtype=jnp.float32):
    """The default path: the head's last layer on every crop, then the cross-entropy."""
    logits = jnp.einsum(
        "sbd,dk->sbk", z.astype(dtype), prototypes.astype(dtype), preferred_element_type=jnp.float32
    )
    return dino_cross_entropy(logits, targets, student_temp=TEMP)


def loss_and_grads(loss, z, prototypes):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(z, prototypes)


@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_chunked_cross_entropy_is_the_unchunked_one(chunks):
    z, prototypes, targets = problem()
    want = loss_and_grads(lambda a, b: unchunked(a, b, targets), z, prototypes)
    chunked = functools.partial(
        dino_cross_entropy_chunked, teacher_targets=targets, student_temp=TEMP, chunks=chunks
    )
    got = loss_and_grads(chunked, z, prototypes)
    np.testing.assert_allclose(got[0], want[0], **TIGHT)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, **TIGHT)


def test_chunks_paired_with_the_wrong_targets_are_caught():
    """The bound bites: the targets of contiguous chunks against the embeddings of interleaved
    ones (images paired with other images' targets) is far outside it."""
    z, prototypes, targets = problem()
    chunks, batch = 2, z.shape[1]
    rows = batch // chunks
    # the embeddings in contiguous-chunk order, the targets left in interleaved order
    order = np.arange(batch).reshape(rows, chunks).T.reshape(-1)
    wrong = dino_cross_entropy_chunked(
        z[:, order], prototypes, targets, student_temp=TEMP, chunks=chunks
    )
    want = unchunked(z, prototypes, targets)
    assert abs(float(wrong) - float(want)) > 1e3 * TIGHT["rtol"] * abs(float(want))


def test_bfloat16_matmuls_as_the_last_layer_takes_them():
    """In bf16 the logits are the same products (float32 accumulation), so the loss agrees to
    float32 summation order; the prototypes' gradient sums bf16-rounded chunk parts."""
    z, prototypes, targets = problem()
    want = loss_and_grads(lambda a, b: unchunked(a, b, targets, jnp.bfloat16), z, prototypes)
    got = loss_and_grads(
        lambda a, b: dino_cross_entropy_chunked(
            a, b, targets, student_temp=TEMP, chunks=4, dtype=jnp.bfloat16
        ),
        z,
        prototypes,
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * float(jnp.abs(w).max()))


def test_uneven_chunks_are_refused():
    z, prototypes, targets = problem(batch=6)
    with pytest.raises(ValueError, match="4 chunks do not split a batch of 6"):
        dino_cross_entropy_chunked(z, prototypes, targets, student_temp=TEMP, chunks=4)


def run_both(tmp_path, overrides: dict) -> dict:
    """The tiny run (8 devices, 2 images each) with the whole batch's logits and in 2 chunks."""
    return {
        chunks: train(
            tiny_config(**overrides, **{"dino.loss_chunks": chunks}), str(tmp_path / str(chunks))
        )
        for chunks in (0, 2)
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # a BatchNorm in the head (it sees every crop's features at once either way) and the
        # Sinkhorn-Knopp targets of the whole batch
        {"model.use_bn_in_head": True, "dino.centering": "sinkhorn"},
    ],
    ids=["recipe", "bn_head_sinkhorn"],
)
def test_three_training_steps_match_the_default(tmp_path, overrides):
    """Loss, gradients (through the parameters, moments and teacher they move) and state after
    three steps of the trainer, the last layer trained from the first (its prototypes'
    gradient is the chunked sum)."""
    base = {"train.max_steps": 3, "optim.freeze_last_layer": 0, **overrides}
    results = run_both(tmp_path, base)
    assert all(r.status == "max_steps" and int(r.state.step) == 3 for r in results.values())
    losses = [logged(tmp_path / str(chunks), "train/loss") for chunks in (2, 0)]
    assert losses[0] and len(losses[0]) == len(losses[1])
    np.testing.assert_allclose(*losses, rtol=1e-6)
    assert_states_equal(results[2].state, results[0].state, rtol=1e-5, atol=1e-6)


def lowered_step(config, objective=None, devices=1):
    """The trainer's step for `config` on the first `devices`, lowered on its first batch."""
    mesh = parallel.make_mesh(jax.devices()[:devices])
    run = build_run(config, mesh=mesh, objective=objective)
    batch = to_global(next(iter(run.host_batches())), run.mesh)
    return compile_step(run).lower(initial_state(run), batch, jax.random.key(0))


def compiled_temp_bytes(**overrides) -> int:
    """XLA's temporary buffer bytes of the compiled step on one device."""
    compiled = lowered_step(tiny_config(**overrides)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_whole_batch_of_logits_is_never_held():
    """With 65,536 prototypes the student's (4 crops, 16, K) float32 logits are 16 MiB; in 4
    chunks XLA's temporary memory drops by more than that (the logits and the gradient's
    buffers of their size, less one chunk's)."""
    sizes = {"model.out_dim": 65536, "optim.freeze_last_layer": 0}
    logits_bytes = 4 * 16 * 65536 * 4
    whole = compiled_temp_bytes(**sizes)
    chunked = compiled_temp_bytes(**sizes, **{"dino.loss_chunks": 4})
    assert whole - chunked > logits_bytes, (whole, chunked)


@pytest.mark.parametrize("chunks", [0, 2])
def test_nothing_is_gathered_across_devices(chunks):
    """Over 8 devices, 2 images each, the data-parallel step moves only reductions: each
    device's chunks are its own images, and the (2, B, K) teacher distributions stay sharded
    (a reshape of their crop and batch axes into one gathered them for a collapse metric)."""
    config = tiny_config(**{"dino.loss_chunks": chunks})
    hlo = lowered_step(config, devices=8).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "collective-permute" not in hlo


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "dino.loss_chunks=-1: an int >= 0"),
        (True, "dino.loss_chunks=True: must be of type int, not bool"),
        (3, "dino.loss_chunks=3 does not split each device's 2 images"),
    ],
)
def test_bad_chunk_counts_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        validation.validate(tiny_config(**{"dino.loss_chunks": value}), num_devices=8)


def test_an_objective_that_reads_the_logits_is_told_why_they_are_missing():
    def reads_logits(out):
        loss, metrics = dino_objective()(out)
        return loss + 0.0 * out.student_logits.sum(), metrics

    with pytest.raises(TypeError, match="student_logits is None"):
        lowered_step(tiny_config(**{"dino.loss_chunks": 2}), objective=reads_logits)

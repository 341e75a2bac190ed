"""iBOT and Gram anchoring as training options: the host masks of each step, the gathered
masked-token loss against the official dense form, the per-chunk patch center, the student's
mask token, the Gram teacher's refresh, and a run that resumes exactly and matches 8 devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.states import assert_states_equal, steps_on_meshes
from helpers.tiny import tiny_config

from dino_jax import ibot, recipe
from dino_jax.data.masking import StepMasks, collate_masks, masks_rng
from dino_jax.data.masking import dinov2_masking_generator as generator_for
from dino_jax.objective import StepOutputs, ibot_term
from dino_jax.trainer import build_run, compile_step, initial_state, train

IBOT = {
    "model.arch": "dinov2",
    "dino.ibot_weight": 1.0,
    "dino.ibot_chunks": 2,
}
GRAM = {"dino.gram_weight": 1.0, "dino.gram_start_step": 1, "dino.gram_update_every": 2}


def step_masks(batch=8, chunks=2, seed=3):
    return StepMasks(generator_for(16, 4), batch_size=batch, seed=seed, chunks=chunks)


def test_step_masks_list_every_masked_token_with_its_weight_and_replay_by_step():
    masks = step_masks()
    out = masks.local(step=5)
    dense, index, weight = out["masks"], out["mask_index"], out["mask_weight"]
    assert dense.shape == (8, 2, 16) and index.shape == weight.shape == (8, index.shape[1])
    for k in range(2):  # each chunk: the official collate of its own (seed, step, chunk) draw
        rows = slice(4 * k, 4 * k + 4)
        drawn = collate_masks(masks_rng(3, 5, k), 4, generator_for(16, 4)).masks
        np.testing.assert_array_equal(dense[rows], drawn)
        flat_masks = dense[rows].reshape(-1)
        idx, w = index[rows].reshape(-1), weight[rows].reshape(-1)
        n = int(flat_masks.sum())
        assert n > 0 and np.all(flat_masks[idx[:n]]) and len(set(idx[:n])) == n
        assert np.all(w[n:] == 0) and np.all(w[:n] > 0)
        # each masked crop's weights sum to 1 (the collate's 1 / masked count)
        crop_of = idx[:n] // 16
        totals = np.bincount(crop_of, weights=w[:n], minlength=8)
        np.testing.assert_allclose(totals[dense[rows].reshape(8, 16).any(-1)], 1.0, rtol=1e-6)
    again = masks.local(step=5)
    np.testing.assert_array_equal(again["mask_index"], index)
    assert not np.array_equal(masks.local(step=6)["masks"], dense)
    # processes draw their own chunks: together they are the single process's masks
    halves = [masks.local(5, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["masks"] for h in halves]), dense)


def test_the_capacity_holds_the_most_masked_tokens_a_chunk_can_have():
    masks = step_masks(batch=16, chunks=1)
    most = max(int(masks.local(s)["masks"].sum()) for s in range(30))
    capacity = masks.capacity_per_image * 16
    assert most <= capacity < most * 2


def network_outputs(config, images, masks):
    """The student and teacher (the same initial params) outputs of the network of `config`
    on one global group, with the masks gathered, and the network and its params."""
    run_recipe = recipe.build(config, steps_per_epoch=10)
    net = run_recipe.hp.model
    params = net.init(jax.random.key(0), (images,))["params"]
    index = jnp.asarray(masks["mask_index"]).reshape(config.dino.ibot_chunks, -1)
    student = net.apply(
        {"params": params},
        (images,),
        masks=jnp.asarray(masks["masks"]),
        patch_index=index,
        return_features=True,
    )
    teacher = net.apply({"params": params}, (images,), patch_index=index, return_features=True)
    return net, params, student, teacher


def dense_patch_logits(net, params, images, masks=None):
    """(B, 2, N, K): the shared head on every patch token of the global crops."""
    b = images.shape[0]
    flat = images.reshape(2 * b, *images.shape[2:])
    m = None if masks is None else jnp.asarray(masks).reshape(2 * b, -1)
    out = net.backbone.apply({"params": params["backbone"]}, flat, masks=m)
    logits = net.head.apply({"params": params["head"]}, out.patch_tokens)
    return logits.reshape(b, 2, *logits.shape[1:])


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_the_gathered_loss_is_the_official_dense_masked_loss(centering):
    config = tiny_config(**IBOT, **{"dino.centering": centering})
    images = jax.random.normal(jax.random.key(1), (8, 2, 16, 16, 3))
    masks = step_masks().local(step=2)
    net, params, student, teacher = network_outputs(config, images, masks)
    center = jax.random.normal(jax.random.key(2), (1, 64)) * 0.1
    temp = jnp.float32(0.04)
    outputs = StepOutputs(
        student_logits=student.logits,
        teacher_logits=teacher.logits,
        student_features=student.features,
        teacher_features=teacher.features,
        center=center,
        teacher_temp=temp,
        step=jnp.int32(0),
        student_patch_logits=student.patch_logits,
        teacher_patch_logits=teacher.patch_logits,
        patch_weights=jnp.asarray(masks["mask_weight"]).reshape(2, -1),
        patch_center=center,
    )
    ours = float(ibot_term(0.1, centering)(outputs))

    # The official form: the head on every patch token, the loss over the masked ones.
    s_dense = dense_patch_logits(net, params, images, masks["masks"])
    t_dense = dense_patch_logits(net, params, images)
    dense_masks = jnp.asarray(masks["masks"])
    if centering == "ema":
        q = ibot.softmax_center_teacher(t_dense, center, temp)
    else:
        q = ibot.sinkhorn_knopp_teacher(t_dense, temp, dense_masks)
    reference = float(ibot.ibot_patch_loss_dense(s_dense, q, dense_masks, student_temp=0.1))
    bound = 1e-5 * abs(reference)
    assert abs(ours - reference) <= bound, (ours, reference)

    # A plausible wrong variant: the student's tokens gathered without its masked input.
    unmasked = dense_patch_logits(net, params, images)
    wrong = float(ibot.ibot_patch_loss_dense(unmasked, q, dense_masks, student_temp=0.1))
    assert abs(wrong - reference) > 100 * bound


def test_the_patch_center_is_the_mean_of_each_chunks_masked_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 5)).astype(np.float32)
    valid = rng.random((3, 10)) < 0.5
    valid[2] = False  # a chunk without masked tokens does not count
    means = [logits[c][valid[c]].mean(0) for c in range(2)]
    want = 0.9 * np.ones((1, 5)) + 0.1 * np.mean(means, axis=0)
    got = ibot.update_patch_center_per_chunk(jnp.ones((1, 5)), logits, valid, 0.9)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the global mean over tokens (chunks of unequal counts) is a different center
    pooled = 0.9 + 0.1 * logits[valid].mean(0)
    assert np.max(np.abs(pooled - want)) > 1e-3


def trainer_states(config, n_steps):
    """The states before each of `n_steps` trainer steps and after the last, on the host."""
    run = build_run(config)
    state, step = initial_state(run), compile_step(run)
    from dino_jax.data.pipeline import to_global

    states, metrics = [jax.device_get(state)], []
    for _, batch in zip(range(n_steps), run.host_batches(), strict=False):
        state, m = step(state, to_global(batch, run.mesh), jax.random.key(0))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def test_the_student_learns_its_mask_token_and_the_gram_teacher_refreshes_when_due():
    # no warm-up: the first step already moves the student (and so the EMA teacher)
    states, metrics = trainer_states(tiny_config(**IBOT, **GRAM, **{"optim.warmup_epochs": 0}), 4)
    token = [s.student["backbone"]["mask_token"] for s in states]
    assert np.all(token[0] == 0) and np.abs(token[1]).max() > 0  # masked input: a gradient
    centers = [s.extras["patch_center"] for s in states]
    assert np.all(centers[0] == 0) and np.abs(centers[1]).max() > 0

    def gram(i):
        return states[i].extras["gram_teacher"]

    def same(a, b):
        return all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    teacher = [s.teacher["backbone"] for s in states]
    # start 1, every 2: taken at steps 1 and 3 from the EMA teacher before that step
    assert same(gram(1), teacher[0]) and not same(gram(2), gram(1))
    assert same(gram(2), teacher[1]) and same(gram(3), gram(2)) and same(gram(4), teacher[3])
    assert metrics[0]["train/gram"] == 0.0 and metrics[1]["train/gram"] > 0.0


def test_without_ibot_the_mask_token_is_untouched():
    config = tiny_config(**{"model.arch": "dinov2", "optim.warmup_epochs": 0})
    states, metrics = trainer_states(config, 1)
    assert np.all(states[1].student["backbone"]["mask_token"] == 0)
    assert (
        np.abs(
            states[1].student["backbone"]["cls_token"] - states[0].student["backbone"]["cls_token"]
        ).max()
        > 0
    )
    assert "train/ibot" not in metrics[0] and states[1].extras == {}


def test_ibot_and_gram_resume_exactly_and_match_on_8_devices_and_1(tmp_path):
    c = {**IBOT, **GRAM, "dino.centering": "sinkhorn", "dino.ibot_separate_head": True}
    c["dino.ibot_out_dim"] = 32
    runs = steps_on_meshes(tiny_config(**c), 4, (8, 1))
    eight, one = (jax.device_get(runs[n].final) for n in (8, 1))
    for key in ("train/loss", "train/ibot", "train/gram"):
        np.testing.assert_allclose(runs[8].metrics[key], runs[1].metrics[key], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert eight.student["patch_head"]["last_layer"]["weight_v"].shape[-1] == 32

    straight = train(tiny_config(**c, **{"train.max_steps": 5}), str(tmp_path / "a"))
    train(tiny_config(**c, **{"train.max_steps": 3}), str(tmp_path / "b"))
    resumed = train(tiny_config(**c, **{"train.max_steps": 5}), str(tmp_path / "b"))
    assert_states_equal(straight.state, resumed.state)


def test_a_checkpoint_from_before_the_patch_options_resumes_and_changing_them_is_refused():
    from dino_jax.checkpoint_resume import CheckpointError, check_resume_config
    from dino_jax.config import flatten_config
    from dino_jax.trainer import saved_config

    current = flatten_config(tiny_config())
    older = {k: v for k, v in current.items() if not k.startswith(("dino.ibot", "dino.gram"))}
    assert check_resume_config(saved_config({"config": older}), current) == []
    with pytest.raises(
        CheckpointError, match=re.escape("dino.ibot_weight: checkpoint 0.0 -> now 1.0")
    ):
        check_resume_config(saved_config({"config": older}), {**current, "dino.ibot_weight": 1.0})


def test_a_checkpoint_written_before_the_state_had_extras_restores(tmp_path):
    """The state's `extras` field came with iBOT and Gram; a checkpoint without it (a DINO
    run's, written before) restores, digests verified, with empty extras."""
    import dataclasses

    from flax import struct

    from dino_jax.checkpoint import Checkpointer
    from dino_jax.config import flatten_config

    run = build_run(tiny_config())
    state = jax.device_get(initial_state(run))

    @struct.dataclass
    class EarlierTrainState:  # TrainState as it was before `extras`
        step: object
        student: object
        teacher: object
        opt_state: object
        center: object
        student_stats: object
        teacher_stats: object

    earlier = EarlierTrainState(
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(EarlierTrainState)}
    )
    ckpt = Checkpointer(str(tmp_path), keep=2, asynchronous=False)
    ckpt.save(earlier, {"config": flatten_config(run.config), "step": 0}, force=True)
    ckpt.wait()
    restored = ckpt.restore(0, run.restore_target)
    ckpt.close()
    assert restored.extras == {}
    assert_states_equal(state, jax.device_get(restored))

"""DINOv2's iBOT patch loss and block masking against the official code (fixtures/ibot.npz).

The loss is deterministic: compared at max_rel_err <= 1e-5 with a wrong variant failing the same
bound. Masks replay the official Python `random` stream exactly when seeded as the fixture was;
masks from our (seed, step) streams are checked statistically against the fixture's samples.
"""

from __future__ import annotations

import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import max_rel_err

from dino_jax import parallel
from dino_jax.data.masking import (
    MaskingGenerator,
    collate_masks,
    dinov2_masking_generator,
    flat_masks_weight,
    mask_capacity,
    masks_rng,
    ratio_bins,
)
from dino_jax.ibot import (
    apply_mask_token,
    ibot_patch_loss,
    ibot_patch_loss_dense,
    masks_weight,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    update_patch_center,
)

BOUND = 1e-5
TEACHER_TEMPS = (0.04, 0.055, 0.07)  # per step, as recorded in the fixture's meta
GRIDS = {"g14_img224_p16": (224, 16), "g6_img84_p14": (84, 14)}
N_STAT_SAMPLES = 800  # samples per target from our streams (the fixture has 400)
Z = 5.0  # two-sample bound in standard errors


@pytest.fixture(scope="module")
def z(fixtures_dir):
    return np.load(fixtures_dir / "ibot.npz")


@pytest.fixture(scope="module")
def meta(z):
    return json.loads(str(z["meta"]))


def _collate0(z):
    masks = z["out/collate0/collated_masks"]  # (6, 36): the masks every loss output used
    return masks, z["out/collate0/masks_weight"]


# ---------------------------------------------------------------- loss


def test_center_and_softmax_over_steps(z, meta):
    assert meta["teacher_temps_per_step"] == list(TEACHER_TEMPS)
    center = jnp.zeros((1, 48), jnp.float32)
    lagless = jnp.zeros((1, 48), jnp.float32)
    errs, wrong = [], []
    for i, temp in enumerate(TEACHER_TEMPS):
        t = jnp.asarray(z[f"in/teacher_masked_step{i}"])  # (n_masked, K)
        if i == 0:  # the center starts at 0 (max_rel_err is undefined there)
            np.testing.assert_array_equal(center.reshape(1, 1, -1), z["out/center_used_step0"])
        else:
            errs.append(max_rel_err(center.reshape(1, 1, -1), z[f"out/center_used_step{i}"]))
        q = softmax_center_teacher(t, center, temp)
        errs.append(max_rel_err(q, z[f"out/softmax_center_step{i}"]))
        center = update_patch_center(center, t, jnp.ones(t.shape[0], bool), 0.9)
        # Wrong: the center updated with this step's tokens before centering them.
        lagless = update_patch_center(lagless, t, jnp.ones(t.shape[0], bool), 0.9)
        wrong.append(
            max_rel_err(softmax_center_teacher(t, lagless, temp), z[f"out/softmax_center_step{i}"])
        )
    errs.append(max_rel_err(center.reshape(1, 1, -1), z["out/center_final"]))
    assert max(errs) <= BOUND, errs
    assert max(wrong) > BOUND, wrong


def test_forward_masked(z):
    masks, weights = _collate0(z)
    s = jnp.asarray(z["in/student_masked"])
    np.testing.assert_array_equal(flat_masks_weight(masks), weights)
    for i in range(len(TEACHER_TEMPS)):
        q = jnp.asarray(z[f"out/softmax_center_step{i}"])
        loss = ibot_patch_loss(s, q, weights, masks.shape[0])
        assert max_rel_err(loss, z[f"out/loss_forward_masked_step{i}"]) <= BOUND
    q0 = jnp.asarray(z["out/softmax_center_step0"])
    # masks_weight=None in the official call: the same weights recomputed from the masks.
    loss = ibot_patch_loss(s, q0, masks_weight(jnp.asarray(masks))[masks], 6)
    assert max_rel_err(loss, z["out/loss_forward_masked_weightNone"]) <= BOUND
    # A static buffer of `upperbound` rows, the padding weighted 0.
    s_pad = jnp.concatenate([s, z["in/student_pad_rows"]])
    q_pad = jnp.concatenate([q0, z["in/teacher_pad_rows"]])
    w_pad = np.pad(weights, (0, int(z["out/collate0/upperbound"]) - len(weights)))
    loss = ibot_patch_loss(s_pad, q_pad, w_pad, 6)
    assert max_rel_err(loss, z["out/loss_forward_masked_padded"]) <= BOUND
    # Wrong: masks_weight not applied (each masked token weighs 1).
    unweighted = ibot_patch_loss(s, q0, np.ones_like(weights), 6)
    assert max_rel_err(unweighted, z["out/loss_forward_masked_step0"]) > BOUND


def test_forward_dense(z):
    masks, _ = _collate0(z)
    probs = softmax_center_teacher(
        jnp.asarray(z["in/teacher_full_logits"]), jnp.zeros((1, 48)), 0.055
    )
    assert max_rel_err(probs, z["out/teacher_full_probs"]) <= BOUND
    s = jnp.asarray(z["in/student_full"])  # (6, 36, K)
    loss = ibot_patch_loss_dense(s, probs, jnp.asarray(masks))
    assert max_rel_err(loss, z["out/loss_forward_full"]) <= BOUND
    # Wrong: the mean over all patches instead of each image's masked ones.
    log_p = jax.nn.log_softmax(s / 0.1, axis=-1)
    all_patches = -jnp.mean(jnp.sum(probs * log_p, -1))
    assert max_rel_err(all_patches, z["out/loss_forward_full"]) > BOUND


def _scatter_dense(z, rows):
    """The masked rows placed at collate0's masked positions of a (6, 36, K) array whose other
    tokens are unrelated logits: the dense layout of the same masked tokens."""
    masks, _ = _collate0(z)
    dense = np.array(z["in/teacher_full_logits"])
    dense[masks] = rows
    return dense, masks


def test_sinkhorn_knopp(z):
    t = jnp.asarray(z["in/teacher_masked_step0"])
    ones = jnp.ones(t.shape[0], bool)
    for temp in (0.04, 0.055):
        q = sinkhorn_knopp_teacher(t, temp, ones)
        assert max_rel_err(q, z[f"out/sinkhorn_t{temp}"]) <= BOUND
    masks, weights = _collate0(z)
    q = sinkhorn_knopp_teacher(t, 0.04, ones)
    loss = ibot_patch_loss(jnp.asarray(z["in/student_masked"]), q, weights, 6)
    assert max_rel_err(loss, z["out/loss_forward_masked_sinkhorn"]) <= BOUND
    # Dense layout: only the masked tokens enter the sums; the others get zero targets.
    dense, masks = _scatter_dense(z, z["in/teacher_masked_step0"])
    q_dense = np.asarray(sinkhorn_knopp_teacher(jnp.asarray(dense), 0.04, jnp.asarray(masks)))
    assert max_rel_err(q_dense[masks], z["out/sinkhorn_t0.04"]) <= BOUND
    assert not q_dense[~masks].any()
    # Wrong: Sinkhorn-Knopp over every patch token, then the masked ones taken.
    q_all = np.asarray(
        sinkhorn_knopp_teacher(jnp.asarray(dense), 0.04, jnp.ones(masks.shape, bool))
    )
    assert max_rel_err(q_all[masks], z["out/sinkhorn_t0.04"]) > BOUND


def test_dense_center_uses_masked_tokens_only(z):
    dense, masks = _scatter_dense(z, z["in/teacher_masked_step0"])
    center = update_patch_center(jnp.zeros((1, 48)), jnp.asarray(dense), jnp.asarray(masks))
    ref = z["out/center_used_step1"].reshape(1, 48)  # after one update from step 0's tokens
    assert max_rel_err(center, ref) <= BOUND
    wrong = update_patch_center(jnp.zeros((1, 48)), jnp.asarray(dense), jnp.ones(masks.shape))
    assert max_rel_err(wrong, ref) > BOUND
    # A batch without masked tokens leaves the center as it is (no NaN).
    kept = update_patch_center(center, jnp.asarray(dense), jnp.zeros(masks.shape, bool))
    np.testing.assert_array_equal(kept, center)


def _objective(s, t_logits, weights, center, *, n_images, temp):
    """The pieces a step computes: centred loss, Sinkhorn-Knopp loss, the new center."""
    valid = weights != 0
    q = softmax_center_teacher(t_logits, center, temp)
    q_sk = sinkhorn_knopp_teacher(t_logits, temp, valid)
    return (
        ibot_patch_loss(s, q, weights, n_images),
        ibot_patch_loss(s, q_sk, weights, n_images),
        update_patch_center(center, t_logits, valid),
        q_sk,
    )


def _sharded_vs_single(args, n_images, temp=0.04):
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    fn = jax.tree_util.Partial(_objective, n_images=n_images, temp=temp)
    single = jax.jit(fn)(*args)
    rows, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    sharded_fn = jax.jit(fn, in_shardings=(rows, rows, rows, rep))
    sharded_args = [
        jax.device_put(a, sh) for a, sh in zip(args, (rows, rows, rows, rep), strict=True)
    ]
    sharded = sharded_fn(*sharded_args)
    assert len(sharded[3].sharding.device_set) == 8
    return single, sharded


def test_sharded_flat_buffer_equals_single_device(z):
    """Masked tokens in a 40-row buffer (8 padding rows) split 5 per device."""
    _, weights = _collate0(z)
    pad = 40 - len(weights)
    s = np.concatenate(
        [z["in/student_masked"], z["in/student_pad_rows"], z["in/student_pad_rows"][:1]]
    )
    t = np.concatenate(
        [z["in/teacher_masked_step0"], z["in/teacher_pad_rows"], z["in/teacher_pad_rows"][:1]]
    )
    w = np.pad(weights, (0, pad))
    args = (s, t, w, np.zeros((1, 48), np.float32))
    single, sharded = _sharded_vs_single(args, n_images=6)
    for a, b in zip(single, sharded, strict=True):
        assert max_rel_err(a, b) <= BOUND
    assert max_rel_err(sharded[1], z["out/loss_forward_masked_sinkhorn"]) <= BOUND
    assert max_rel_err(sharded[3][: len(weights)], z["out/sinkhorn_t0.04"]) <= BOUND
    assert max_rel_err(sharded[2].reshape(1, 1, -1), z["out/center_used_step1"]) <= BOUND
    s_step0 = ibot_patch_loss(s, softmax_center_teacher(t, args[3], 0.04), w, 6)
    assert max_rel_err(sharded[0], s_step0) <= BOUND


def test_sharded_dense_equals_single_device(z):
    """Dense (images, N, K) layout, 8 images (2 unmasked padding images) one per device."""
    dense, masks = _scatter_dense(z, z["in/teacher_masked_step0"])
    s = np.array(z["in/student_full"])
    s[masks] = z["in/student_masked"]
    pad = ((0, 2), (0, 0), (0, 0))
    w = np.pad(np.asarray(masks_weight(jnp.asarray(masks))), pad[:2])
    args = (np.pad(s, pad), np.pad(dense, pad), w, np.zeros((1, 48), np.float32))
    single, sharded = _sharded_vs_single(args, n_images=6)
    for a, b in zip(single, sharded, strict=True):
        assert max_rel_err(a, b) <= BOUND
    assert max_rel_err(sharded[1], z["out/loss_forward_masked_sinkhorn"]) <= BOUND
    assert max_rel_err(np.asarray(sharded[3])[:6][masks], z["out/sinkhorn_t0.04"]) <= BOUND
    assert max_rel_err(sharded[2].reshape(1, 1, -1), z["out/center_used_step1"]) <= BOUND


def test_apply_mask_token(z):
    masks, _ = _collate0(z)
    tokens = np.asarray(z["in/student_full"])  # any (B, N, D) array
    token = np.arange(48, dtype=np.float32)[None] / 7
    out = apply_mask_token(jnp.asarray(tokens), jnp.asarray(masks), jnp.asarray(token))
    np.testing.assert_array_equal(out, np.where(masks[..., None], token, tokens))
    half = apply_mask_token(
        jnp.asarray(tokens, jnp.bfloat16), jnp.asarray(masks), jnp.asarray(token)
    )
    assert half.dtype == jnp.bfloat16


# ---------------------------------------------------------------- masks


def _replay_official(name, target, n=400):
    """The fixture's own samples: random.seed(seed * 1000 + target), then n calls."""
    gen = dinov2_masking_generator(*GRIDS[name])
    rng = random.Random(0 * 1000 + target)
    return [gen.sample_with_blocks(rng, target) for _ in range(n)]


def _bbox_hw(cells):
    rows, cols = np.flatnonzero(cells.any(1)), np.flatnonzero(cells.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def _samples(samples, target):
    """Per-mask and per-block sample arrays of the statistics the fixture records."""
    counts = np.array([m.sum() for m, _ in samples])
    hw = np.array([_bbox_hw(b) for _, blocks in samples for b in blocks], float)
    return {
        "mean_count": counts,
        "frac_exact": (counts == target).astype(float),
        "mean_blocks_per_mask": np.array([len(b) for _, b in samples], float),
        "mean_new_cells_bbox_h": hw[:, 0],
        "mean_new_cells_bbox_w": hw[:, 1],
        "mean_log_bbox_aspect_h_over_w": np.log(hw[:, 0] / hw[:, 1]),
    }


@pytest.mark.parametrize("name", list(GRIDS))
def test_masking_generator_replays_official(z, meta, name):
    """Seeded as the fixture's generator was, ours gives the same masks and statistics."""
    stats = meta["maskgen_stats"][name]["stats"]
    for k, target in enumerate(z[f"out/maskgen_{name}/targets"].tolist()):
        samples = _replay_official(name, target)
        kept = np.stack([m for m, _ in samples[:6]])
        np.testing.assert_array_equal(kept, z[f"out/maskgen_{name}/masks"][k])
        ref = stats[str(target)]
        counts = np.array([m.sum() for m, _ in samples])
        hist = np.bincount(counts, minlength=len(ref["count_histogram"]))
        np.testing.assert_array_equal(hist, ref["count_histogram"])
        np.testing.assert_allclose(counts.std(), z[f"out/maskgen_{name}/std_count"][k], atol=1e-12)
        if target:
            for key, x in _samples(samples, target).items():
                np.testing.assert_allclose(x.mean(), ref[key], atol=1e-12, err_msg=key)


def test_collate_replays_official(z, meta):
    cfg = meta["collate"]
    gen = dinov2_masking_generator(84, 14)
    for k, seed in enumerate(cfg["python_random_seed"]):
        out = collate_masks(
            random.Random(meta["base_seed"] + seed),
            cfg["n_images"],
            gen,
            n_global_crops=cfg["n_global_crops"],
            n_tokens=cfg["n_tokens"],
            mask_ratio_tuple=tuple(cfg["mask_ratio_tuple"]),
            mask_probability=cfg["mask_probability"],
        )
        ref = f"out/collate{k}/"
        np.testing.assert_array_equal(out.collated_masks, z[ref + "collated_masks"])
        np.testing.assert_array_equal(out.mask_indices_list, z[ref + "mask_indices_list"])
        np.testing.assert_array_equal(out.masks_weight, z[ref + "masks_weight"])
        assert out.upperbound == int(z[ref + "upperbound"]) == mask_capacity(6, 36)
        assert [out.n_masked_patches] == z[ref + "n_masked_patches"].tolist()
        # Images first: masks[i, c] is row c * n_images + i.
        np.testing.assert_array_equal(out.masks[2, 1], out.collated_masks[3 + 2])
        idx, w = out.padded()
        assert idx.shape == w.shape == (39,)
        np.testing.assert_array_equal(out.collated_masks.reshape(-1)[idx[w > 0]], True)


class _UniformCells(MaskingGenerator):
    """Wrong: `target` cells drawn uniformly at random (each cell its own block)."""

    def sample_with_blocks(self, rng, num_masking_patches):
        shape = (self.height, self.width)
        cells = rng.sample(range(self.num_patches), num_masking_patches)
        blocks = [(np.arange(self.num_patches) == c).reshape(shape) for c in cells]
        return np.sum(blocks, axis=0, dtype=bool).reshape(shape), blocks


class _UniformAspect(MaskingGenerator):
    """Wrong: aspect ratio uniform (not log-uniform) in [min_aspect, 1 / min_aspect]."""

    def _block_shape(self, rng, max_new):
        area = rng.uniform(self.min_num_patches, max_new)
        aspect = rng.uniform(self.min_aspect, 1 / self.min_aspect)
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))


def _worst_z(gen_cls, name, target, refs, n_samples):
    """Largest |mean difference| / standard error over the statistics, ours vs the fixture's."""
    base = dinov2_masking_generator(*GRIDS[name])
    gen = gen_cls(base.height, base.width, max_num_patches=base.max_num_patches)
    samples = [gen.sample_with_blocks(masks_rng(1, step), target) for step in range(n_samples)]
    ours = _samples(samples, target)
    worst = 0.0
    for key, ref in refs.items():
        se = math.sqrt(ref.var() / len(ref) + ours[key].var() / len(ours[key]))
        diff = abs(ours[key].mean() - ref.mean())
        worst = max(worst, diff / se if se > 0 else (math.inf if diff > 0 else 0.0))
    return worst


@pytest.mark.parametrize("name", list(GRIDS))
def test_masking_statistics_from_our_streams(z, name):
    """Masks from masks_rng(seed, step) match the fixture's statistics within Z standard errors
    (spreads of the fixture's 400 samples, replayed above, and of ours); each wrong variant
    exceeds the same bound on at least one statistic."""
    worst = {cls.__name__: 0.0 for cls in (MaskingGenerator, _UniformCells, _UniformAspect)}
    for target in z[f"out/maskgen_{name}/targets"].tolist():
        if target == 0:
            gen = dinov2_masking_generator(*GRIDS[name])
            assert not gen(masks_rng(1, 0), 0).any()
            continue
        refs = _samples(_replay_official(name, target), target)
        for cls in (MaskingGenerator, _UniformCells, _UniformAspect):
            # The wrong variants are far off: fewer samples suffice (their standard errors grow).
            n = N_STAT_SAMPLES if cls is MaskingGenerator else N_STAT_SAMPLES // 4
            worst[cls.__name__] = max(worst[cls.__name__], _worst_z(cls, name, target, refs, n))
    print(name, "worst |z| per generator:", worst)
    assert worst["MaskingGenerator"] <= Z, worst
    assert worst["_UniformCells"] > Z, worst
    assert worst["_UniformAspect"] > Z, worst


def _iid_ratio_collate(rng, n_images, gen, n_tokens):
    """Wrong: every masked image's ratio drawn from the whole range, not its linspace bin."""
    rows = 2 * n_images
    masks = [gen(rng, int(n_tokens * rng.uniform(0.1, 0.5))) for _ in range(rows // 2)]
    masks += [gen(rng, 0) for _ in range(rows - rows // 2)]
    rng.shuffle(masks)
    return np.stack(masks).reshape(rows, -1)


def _bins_violated(collated, n_tokens, slack):
    """Sorted masked counts against the bins: the k-th smallest lies in
    [int(N p_k) - slack, int(N p_{k+1})] when image k drew from bin k."""
    counts = np.sort(collated.sum(-1))[-(collated.shape[0] // 2) :]
    probs = ratio_bins(0.1, 0.5, len(counts))
    lo = (np.float32(n_tokens) * probs[:-1]).astype(int) - slack
    hi = (np.float32(n_tokens) * probs[1:]).astype(int)
    return bool(np.any(counts < lo) or np.any(counts > hi))


def test_collate_per_ratio_counts_and_determinism(meta):
    gen = dinov2_masking_generator(224, 16)
    n_images, n_tokens = 16, 196
    # A mask stops short of its target by at most 2 tokens in all the fixture's samples.
    stats = meta["maskgen_stats"]["g14_img224_p16"]["stats"]
    slack = 1 + max(int(t) - s["min_count"] for t, s in stats.items())  # + 1 for int()
    for step in range(20):
        out = collate_masks(masks_rng(7, step), n_images, gen)
        counts = out.collated_masks.sum(-1)
        assert (counts > 0).sum() == n_images  # half the 2 * 16 global crops are masked
        assert out.n_masked_patches <= out.upperbound == mask_capacity(32, n_tokens)
        assert not _bins_violated(out.collated_masks, n_tokens, slack)
        w = masks_weight(jnp.asarray(out.collated_masks))
        np.testing.assert_allclose(jnp.sum(w, -1), (counts > 0).astype(float), rtol=1e-6)
    wrong = [_iid_ratio_collate(masks_rng(7, s), n_images, gen, n_tokens) for s in range(20)]
    assert any(_bins_violated(c, n_tokens, slack) for c in wrong)
    # Determinism: the same (seed, step, chunk) gives the same masks; others differ.
    a = collate_masks(masks_rng(7, 3), n_images, gen).collated_masks
    np.testing.assert_array_equal(a, collate_masks(masks_rng(7, 3), n_images, gen).collated_masks)
    for rng in (masks_rng(7, 4), masks_rng(8, 3), masks_rng(7, 3, chunk=1)):
        assert not np.array_equal(a, collate_masks(rng, n_images, gen).collated_masks)


def test_ratio_bins_match_torch_linspace():
    """The mask-ratio bins are PyTorch's float32 linspace bit for bit (a fused multiply-add
    per value); a plain float32 start + i * step differs in the last bit for some sizes."""
    torch = pytest.importorskip("torch")
    plain_differs = False
    for n in range(1, 300):
        ref = torch.linspace(0.1, 0.5, n + 1).numpy()
        np.testing.assert_array_equal(ratio_bins(0.1, 0.5, n), ref)
        step = np.float32((np.float32(0.5) - np.float32(0.1)) / np.float32(n))
        plain = np.float32(0.1) + step * np.arange(n + 1, dtype=np.float32)
        plain[(n + 1) // 2 :] = np.float32(0.5) - step * np.arange(
            n - (n + 1) // 2, -1, -1, dtype=np.float32
        )
        plain_differs |= not np.array_equal(plain, ref)
    assert plain_differs

"""Device multi-crop augmentation against the official torchvision/PIL outputs in augment.npz."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dino_jax.config import default_config
from dino_jax.data import augment, color, crops

RRC_H, RRC_W = 375, 500  # the dummy image of out/rrc_params_*


@pytest.fixture(scope="module")
def npz(fixtures_dir):
    with np.load(fixtures_dir / "augment.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def image(npz):
    return jnp.asarray(npz["in/image"], jnp.float32)


def _mae(ours, ref):
    return float(np.mean(np.abs(np.asarray(ours, np.float64) - ref.astype(np.float64))))


# One compilation serves every size and scale range (both are traced).
_box_sampler = jax.jit(jax.vmap(crops.sample_crop_box, in_axes=(0, None, None)))


def _sample_boxes(seed, size_hw, scale, n):
    keys = jax.random.split(jax.random.key(seed), n)
    size_hw = jnp.asarray(size_hw, jnp.int32)
    return np.asarray(_box_sampler(keys, size_hw, jnp.asarray(scale, jnp.float32)))


@pytest.mark.parametrize("kind,scale", [("global", (0.4, 1.0)), ("local", (0.05, 0.4))])
def test_crop_box_distribution_matches_torchvision(npz, kind, scale):
    ref = npz[f"out/rrc_params_{kind}"].astype(np.float64)  # (i, j, h, w)
    ours = _sample_boxes(0, (RRC_H, RRC_W), scale, len(ref)).astype(np.float64)
    assert np.all(ours[:, 0] >= 0) and np.all(ours[:, 1] >= 0)
    assert np.all(ours[:, 0] + ours[:, 2] <= RRC_H) and np.all(ours[:, 1] + ours[:, 3] <= RRC_W)
    area = lambda b: b[:, 2] * b[:, 3] / (RRC_H * RRC_W)
    aspect = lambda b: b[:, 3] / b[:, 2]
    # Where an accepted box sits in its free range: uniform for both.
    top = lambda b: (b[:, 0] + 0.5) / (RRC_H - b[:, 2] + 1)
    for name, stat in [("area", area), ("aspect", aspect), ("top", top)]:
        p = stats.ks_2samp(stat(ours), stat(ref)).pvalue
        assert p > 0.01, f"{kind} {name}: KS p = {p:.2g}"
    # The test has power: a shifted scale range is rejected.
    shifted = _sample_boxes(0, (RRC_H, RRC_W), (scale[0] * 1.25, scale[1]), len(ref))
    assert stats.ks_2samp(area(shifted.astype(np.float64)), area(ref)).pvalue < 0.01


@pytest.mark.parametrize(
    "size_hw,expected",
    [
        # torchvision fallback for W/H > 4/3: h = H, w = round(H * 4/3), centred.
        ((10, 1000), (0, (1000 - 13) // 2, 10, 13)),
        # W/H < 3/4: w = W, h = round(W / (3/4)), centred.
        ((1000, 10), ((1000 - 13) // 2, 0, 13, 10)),
        ((7, 300), (0, (300 - 9) // 2, 7, 9)),
    ],
)
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_box_fallback_on_elongated_images(size_hw, expected, scale):
    boxes = _sample_boxes(1, size_hw, scale, 4000)
    np.testing.assert_array_equal(boxes, np.tile(np.asarray(expected), (4000, 1)))


def test_crop_boxes_stay_inside_valid_image():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 400, size=(512, 2)).astype(np.int32)
    keys = jax.random.split(jax.random.key(2), len(sizes))
    fn = jax.jit(jax.vmap(lambda k, s: crops.sample_crop_box(k, s, (0.05, 1.0))))
    boxes = np.asarray(fn(keys, sizes))
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] >= 1)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= sizes[:, 0])
    assert np.all(boxes[:, 1] + boxes[:, 3] <= sizes[:, 1])


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_adjust_ops_match_torchvision(npz, image, op):
    fn = jax.jit(getattr(color, f"adjust_{op}"))
    for factor, ref in zip(npz[f"in/{op}_factors"], npz[f"out/{op}"], strict=True):
        err = _mae(fn(image, jnp.float32(factor)), ref)
        assert err <= 1.0, f"{op}({factor}): mean abs error {err:.3f}"
        if factor != 1.0:
            assert _mae(image, ref) > 2.0  # the op does something the check can see


def test_grayscale_and_solarize_match_pil(npz, image):
    assert _mae(color.grayscale(image), npz["out/grayscale"]) <= 1.0
    assert _mae(color.solarize(image), npz["out/solarize"]) <= 1.0


def test_gaussian_blur_matches_pil(npz, image):
    fn = jax.jit(color.gaussian_blur)
    for radius, ref in zip(npz["in/blur_radii"], npz["out/gaussian_blur"], strict=True):
        err = _mae(fn(image, jnp.float32(radius)), ref)
        assert err <= 2.0, f"blur radius {radius}: mean abs error {err:.3f}"
    # A radius at the top of the range blurs visibly.
    assert _mae(image, npz["out/gaussian_blur"][-1]) > 2.0


@pytest.mark.parametrize("draw", [0, 1])
def test_color_jitter_matches_torchvision_order(npz, image, draw):
    order = jnp.asarray(npz[f"in/colorjitter{draw}/fn_idx"], jnp.int32)
    factors = jnp.asarray(npz[f"in/colorjitter{draw}/factors"], jnp.float32)
    ref = npz[f"out/colorjitter{draw}"]
    fn = jax.jit(color.color_jitter)
    err = _mae(fn(image, order, factors), ref)
    assert err <= 2.0, f"color jitter {draw}: mean abs error {err:.3f}"
    # Order matters and is honoured: the reversed order misses the reference.
    assert _mae(fn(image, order[::-1], factors), ref) > err + 0.5


def test_color_jitter_every_order_equals_sequential_ops(image):
    ops = [color.adjust_brightness, color.adjust_contrast, color.adjust_saturation]
    ops = [jax.jit(op) for op in [*ops, color.adjust_hue]]
    factors = jnp.asarray([1.3, 0.7, 1.2, 0.08], jnp.float32)
    small = image[::4, ::4]
    fn = jax.jit(color.color_jitter)
    outputs = set()
    for order in itertools.permutations(range(4)):
        expected = small
        for op in order:
            expected = ops[op](expected, factors[op])
        ours = np.asarray(fn(small, jnp.asarray(order, jnp.int32), factors))
        np.testing.assert_array_equal(ours, np.asarray(expected), err_msg=f"order {order}")
        outputs.add(ours.tobytes())
    assert len(outputs) > 12  # orders do give different images


def test_resized_crop_matches_pil_bicubic(npz):
    # The image sits in a zero-padded canvas, as the host delivers it.
    canvas = np.zeros((160, 144, 3), np.uint8)
    canvas[:96, :128] = npz["in/image"]
    fn = jax.jit(crops.resized_crop, static_argnums=2)
    for box, ref in zip(npz["in/crop_boxes"], npz["out/resized_crop"], strict=True):
        err = _mae(fn(jnp.asarray(canvas), jnp.asarray(box), (48, 48)), ref)
        assert err <= 2.0, f"box {box}: mean abs error {err:.3f}"


def test_resized_crop_flip_and_eval_box(npz):
    img = npz["in/image"]
    fn = jax.jit(crops.resized_crop, static_argnums=2)
    box = jnp.asarray([10, 20, 60, 80])
    plain = fn(jnp.asarray(img), box, (40, 40), flip=False)
    flipped = fn(jnp.asarray(img), box, (40, 40), flip=True)
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
    # Eval: torchvision Resize(64) + CenterCrop(56) on PIL is one fractional box.
    height, width = img.shape[:2]
    new_w = int(64 * width / height)
    resized = Image.fromarray(img).resize((new_w, 64), Image.BICUBIC)
    top, left = round((64 - 56) / 2), round((new_w - 56) / 2)
    ref = np.asarray(resized.crop((left, top, left + 56, top + 56)))
    eval_box = crops.resize_center_crop_box(jnp.asarray([height, width]), 64, 56)
    ours = fn(jnp.asarray(img), eval_box, (56, 56), within=jnp.asarray([0, 0, height, width]))
    assert _mae(ours, ref) <= 1.0


def crop_config(**overrides) -> augment.MultiCropConfig:
    """The official multi-crop settings of default_config() with `overrides`."""
    aug = default_config().aug
    aug.update(overrides)
    return augment.MultiCropConfig.from_config(aug)


def _config(**overrides):
    return crop_config(**{"global_size": 32, "local_size": 16, "n_local": 3, **overrides})


def test_gate_probabilities_and_parameter_ranges():
    cfg = crop_config(n_local=4)
    n = 4000
    keys = jax.random.split(jax.random.key(3), n)
    sizes = jnp.tile(jnp.asarray([[375, 500]], jnp.int32), (n, 1))
    g, loc = jax.jit(augment.multicrop_params, static_argnums=2)(keys, sizes, cfg)
    g, loc = jax.tree.map(np.asarray, (g, loc))

    def check(decisions, p, what):
        freq = decisions.mean()
        se = np.sqrt(max(p * (1 - p), 1e-12) / decisions.size)
        assert abs(freq - p) <= 3 * se, f"{what}: {freq:.4f} vs p = {p}"

    for params in (g, loc):
        check(params.flip, cfg.flip_prob, "flip")
        check(params.jitter, cfg.jitter_prob, "jitter")
        check(params.grayscale, cfg.grayscale_prob, "grayscale")
        assert np.all(np.sort(params.order, axis=-1) == np.arange(4))
        for pos in range(4):
            check(params.order[..., 0] == pos, 0.25, f"first jitter op {pos}")
        lo = [0.6, 0.6, 0.8, -0.1]
        hi = [1.4, 1.4, 1.2, 0.1]
        assert np.all((params.factors >= lo) & (params.factors <= hi))
        np.testing.assert_allclose(params.factors.mean(axis=(0, 1)), [1, 1, 1, 0], atol=0.02)
        assert np.all((params.radius >= 0.1) & (params.radius <= 2.0))
    probs = zip(cfg.global_blur_prob, cfg.global_solarize_prob, strict=True)
    for i, (blur_p, sol_p) in enumerate(probs):
        check(g.blur[:, i], blur_p, f"global {i} blur")
        check(g.solarize[:, i], sol_p, f"global {i} solarize")
    check(loc.blur, cfg.local_blur_prob, "local blur")
    assert not loc.solarize.any()
    # Local boxes follow the local scale range (area <= 0.4 of the image, up to rounding).
    area = loc.box[..., 2] * loc.box[..., 3] / (375 * 500)
    assert area.max() <= 0.41 and np.median(area) < 0.3


def test_multicrop_shapes_dtype_and_determinism():
    cfg = _config()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 48, 3)).astype(np.uint8)
    sizes = np.asarray([[48, 48], [30, 40], [48, 20]], np.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    fn = jax.jit(functools.partial(augment.multicrop, cfg=cfg, dtype=jnp.bfloat16))
    g, loc = fn(keys, images, sizes)
    assert g.shape == (3, 2, 32, 32, 3) and g.dtype == jnp.bfloat16
    assert loc.shape == (3, 3, 16, 16, 3) and loc.dtype == jnp.bfloat16
    g2, loc2 = fn(keys, images, sizes)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g2, np.float32))
    np.testing.assert_array_equal(np.asarray(loc, np.float32), np.asarray(loc2, np.float32))
    # Example i's crops depend only on its own key: permuting the batch permutes the output.
    perm = np.asarray([2, 0, 1])
    g3, _ = fn(keys[perm], images[perm], sizes[perm])
    np.testing.assert_array_equal(np.asarray(g3, np.float32), np.asarray(g, np.float32)[perm])
    g4, _ = fn(jax.random.split(jax.random.key(1), 3), images, sizes)
    assert not np.array_equal(np.asarray(g4, np.float32), np.asarray(g, np.float32))


def test_crops_never_read_padding_and_gates_take_effect():
    # A coloured valid region on a zero canvas: any padding read would leave a dark border.
    # Forced grayscale gives PIL's grey level everywhere, forced solarize inverts it.
    cfg = _config(
        jitter_prob=0.0,
        grayscale_prob=1.0,
        global_blur_prob=(0.0, 0.0),
        global_solarize_prob=(0.0, 1.0),
        local_blur_prob=0.0,
    )
    sizes = np.asarray([[40, 25], [64, 64], [7, 64], [64, 3], [1, 1], [33, 50]], np.int32)
    images = np.zeros((len(sizes), 64, 64, 3), np.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :h, :w] = (200, 120, 40)
    keys = jax.random.split(jax.random.key(4), len(sizes))
    g, loc = jax.jit(functools.partial(augment.multicrop, cfg=cfg))(keys, images, sizes)
    to_pixels = lambda x: (np.asarray(x) * np.asarray(cfg.std) + np.asarray(cfg.mean)) * 255
    grey = (19595 * 200 + 38470 * 120 + 7471 * 40 + 0x8000) >> 16  # PIL "L": 135 >= 128
    np.testing.assert_allclose(to_pixels(g[:, 0]), grey, atol=1e-3)
    np.testing.assert_allclose(to_pixels(g[:, 1]), 255 - grey, atol=1e-3)
    np.testing.assert_allclose(to_pixels(loc), grey, atol=1e-3)


def test_config_from_configdict_and_validation():
    aug = ml_collections.ConfigDict(
        {
            "global_size": 224,
            "local_size": 96,
            "n_global": 2,
            "n_local": 10,
            "global_scale": (0.4, 1.0),
            "local_scale": (0.05, 0.4),
            "ratio": (3 / 4, 4 / 3),
            "flip_prob": 0.5,
            "jitter_prob": 0.8,
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.2,
            "hue": 0.1,
            "grayscale_prob": 0.2,
            "global_blur_prob": (1.0, 0.1),
            "global_solarize_prob": (0.0, 0.2),
            "local_blur_prob": 0.5,
            "blur_radius": (0.1, 2.0),
            "mean": augment.IMAGENET_MEAN,
            "std": augment.IMAGENET_STD,
        }
    )
    cfg = augment.MultiCropConfig.from_config(default_config().aug)
    assert cfg == augment.MultiCropConfig(**aug.to_dict())
    hash(cfg)  # static argument of jit
    bad = [
        {"global_scale": (0.5, 0.4)},
        {"local_scale": (0.0, 0.4)},
        {"jitter_prob": 1.5},
        {"global_blur_prob": (1.0,)},
        {"global_solarize_prob": (0.0, -0.1)},
        {"hue": 0.7},
        {"std": (0.2, 0.0, 0.2)},
        {"n_local": -1},
    ]
    for overrides in bad:
        with pytest.raises(ValueError, match="aug\\."):
            crop_config(**overrides)

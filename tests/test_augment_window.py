"""config.aug.window: each crop resampled from a static window of the canvas gives the crops of the
whole-canvas resampling (dino_jax.data.crops.resized_crop, window=)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import cli
from dino_jax.config import default_config
from dino_jax.data import augment, crops

RATIO = (3 / 4, 4 / 3)
LOCAL, GLOBAL = (0.05, 0.4), (0.4, 1.0)
# Below 1 ulp of 1 in float32: the largest uniform [0, 1) draw.
TOP_U = 1.0 - 2.0**-24


def _aug(recipe: str, window: bool):
    aug = cli.load_config(recipe).aug if recipe == "demo" else default_config().aug
    aug.window = window
    return aug


def _cfg(recipe: str, window: bool, **overrides) -> augment.MultiCropConfig:
    aug = _aug(recipe, window)
    aug.update(overrides)
    return augment.MultiCropConfig.from_config(aug)


def assert_same_crops(ours, ref, levels_per_unit=1.0):
    """Equal up to float32 summation order: the two resamplings add the same products in other
    orders, so a value whose exact result is an 8-bit rounding tie (x.5) may round to the next
    level. Anything else (a missing pixel, a shifted weight) moves many values by more."""
    levels = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) * levels_per_unit
    assert levels.max() <= 1.0 + 1e-3, f"max difference {levels.max():.3f} levels"
    differing = float(np.mean(levels > 1e-3))
    assert differing <= 1e-4, f"{differing:.2e} of the values differ"


def _levels_per_unit(cfg):
    # Normalised crops back to 8-bit levels: x = (v / 255 - mean) / std.
    return 255.0 * np.asarray(cfg.std)


# One compilation serves every size and scale range (both traced).
_boxes = jax.jit(
    jax.vmap(lambda u, hw, s: crops.crop_box_from_uniforms(u, hw, s, RATIO), (0, 0, None))
)


def _extreme_uniforms(rng, n):
    """Box draws mixing random uniforms with the corners of the (area, ratio) range, where the
    largest, tallest and widest boxes and the fallbacks come from."""
    u = rng.random((n, crops.BOX_UNIFORMS))
    tries = slice(0, 2 * crops.RRC_TRIES)
    corner = rng.random((n, 2 * crops.RRC_TRIES)) < 0.5
    u[:, tries] = np.where(
        corner, np.where(rng.random(corner.shape) < 0.5, 0.0, TOP_U), u[:, tries]
    )
    u[: n // 4, 2 * crops.RRC_TRIES :] = TOP_U  # the box at the far corner of the image
    return u.astype(np.float32)


def _largest_draw(canvas, scale):
    # The largest area at the extreme aspect on the full square image, when it fits.
    return min(canvas, round(canvas * math.sqrt(scale[1] / RATIO[0])))


@pytest.mark.parametrize(
    "canvas,scale,side",
    [
        (28, LOCAL, _largest_draw(28, LOCAL)),  # demo
        (28, GLOBAL, 28),
        (512, LOCAL, _largest_draw(512, LOCAL)),  # official
        (64, (0.002, 0.3), _largest_draw(64, (0.002, 0.3))),  # empty draws on small images
        # Images of aspect (0.75, 0.93) can fail every large draw and fall back to the whole
        # image, larger than any accepted draw (62).
        (64, (0.3, 0.7), 64),
    ],
)
def test_max_crop_box_bounds_every_drawn_box(canvas, scale, side):
    rng = np.random.default_rng(canvas)
    if canvas <= 64:  # every image size that fits the canvas
        hw = np.stack(np.meshgrid(np.arange(1, canvas + 1), np.arange(1, canvas + 1)), -1)
        sizes = np.repeat(hw.reshape(-1, 2), 2, axis=0)
    else:  # full-size, random and elongated images
        sizes = rng.integers(1, canvas + 1, (4000, 2))
        sizes[:1000] = canvas
        sizes[1000:2000, 1] = rng.integers(1, canvas // 3, 1000)
        sizes[2000:3000, 0] = rng.integers(1, canvas // 3, 1000)
    u = _extreme_uniforms(rng, len(sizes))
    # Every try at the tallest, then at the widest corner: the largest accepted draws, or the
    # fallback where those fail.
    tallest, widest = u.copy(), u.copy()
    tallest[:, : crops.RRC_TRIES], tallest[:, crops.RRC_TRIES : 2 * crops.RRC_TRIES] = TOP_U, 0.0
    widest[:, : 2 * crops.RRC_TRIES] = TOP_U
    u, sizes = np.concatenate([u, tallest, widest]), np.concatenate([sizes] * 3)
    boxes = np.asarray(_boxes(u, sizes.astype(np.int32), jnp.asarray(scale)))
    bound = crops.max_crop_box((canvas, canvas), scale, RATIO)
    assert boxes[:, 2].max() <= bound[0] and boxes[:, 3].max() <= bound[1]
    # Tight: drawn boxes reach it.
    assert (boxes[:, 2].max(), boxes[:, 3].max()) == bound == (side, side)


def _images(rng, n, canvas):
    """Noise canvases with the content in the top-left corner, the rest zero, as the host gives
    them: full-size, random and elongated contents."""
    sizes = rng.integers(1, canvas + 1, (n, 2))
    sizes[: n // 3] = canvas
    sizes[n // 3 : n // 2, 1] = rng.integers(1, max(2, canvas // 4), n // 2 - n // 3)
    images = rng.integers(0, 256, (n, canvas, canvas, 3)).astype(np.uint8)
    rows, cols = np.arange(canvas)[:, None], np.arange(canvas)[None, :]
    inside = (rows < sizes[:, 0, None, None]) & (cols < sizes[:, 1, None, None])
    return np.where(inside[..., None], images, 0).astype(np.uint8), sizes.astype(np.int32)


def _box_cases(canvas, window):
    """(top, left, height, width) boxes on an L-canvas: the window's tallest and widest boxes at
    each corner, single pixels at the far corner, a thin strip."""
    wh, ww = window
    cases = []
    for h, w in ((wh, max(1, round(wh * RATIO[0]))), (max(1, round(ww * RATIO[0])), ww)):
        cases += [(0, 0, h, w), (canvas - h, canvas - w, h, w), (0, canvas - w, h, w)]
        cases += [(canvas - h, 0, h, w)]
    cases += [(canvas - 1, canvas - 1, 1, 1), (0, canvas - 1, 1, 1)]
    cases += [(canvas // 3, canvas - ww, 2, ww), (canvas - wh, canvas // 2, wh, 1)]
    return np.asarray(cases, np.int32)


@functools.partial(jax.jit, static_argnames=("out", "window"))
def _resize(images, boxes, flips, out, window):
    fn = functools.partial(crops.resized_crop, out_hw=(out, out), window=window)
    return jax.vmap(lambda im, b, f: fn(im, b, flip=f))(images, boxes, flips)


@pytest.mark.parametrize("canvas,out", [(28, 14), (512, 96)])  # demo; official 96 from 512^2
def test_windowed_resize_equals_full_canvas_and_a_window_too_small_fails(canvas, out):
    # Global crops keep the whole canvas (scale up to 1: asserted in
    # test_config_threads_window_to_the_crops), so local crops are the windowed ones.
    window = crops.max_crop_box((canvas, canvas), LOCAL, RATIO)
    rng = np.random.default_rng(canvas)
    n_drawn = 12
    images, sizes = _images(rng, n_drawn, canvas)
    drawn = np.asarray(_boxes(_extreme_uniforms(rng, n_drawn), sizes, jnp.asarray(LOCAL)))
    extreme = _box_cases(canvas, window)
    boxes = np.concatenate([drawn, extreme, extreme])
    flips = np.concatenate([rng.random(n_drawn) < 0.5, np.arange(2 * len(extreme)) % 2 == 1])
    noise = rng.integers(0, 256, (2 * len(extreme), canvas, canvas, 3)).astype(np.uint8)
    images = np.concatenate([images, noise])
    ref = _resize(images, boxes, flips, out, None)
    assert_same_crops(_resize(images, boxes, flips, out, window), ref)
    # A wrong variant: a window one pixel short of the tallest box leaves a row out.
    short = (window[0] - 1, window[1] - 1)
    with pytest.raises(AssertionError):
        assert_same_crops(_resize(images, boxes, flips, out, short), ref)


def test_eval_box_needs_the_bicubic_support_margin():
    # Resize + centre crop reads the whole image (`within`), so the pixels with a weight reach
    # 2 * max(scale, 1) past the box: a window of the box alone misses them.
    canvas, short_side, crop = 64, 36, 24
    sizes = np.asarray([[64, 64], [50, 64], [64, 41], [30, 57]], np.int32)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (len(sizes), canvas, canvas, 3)).astype(np.uint8)
    boxes = jax.vmap(lambda s: crops.resize_center_crop_box(s, short_side, crop))(sizes)
    within = np.concatenate([np.zeros_like(sizes), sizes], axis=1)
    longest = float(np.max(np.asarray(boxes)[:, 2:]))

    @functools.partial(jax.jit, static_argnames="window")
    def resize(window):
        fn = functools.partial(crops.resized_crop, out_hw=(crop, crop), window=window)
        return jax.vmap(lambda im, b, w: fn(im, b, within=w))(images, boxes, within)

    span = crops.support_span(longest, crop)
    assert span < canvas  # the test cuts a real window
    assert_same_crops(resize((span, span)), resize(None))
    no_margin = (math.ceil(longest) + 1,) * 2
    with pytest.raises(AssertionError):
        assert_same_crops(resize(no_margin), resize(None))


def test_config_threads_window_to_the_crops():
    assert augment.MultiCropConfig.from_config(_aug("default", False)).window is False
    cfg = augment.MultiCropConfig.from_config(_aug("default", True))
    assert cfg.window is True
    canvas = default_config().data.canvas_size
    assert augment.crop_window(cfg, cfg.global_scale, (canvas, canvas)) is None  # all of it
    local = augment.crop_window(cfg, cfg.local_scale, (canvas, canvas))
    assert local == crops.max_crop_box((canvas, canvas), cfg.local_scale, cfg.ratio)
    assert local[0] < canvas and local[1] < canvas
    assert augment.crop_window(_cfg("default", False), cfg.local_scale, (canvas, canvas)) is None

    # The windowed program converts and resamples the window, never the whole canvas.
    image = jnp.zeros((canvas, canvas, 3), jnp.uint8)
    fn = functools.partial(crops.resized_crop, box=jnp.asarray([0, 0, 10, 10]), out_hw=(96, 96))
    windowed = str(jax.make_jaxpr(functools.partial(fn, window=local))(image))
    whole = str(jax.make_jaxpr(fn)(image))
    assert f"f32[{local[0]},{local[1]},3]" in windowed and f"f32[{canvas},{canvas},3]" in whole
    assert f"f32[{canvas},{canvas},3]" not in windowed


def test_windowed_multicrop_equals_full_canvas_demo():
    full, windowed = _cfg("demo", False), _cfg("demo", True)
    canvas = cli.load_config("demo").data.canvas_size
    assert augment.crop_window(windowed, windowed.local_scale, (canvas, canvas)) is not None

    @jax.jit
    def both(keys, images, sizes):
        return augment.multicrop(keys, images, sizes, full), augment.multicrop(
            keys, images, sizes, windowed
        )

    rng = np.random.default_rng(3)
    for seed in range(3):
        images, sizes = _images(rng, 64, canvas)
        keys = jax.random.split(jax.random.key(seed), len(sizes))
        (g, loc), (g_w, loc_w) = both(keys, images, sizes)
        np.testing.assert_array_equal(np.asarray(g_w), np.asarray(g))  # the same program
        assert_same_crops(loc_w, loc, _levels_per_unit(full))

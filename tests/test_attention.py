"""Attention maps: CLS -> patch maps, the official threshold masks, PNGs from .pth and work dirs."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import tiny_eval_config
from PIL import Image
from skimage import data

from dino_jax import parallel
from dino_jax.evaluate import attention
from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.weights import load_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_train_config():
    return tiny_eval_config(1)


@pytest.fixture(scope="module")
def official():
    return load_weights(ROOT / "tests" / "fixtures" / "backbone.pth", num_heads=2)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((120, 100), Image.BILINEAR).save(path)
    return path


def brute_force_masks(maps, threshold):
    """The official loop, one head at a time: sort ascending, normalise, cumulative sum, keep
    where it exceeds 1 - threshold, put back in grid order."""
    heads, h, w = maps.shape
    out = np.zeros((heads, h * w), bool)
    for j in range(heads):
        values = maps[j].reshape(-1)
        order = sorted(range(h * w), key=lambda i: values[i])  # stable: ties in grid order
        total = np.sum(values[order])
        cum = 0.0
        for i in order:
            cum += values[i] / total
            out[j, i] = cum > 1.0 - threshold
    return out.reshape(heads, h, w)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 1.0])
def test_threshold_masks_match_the_official_algorithm(threshold):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 7)) ** 3
    maps[1] = np.round(maps[1] * 4) / 4 + 0.01  # many exact ties
    masks = attention.threshold_masks(maps, threshold)
    np.testing.assert_array_equal(masks, brute_force_masks(maps, threshold))
    # The kept patches are the fewest holding the asked-for mass: the largest ones, and
    # without the smallest kept patch the mass falls below the threshold (distinct values).
    for m, keep in zip(maps[[0, 2]], masks[[0, 2]], strict=True):
        p = m / m.sum()
        kept = np.sort(p[keep])
        assert kept.sum() >= threshold - 1e-12
        if keep.any():
            assert kept.min() >= p[~keep].max(initial=0.0)
            assert kept.sum() - kept[0] < threshold
    # Exact ties with the boundary: the official test is strict (cumsum > 1 - threshold), and
    # among equal values the later ones in grid order are kept.
    even = attention.threshold_masks(np.ones((1, 2, 2)), 0.5)
    np.testing.assert_array_equal(even, [[[False, False], [True, True]]])
    with pytest.raises(ValueError, match="threshold"):
        attention.threshold_masks(maps, 1.5)


def test_cls_attention_is_the_last_blocks_cls_row(official):
    backbone, variables, info = official
    image = attention.prepare_image(data.astronaut(), (40, 56), backbone.patch_size)
    assert image.shape == (40, 56, 3)
    maps = attention.attention_of(backbone, variables, image, info.mean, info.std)
    heads, rows, cols = maps.shape
    assert (heads, rows, cols) == (2, 5, 7)
    x = (image / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    apply = jax.jit(lambda v, x: backbone.apply(v, x, return_attention=True))
    out = apply(variables, jnp.asarray(x[None], jnp.float32))
    full = np.asarray(out.attention)[0]  # (heads, 1 + N, 1 + N)
    np.testing.assert_allclose(full.sum(-1), 1.0, rtol=1e-5)
    # Each map holds the CLS query's mass on the patches: all of it but the CLS key's.
    np.testing.assert_allclose(maps.sum((1, 2)), 1.0 - full[:, 0, 0], rtol=1e-5)
    for r, c in [(0, 0), (0, 6), (4, 0), (3, 5)]:  # row-major patch order of the grid
        np.testing.assert_allclose(maps[:, r, c], full[:, 0, 1 + r * cols + c], rtol=1e-6)
    up = attention.upsample(maps, backbone.patch_size)
    assert up.shape == (2, 40, 56)
    np.testing.assert_allclose(up.sum((1, 2)), maps.sum((1, 2)) * 64, rtol=1e-5)
    np.testing.assert_array_equal(up[:, 8:16, 16:24], np.broadcast_to(maps[:, 1:2, 2:3], (2, 8, 8)))


def test_prepare_image_resizes_as_torchvision_and_cuts_to_patches():
    image = np.zeros((100, 150, 3), np.uint8)
    assert attention.prepare_image(image, 50, 8).shape == (48, 72, 3)  # 50 x 75, cut
    assert attention.prepare_image(image.transpose(1, 0, 2), 50, 8).shape == (72, 48, 3)
    assert attention.prepare_image(image, (40, 70), 16).shape == (32, 64, 3)
    assert attention.prepare_image(image[..., 0], None, 16).shape == (96, 144, 3)  # greyscale
    with pytest.raises(ValueError, match="patch"):
        attention.prepare_image(image, 4, 8)


def decode(path):
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def test_attention_command_on_a_photo_with_an_official_backbone(official, photo, tmp_path):
    out = tmp_path / "attn"
    result = evaluate(
        [
            "attention",
            "--weights",
            str(ROOT / "tests/fixtures/backbone.pth"),
            "--num_heads",
            "2",
            "--image",
            str(photo),
            "--image_size",
            "64",
            "--out",
            str(out),
        ]
    )
    names = sorted(os.path.basename(p) for p in result["written"])
    assert names == [
        "attention.npz",
        "attn-head0.png",
        "attn-head1.png",
        "image.png",
        "mask-head0.png",
        "mask-head1.png",
        "overview.png",
    ]
    saved = np.load(out / "attention.npz")
    assert saved["image"].shape == (64, 72, 3)  # 100 x 120 -> 64 x 76 -> whole 8-px patches
    np.testing.assert_array_equal(decode(out / "image.png"), saved["image"])
    maps = saved["attention"]
    backbone, variables, info = official
    np.testing.assert_allclose(
        maps, attention.attention_of(backbone, variables, saved["image"], info.mean, info.std)
    )
    np.testing.assert_array_equal(saved["masks"], attention.threshold_masks(maps, 0.6))
    for j in range(2):
        heat = decode(out / f"attn-head{j}.png")
        assert heat.shape == (64, 72, 3)
        # The hottest patch is drawn in the ramp's top colour, at its place in the image.
        r, c = np.unravel_index(np.argmax(maps[j]), maps[j].shape)
        np.testing.assert_array_equal(heat[8 * r + 4, 8 * c + 4], [253, 231, 37])
        mask = decode(out / f"mask-head{j}.png")
        kept = attention.upsample(saved["masks"][j], 8)
        np.testing.assert_array_equal(mask[kept], saved["image"][kept])  # kept pixels intact
        assert (mask[~kept].astype(int) <= saved["image"][~kept].astype(int) * 0.25 + 41).all()
    sheet = decode(out / "overview.png")
    assert sheet.shape == (4 + 2 * 68, 4 + 3 * 76, 3)  # 2 rows, image + 2 heads


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dino_jax.trainer import train

    path = tmp_path_factory.mktemp("run")
    assert train(tiny_train_config(), str(path)).status == "max_steps"
    return path


def test_demo_attention_and_the_command_on_a_trained_work_directory(workdir, photo, tmp_path):
    backbone, variables, info = load_weights(workdir)
    config = info.config
    config.data.eval_test_split = "test"
    config.eval.attention_images = 2
    # As the trainer passes them: params replicated over the 8-device mesh.
    params = jax.device_put(variables, parallel.replicated(parallel.make_mesh()))
    written = attention.save_demo_attention(config, backbone, params, str(workdir))
    assert {os.path.relpath(p, workdir).split(os.sep)[1] for p in written} == {"00", "01"}
    image = decode(workdir / "attention" / "01" / "image.png")
    assert image.shape == (224, 224, 3)  # 28 px -> eval crop 16 -> x14 for viewing
    assert decode(workdir / "attention" / "01" / "overview.png").shape == (460, 4 + 3 * 228, 3)
    saved = np.load(workdir / "attention" / "01" / "attention.npz")
    assert saved["attention"].shape == (2, 4, 4)
    np.testing.assert_array_equal(image[::14, ::14], saved["image"])  # nearest upsampling

    result = evaluate(
        [
            "attention",
            "--weights",
            str(workdir),
            "--image",
            str(photo),
            "--image_size",
            "32",
            "--threshold",
            "-1",
            "--out",
            str(tmp_path / "photo"),
        ]
    )
    assert result["source"] == "workdir" and result["step"] == 1
    assert not (tmp_path / "photo" / "mask-head0.png").exists()  # no threshold, no masks
    assert decode(tmp_path / "photo" / "attn-head1.png").shape == (32, 36, 3)

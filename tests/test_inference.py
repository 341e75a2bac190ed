"""dino_jax.preprocess / dino_jax.features: the k-NN evaluation's own input and features, the
official eval transform, every backbone family, one compilation per shape, clear refusals."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import data_config
from PIL import Image
from skimage import data

import dino_jax
from dino_jax import inference, parallel
from dino_jax.config import default_config
from dino_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.data.pipeline import eval_data
from dino_jax.evaluate.features import eval_transform, split_features
from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import VisionTransformer
from dino_jax.models.vit2 import DinoVisionTransformer
from dino_jax.models.vit3 import VisionTransformer3
from dino_jax.models.xcit import XCiT

PHOTOS = {"astronaut": "png", "chelsea": "jpeg", "coffee": "png"}  # 512 x 512, 300 x 451, 400 x 600


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The photos as an image folder, one class each (the label tells which photo a row is)."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for name, fmt in PHOTOS.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        paths.append(folder / f"{name}.{fmt}")
        Image.fromarray(getattr(data, name)()).save(paths[-1], quality=90)
    return root, paths


def random_variables(model, seed=0):
    """Random values of the module's shapes (BatchNorm variances positive): no compiled init,
    which costs seconds per family on a CPU."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = 0.3 * rng.normal(size=leaf.shape)
        positive = "'var'" in jax.tree_util.keystr(path)
        return np.asarray(np.abs(values) + 0.5 if positive else values, leaf.dtype)

    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return jax.tree_util.tree_map_with_path(draw, shapes)


def knn_config(root, canvas_size):
    c = default_config()
    c.data = data_config(source="folder", data_dir=str(root), canvas_size=canvas_size)
    c.data.eval_train_split = c.data.eval_test_split = "train"
    c.eval.batch_size = 8
    return c


@pytest.mark.parametrize("canvas_size", [512, 384])  # 384: every photo downscaled on the host
def test_preprocess_is_the_knn_evaluations_input(photos, canvas_size):
    root, paths = photos
    config = knn_config(root, canvas_size)
    batch = next(iter(eval_data(config.data, "train", 8)))
    valid = np.flatnonzero(batch["mask"])
    assert len(valid) == 3
    # jitted, as the k-NN evaluation runs it (feature_fn)
    transform = jax.jit(eval_transform, static_argnames=("resize", "crop", "mean", "std", "dtype"))
    pipeline = transform(
        jnp.asarray(batch["image"][valid]),
        jnp.asarray(batch["size"][valid]),
        resize=config.eval.resize,
        crop=config.eval.crop,
        mean=tuple(config.aug.mean),
        std=tuple(config.aug.std),
        dtype=jnp.float32,
    )
    in_order = [paths[i] for i in batch["label"][valid]]
    ours = inference.preprocess(in_order, canvas_size=canvas_size)
    assert ours.shape == (3, 224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, np.asarray(pipeline))
    if canvas_size == 384:  # the host downscale is part of it: skipping it gives other inputs
        unfitted = inference.preprocess(in_order, canvas_size=None)
        assert (np.abs(unfitted - ours).max(axis=(1, 2, 3)) > 0).all()


def test_features_are_the_knn_evaluations_features(photos):
    """The whole k-NN feature path (folder source, host canvas, device transform, sharded
    ViT) gives the CLS features of preprocess + features."""
    root, paths = photos
    config = knn_config(root, 512)
    model = VisionTransformer(patch_size=16, embed_dim=16, depth=1, num_heads=2, img_size=224)
    variables = random_variables(model)
    mesh = parallel.make_mesh()
    feats, labels = split_features(config, model, variables, mesh, "train")
    ours = inference.features(model, variables, inference.preprocess([paths[i] for i in labels]))
    np.testing.assert_allclose(ours.cls, feats, rtol=1e-5, atol=1e-6)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # the photos do give different features


def official_eval_transform(image, resize=256, crop=224, resample=Image.BICUBIC, shift=0):
    """torchvision Resize(resize, interpolation=3) + CenterCrop(crop) on a PIL image, in 0..255."""
    pil = Image.fromarray(image)
    width, height = pil.size
    if height <= width:
        new_h, new_w = resize, int(resize * width / height)
    else:
        new_h, new_w = int(resize * height / width), resize
    pil = pil.resize((new_w, new_h), resample)
    top, left = round((new_h - crop) / 2), round((new_w - crop) / 2) + shift
    return np.asarray(pil.crop((left, top, left + crop, top + crop)), np.float32)


def to_pixels(x):
    return (x * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255.0


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_preprocess_matches_the_official_eval_transform(name):
    image = getattr(data, name)()
    ours = to_pixels(inference.preprocess(image, canvas_size=None)[0])

    def error(**variant):
        return np.abs(ours - official_eval_transform(image, **variant)).mean()

    # PIL's 8-bit bicubic up to a rare off-by-one rounding; a bilinear resize or a crop one
    # pixel off are far beyond that.
    assert error() < 0.01
    assert np.abs(ours - official_eval_transform(image)).max() <= 1.0 + 1e-3
    assert error(resample=Image.BILINEAR) > 0.5
    assert error(shift=1) > 3.0


def test_every_kind_of_input_gives_the_same_result(tmp_path):
    image = data.chelsea()
    path = tmp_path / "cat.png"
    Image.fromarray(image).save(path)
    reference = inference.preprocess(image, resize=64, crop=56)
    assert reference.shape == (1, 56, 56, 3)
    rgba = np.concatenate([image, np.full((*image.shape[:2], 1), 7, np.uint8)], axis=-1)
    for same in (
        str(path),
        path,
        Image.fromarray(image),
        [image],
        image[None],
        rgba,
        Image.fromarray(rgba),
    ):
        np.testing.assert_array_equal(inference.preprocess(same, resize=64, crop=56), reference)
    grey = image[..., 0]
    np.testing.assert_array_equal(
        inference.preprocess(grey, resize=64, crop=56),
        inference.preprocess(np.repeat(grey[..., None], 3, -1), resize=64, crop=56),
    )
    mixed = inference.preprocess([image, data.astronaut(), path], resize=64, crop=56, batch_size=2)
    assert mixed.shape == (3, 56, 56, 3)
    np.testing.assert_array_equal(mixed[[0, 2]], np.concatenate([reference, reference]))
    np.testing.assert_array_equal(
        mixed[1:2], inference.preprocess(data.astronaut(), resize=64, crop=56)
    )


def test_bad_inputs_are_refused_with_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    cases = {
        "uint8": np.zeros((32, 32, 3), np.float32),
        "(H, W, 3) RGB": np.zeros((32, 32, 2), np.uint8),
        "cannot be read": tmp_path / "missing.png",
        "notes.txt": tmp_path / "notes.txt",
        "no images": [],
        "an empty image": np.zeros((0, 8, 3), np.uint8),
    }
    for message, images in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            inference.preprocess(images)
    with pytest.raises(ValueError, match="crop <= resize"):
        inference.preprocess(np.zeros((32, 32, 3), np.uint8), resize=32, crop=64)


# ----------------------------------------------------------------------------- features


def tiny_models():
    """One tiny random backbone of each family, with the fields a direct apply returns."""
    return {
        "vit": VisionTransformer(patch_size=4, embed_dim=16, depth=2, num_heads=2, img_size=16),
        "dinov2": DinoVisionTransformer(
            patch_size=4, embed_dim=16, depth=2, num_heads=2, img_size=16, num_register_tokens=2
        ),
        "dinov3": VisionTransformer3(
            patch_size=4, embed_dim=16, depth=2, num_heads=2, n_storage_tokens=1, rope_dtype="fp32"
        ),
        "resnet": ResNet(stem_width=4, widths=(4, 8, 8, 8), depths=(1, 1, 1, 1)),
        "xcit": XCiT(patch_size=8, embed_dim=16, depth=1, num_heads=2),
    }


IMAGES = np.random.default_rng(0).normal(size=(5, 16, 24, 3)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(tiny_models()))
def test_features_of_every_backbone_family(name):
    model = tiny_models()[name]
    variables = random_variables(model)
    vit = name in ("vit", "dinov2", "dinov3")
    kw = {"n_last_blocks": 2} if vit else {}
    apply = jax.jit(model.apply, static_argnames=("n_last_blocks", "return_attention"))
    # 5 images in batches of 2: the short last batch is padded, so one compilation serves all.
    out = inference.features(model, variables, IMAGES, batch_size=2, **kw)
    kw_direct = {**kw, "return_attention": True} if name == "vit" else kw
    direct = apply(variables, jnp.asarray(IMAGES), **kw_direct)
    np.testing.assert_allclose(out.cls, direct.feature, rtol=1e-5, atol=1e-5)
    assert out.cls.dtype == np.float32
    if name == "resnet":
        assert out.cls.shape == (5, 32) and out.patch_tokens is None
    else:
        patches = {"xcit": 2 * 3}.get(name, 4 * 6)
        assert out.patch_tokens.shape == (5, patches, 16)
        np.testing.assert_allclose(out.patch_tokens, direct.patch_tokens, rtol=1e-5, atol=1e-5)
    if vit:
        assert len(out.intermediates) == 2 and out.intermediates[-1].shape == (5, 1 + 24, 16)
        for ours, theirs in zip(out.intermediates, direct.intermediates, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        assert out.intermediates == ()
    if name == "vit":
        assert out.attention.shape == (5, 2, 25, 25)
        np.testing.assert_allclose(out.attention, direct.attention, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.attention.sum(-1), 1.0, rtol=1e-5)
    else:
        assert out.attention is None
        with pytest.raises(ValueError, match="attention maps are DINO's ViT's"):
            inference.features(model, variables, IMAGES, attention=True)
    fn = inference._feature_fn(model, kw.get("n_last_blocks", 0), name == "vit")
    assert fn._cache_size() == 1
    inference.features(model, variables, IMAGES[:2], batch_size=2, **kw)
    assert fn._cache_size() == 1  # the same shape: no new compilation


def test_features_refusals_and_options():
    models = tiny_models()
    vit, resnet = models["vit"], models["resnet"]
    v_vars, r_vars = random_variables(vit), random_variables(resnet)
    cases = [
        (vit, v_vars, IMAGES[0], {}, "(B, H, W, 3) batch"),
        (vit, v_vars, np.zeros((2, 16, 16, 3), np.uint8), {}, "preprocess(images)"),
        (vit, v_vars, IMAGES[:, :15], {}, "multiples of the patch size 4"),
        (vit, v_vars, IMAGES, {"n_last_blocks": 3}, "outside [0, depth=2]"),
        (resnet, r_vars, IMAGES, {"n_last_blocks": 1}, "intermediate blocks are a ViT's"),
        (resnet, r_vars, IMAGES, {"attention": True}, "a ResNet returns none"),
    ]
    for model, variables, images, kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            inference.features(model, variables, images, **kw)
    assert inference.features(vit, v_vars, IMAGES, attention=False).attention is None
    assert inference.features(resnet, r_vars, IMAGES[:, :15]).cls.shape == (5, 32)  # any size


def test_the_package_exports_them_lazily():
    code = (
        "import sys, dino_jax; assert 'jax' not in sys.modules and 'flax' not in sys.modules;"
        " from dino_jax import inference;"
        " assert dino_jax.features is inference.features;"
        " assert dino_jax.preprocess is inference.preprocess; print('ok')"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    assert {"features", "preprocess"} <= set(dir(dino_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dino_jax.nope  # noqa: B018

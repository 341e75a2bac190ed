"""Bundled Fashion-MNIST subset, IDX reader, synthetic source, and running without TensorFlow."""

import gzip
import os
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from helpers.tiny import data_config as shared_data_config

from dino_jax.data import pipeline
from dino_jax.data.sources import DataError
from dino_jax.data.sources.demo import CLASS_NAMES, DEMO_FILE, load_split, read_idx

REPO = pathlib.Path(__file__).resolve().parent.parent
DEBIAN_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")


def data_config(**overrides):
    return shared_data_config(**{"synthetic_examples": 1000, "synthetic_classes": 7, **overrides})


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_bundled_subset_is_small_balanced_and_licensed():
    assert DEMO_FILE.stat().st_size < 8_000_000
    for split, per_class in (("train", 1000), ("test", 200)):
        images, labels = load_split(split)
        assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
        assert images.std() > 50  # real pictures, not zeros
    with np.load(DEMO_FILE) as bundle:
        assert tuple(bundle["class_names"]) == CLASS_NAMES
    notice = (DEMO_FILE.parent / "LICENSE-fashion-mnist").read_text()
    assert "Copyright © [2017] Zalando SE" in notice and "MIT License" in notice
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert {"data/demo/*.npz", "data/demo/LICENSE*"} <= set(package_data["dino_jax"])


@pytest.mark.skipif(not DEBIAN_IDX.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_build_script_reproduces_the_bundled_file(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_demo_data
    finally:
        sys.path.pop(0)
    built = build_demo_data.build(str(DEBIAN_IDX), tmp_path / "demo.npz")
    with np.load(DEMO_FILE) as bundle:
        assert sorted(bundle.files) == sorted(built)
        for key, value in built.items():
            np.testing.assert_array_equal(bundle[key], value, err_msg=key)
    full_images, full_labels = load_split("train", str(DEBIAN_IDX))
    assert full_images.shape == (60000, 28, 28) and np.bincount(full_labels).tolist() == [6000] * 10


def test_idx_directory_replaces_the_bundled_subset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # plain files are read too
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    (batch,) = list(pipeline.eval_data(data_config(data_dir=str(tmp_path)), "test", 30))
    np.testing.assert_array_equal(batch["label"], labels)
    np.testing.assert_array_equal(batch["image"][:, :28, :28, 1], images)


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(
        DataError, match=r"has no train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"
    ):
        pipeline.train_data(data_config(data_dir=str(tmp_path)), 8)
    (tmp_path / "bad").write_bytes(b"\x08\x00\x00\x00")
    with pytest.raises(DataError, match=r"bad.*not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(DataError, match="does not exist"):
        pipeline.train_data(data_config(data_dir=str(tmp_path / "nope")), 8)
    with pytest.raises(DataError, match="splits \\['test', 'train'\\], not 'validation'"):
        pipeline.eval_data(data_config(), "validation", 8)


def test_demo_batches_are_grey_images_on_rgb_canvases():
    batch = next(iter(pipeline.train_data(data_config(), 64)))
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["size"].dtype == np.int32 and (batch["size"] == 28).all()
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) <= set(range(10))
    image = batch["image"]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert not image[:, 28:].any() and not image[:, :, 28:].any() and image[:, :28, :28].any()


def test_canvas_smaller_than_28_downscales_once():
    batch = next(iter(pipeline.train_data(data_config(canvas_size=16), 8)))
    assert batch["image"].shape == (8, 16, 16, 3) and (batch["size"] == 16).all()


def test_eval_sees_every_test_image_once_balanced():
    data = pipeline.eval_data(data_config(), "test", 48)
    batches = list(data)
    assert len(batches) == data.num_batches == 42  # 2,000 = 41 * 48 + 32
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, load_split("test")[1])
    assert np.bincount(labels).tolist() == [200] * 10
    assert batches[-1]["mask"].sum() == 32 and not batches[-1]["image"][32:].any()


def test_synthetic_source():
    config = data_config(source="synthetic", canvas_size=48)
    data = pipeline.train_data(config, 16)
    assert data.steps_per_epoch == 1000 // 16
    batch = next(iter(data))
    assert batch["image"].shape == (16, 48, 48, 3)
    assert ((batch["size"] >= 24) & (batch["size"] <= 48)).all()
    assert set(batch["label"].tolist()) <= set(range(7))
    for image, (height, width) in zip(batch["image"], batch["size"], strict=True):
        assert (
            image[:height, :width].std() > 50
            and not image[height:].any()
            and not image[:, width:].any()
        )


def test_demo_and_synthetic_run_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"  # any TensorFlow import now fails
        "import ml_collections\n"
        "from dino_jax.data import pipeline\n"
        f"config = ml_collections.ConfigDict({data_config().to_dict()!r})\n"
        "next(iter(pipeline.train_data(config, 8)))\n"
        "list(pipeline.eval_data(config, 'test', 500))\n"
        "config.source = 'synthetic'\n"
        "next(iter(pipeline.train_data(config, 8)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)

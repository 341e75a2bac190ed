"""Seeded order, epochs as permutations, and resume == uninterrupted stream (demo and folder)."""

import itertools
import os

import numpy as np
import pytest
from helpers.tiny import data_config as shared_data_config
from PIL import Image

from dino_jax.data import decode as decode_module
from dino_jax.data import pipeline
from dino_jax.data.sources.demo import DEMO_FILE


def data_config(**overrides):
    return shared_data_config(**{"split": "test", **overrides})


def take(data, n: int) -> list:
    return list(itertools.islice(iter(data), n))


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def differs(a: list, b: list) -> bool:
    return any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(30):
        path = root / "train" / f"class{i % 3}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8 + i % 5, 10, 3), np.uint8)).save(path)
    return root


def test_epoch_order_is_a_seeded_permutation():
    a = pipeline.epoch_order(0, 0, 0, 1000)
    np.testing.assert_array_equal(a, pipeline.epoch_order(0, 0, 0, 1000))
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, pipeline.epoch_order(1, 0, 0, 1000))  # other seed
    assert not np.array_equal(a, pipeline.epoch_order(0, 1, 0, 1000))  # next epoch
    assert not np.array_equal(a, pipeline.epoch_order(0, 0, 1, 1000))  # other process
    assert 0 <= pipeline.order_seed(2**40, 10**6, 4095) < 2**63


def test_same_seed_same_stream_other_seed_other_stream():
    first = take(pipeline.train_data(data_config(), 50), 4)
    assert_same_batches(first, take(pipeline.train_data(data_config(), 50), 4))
    assert differs(first, take(pipeline.train_data(data_config(seed=1), 50), 4))


def test_each_epoch_visits_every_example_once_in_a_new_order():
    data = pipeline.train_data(data_config(), 64)  # 2,000 test images: 31 steps, 16 dropped
    assert data.steps_per_epoch == 31
    steps = data.steps_per_epoch
    epoch0 = np.concatenate([data.indices(s) for s in range(steps)])
    epoch1 = np.concatenate([data.indices(s) for s in range(steps, 2 * steps)])
    assert len(np.unique(epoch0)) == len(epoch0) == steps * 64
    assert len(np.unique(epoch1)) == len(epoch1)
    assert not np.array_equal(epoch0, epoch1)
    batches = take(data, 2)
    labels = np.load(DEMO_FILE)["test_labels"]
    np.testing.assert_array_equal(batches[1]["label"], labels[data.indices(1)])


@pytest.mark.parametrize("start", [3, 31, 33])  # mid-epoch, epoch boundary, next epoch
def test_resume_equals_uninterrupted_in_memory(start):
    whole = take(pipeline.train_data(data_config(), 64), start + 3)
    resumed = take(pipeline.train_data(data_config(), 64, start_step=start), 3)
    assert_same_batches(whole[start:], resumed)


def test_folder_order_is_seeded(image_folder):
    config = data_config(source="folder", split="train", data_dir=str(image_folder))
    first = take(pipeline.train_data(config, 8), 5)
    assert_same_batches(first, take(pipeline.train_data(config, 8), 5))
    config.seed = 7
    assert differs(first, take(pipeline.train_data(config, 8), 5))


@pytest.mark.parametrize("start", [2, 3, 5])  # 30 files / batch 8: 3 steps per epoch
def test_folder_resume_equals_uninterrupted(image_folder, start):
    config = data_config(source="folder", split="train", data_dir=str(image_folder))
    whole = take(pipeline.train_data(config, 8), start + 3)
    resumed = take(pipeline.train_data(config, 8, start_step=start), 3)
    assert_same_batches(whole[start:], resumed)


def test_folder_resume_decodes_nothing_before_the_start(image_folder, monkeypatch):
    calls = []
    decode = decode_module.decode_image
    monkeypatch.setattr(decode_module, "decode_image", lambda *a: calls.append(1) or decode(*a))
    config = data_config(
        source="folder", split="train", data_dir=str(image_folder), num_parallel_calls=1
    )
    data = pipeline.train_data(config, 8, start_step=10**9)
    batch = next(iter(data))
    # The files of step 1e9 under the seeded order (file NN.png is in class NN % 3).
    names = [os.path.basename(data.source.key(i)) for i in data.indices(10**9)]
    assert batch["label"].tolist() == [int(name[:2]) % 3 for name in names]
    assert 8 <= len(calls) < 8 * 40  # the batch and some read-ahead, not 8e9 examples

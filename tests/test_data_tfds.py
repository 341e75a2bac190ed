"""The TFDS source on tiny datasets prepared offline: TFRecord (streamed) and ArrayRecord."""

import io
import itertools

import numpy as np
import pytest
from helpers.tiny import data_config as shared_data_config

from dino_jax.data import pipeline
from dino_jax.data.decode import SkipLog
from dino_jax.data.sources import DataError, IndexedSource, RecordSource

tfds = pytest.importorskip("tensorflow_datasets")

NAME = "dino_test_images"
TRAIN, TEST, BAD_ID = 24, 10, 5


def _builders():
    """Builder classes made here, unregistered: the source must find them from files alone."""

    class DinoTestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(TRAIN, 0),
                "test": self._generate_examples(TEST, 100),
            }

        def _generate_examples(self, n, base):
            for i in range(n):
                # Every pixel holds the example id; one train record holds bytes that are no image.
                image = np.full((8 + i % 7, 10, 3), base + i, np.uint8)
                if base == 0 and i == BAD_ID:
                    image = io.BytesIO(b"these bytes are not an image")
                yield i, {"image": image, "label": i % 3}

    class DinoTestNoImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"x": tfds.features.Tensor(shape=(2,), dtype=np.float32)}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"x": np.zeros(2, np.float32)}

    return DinoTestImages, DinoTestNoImages


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    images, no_images = _builders()
    dirs = {}
    for fmt in ("tfrecord", "array_record"):
        dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
        images(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
    no_images(data_dir=dirs["tfrecord"]).download_and_prepare()
    return dirs


def data_config(data_dir, **overrides):
    tfds = {"source": "tfds", "tfds_name": NAME, "data_dir": data_dir, "canvas_size": 16}
    return shared_data_config(**{**tfds, "shuffle_buffer": 8, **overrides})


def ids(batch) -> list[int]:
    """Example ids (the pixel value) of a batch, checking each against its label and size."""
    out = []
    for image, size, label in zip(batch["image"], batch["size"], batch["label"], strict=True):
        height, width = size
        example = int(image[0, 0, 0]) % 100
        assert (height, width) == (8 + example % 7, 10) and label == example % 3
        assert (image[:height, :width] == image[0, 0, 0]).all() and not image[height:].any()
        out.append(example)
    return out


def take(data, n):
    return list(itertools.islice(iter(data), n))


FORMATS = pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])


@FORMATS
def test_source_kind_follows_the_file_format(data_dirs, fmt):
    data = pipeline.train_data(data_config(data_dirs[fmt]), 4)
    assert isinstance(data.source, RecordSource if fmt == "tfrecord" else IndexedSource)
    assert data.steps_per_epoch == TRAIN // 4


@FORMATS
def test_one_epoch_is_every_good_example_once_and_the_bad_record_is_logged(data_dirs, fmt):
    log = SkipLog()
    data = pipeline.train_data(data_config(data_dirs[fmt]), TRAIN, skips=log)
    (batch,) = take(data, 1)
    assert batch["image"].shape == (TRAIN, 16, 16, 3) and batch["image"].dtype == np.uint8
    seen = ids(batch)
    assert set(seen) == set(range(TRAIN)) - {BAD_ID}  # its slot holds a copy of a good one
    ((key, reason),) = log.entries()
    assert reason.startswith("not an image") and NAME in key


@FORMATS
def test_order_is_seeded_and_changes_each_epoch(data_dirs, fmt):
    config = data_config(data_dirs[fmt])
    first = [ids(b) for b in take(pipeline.train_data(config, 4), 12)]
    assert first == [ids(b) for b in take(pipeline.train_data(config, 4), 12)]
    assert first[:6] != first[6:]  # epoch 1 is a new order
    config.seed = 1
    assert first != [ids(b) for b in take(pipeline.train_data(config, 4), 12)]


@FORMATS
@pytest.mark.parametrize("start", [2, 6, 9])  # 6 steps per epoch
def test_resume_equals_uninterrupted(data_dirs, fmt, start):
    config = data_config(data_dirs[fmt])
    whole = [ids(b) for b in take(pipeline.train_data(config, 4), start + 3)]
    resumed = [ids(b) for b in take(pipeline.train_data(config, 4, start_step=start), 3)]
    assert resumed == whole[start:]


@FORMATS
def test_processes_train_on_disjoint_halves(data_dirs, fmt):
    config = data_config(data_dirs[fmt])
    halves = []
    for process in range(2):
        data = pipeline.train_data(config, TRAIN, process_index=process, process_count=2)
        halves.append(set(ids(next(iter(data)))) | ({BAD_ID} if data.skips.count else set()))
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(range(TRAIN))


@FORMATS
def test_eval_covers_every_example_once_across_processes(data_dirs, fmt):
    config = data_config(data_dirs[fmt])
    seen = []
    for process in range(2):
        data = pipeline.eval_data(config, "test", 8, process_index=process, process_count=2)
        batches = list(data)
        assert len(batches) == data.num_batches == 2  # ceil(5 / 4) on both processes
        for batch in batches:
            real = {k: v[batch["mask"]] for k, v in batch.items()}
            seen += ids(real)
            assert (batch["label"][~batch["mask"]] == -1).all()
    assert sorted(seen) == list(range(TEST))


def test_unknown_name_names_it_and_suggests(data_dirs):
    with pytest.raises(DataError, match=r"unknown TFDS dataset .*'mnistt'.*did you mean .*mnist"):
        pipeline.train_data(data_config(data_dirs["tfrecord"], tfds_name="mnistt"), 4)
    with pytest.raises(DataError, match=r"did you mean dino_test_images[,?]"):
        pipeline.train_data(data_config(data_dirs["tfrecord"], tfds_name="dino_test_image"), 4)


def test_missing_split_and_missing_images(data_dirs):
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['train', 'test'\]"):
        pipeline.eval_data(data_config(data_dirs["tfrecord"]), "validation", 4)
    with pytest.raises(DataError, match="'dino_test_no_images' has no top-level image feature"):
        pipeline.train_data(data_config(data_dirs["tfrecord"], tfds_name="dino_test_no_images"), 4)


def test_unprepared_dataset_in_a_multi_process_run_says_how_to_prepare(tmp_path):
    config = data_config(str(tmp_path), tfds_name="mnist", manual_dir="/archives")
    with pytest.raises(
        DataError,
        match=f"not prepared .*tfds build mnist --data_dir={tmp_path} --manual_dir=/archives",
    ):
        pipeline.train_data(config, 4, process_index=0, process_count=2)

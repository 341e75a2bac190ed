"""Host batch helpers: the background producer ends with its stream and passes errors on."""

import numpy as np
import pytest

from dino_jax.data.batches import fill_bad_slots, in_background, pad_batch


def test_background_stream_ends_and_raises_in_the_consumer():
    assert list(in_background(iter(range(5)))) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise OSError("disk gone")

    stream = in_background(broken())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_bad_slots_take_good_examples_and_padding_is_masked():
    batch = {"image": np.arange(4)[:, None], "label": np.array([0, 1, 2, 3], np.int32)}
    filled = fill_bad_slots(batch, np.array([True, False, True, False]))
    assert filled["label"].tolist() == [0, 0, 2, 2]
    assert fill_bad_slots(batch, np.zeros(4, bool)) is None
    padded = pad_batch(batch, 6)
    assert padded["label"].tolist() == [0, 1, 2, 3, -1, -1]
    assert padded["mask"].tolist() == [True] * 4 + [False] * 2

"""Our event files read back with TensorFlow's own record and proto parsers."""

import numpy as np

from dino_jax.tensorboard import ScalarWriter, crc32c


def test_crc32c_known_value():
    # RFC 3720 test vector: 32 bytes of zeros
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_read_back_with_tensorflow(tmp_path):
    import tensorflow as tf

    writer = ScalarWriter(tmp_path)
    writer.scalars(1, {"train/loss": 11.09, "knn/top1": 42.5})
    writer.scalars(7, {"train/loss": 3.25})
    writer.close()
    events = [
        tf.compat.v1.Event.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(writer.path)  # checks both CRCs of every record
    ]
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert [(s, t) for s, t, _ in got] == [(1, "train/loss"), (1, "knn/top1"), (7, "train/loss")]
    np.testing.assert_allclose([v for *_, v in got], [11.09, 42.5, 3.25], rtol=1e-6)

"""Our event files read back by TensorBoard's own loader, as `tensorboard --logdir` reads them.

The reading runs in a fresh interpreter where TensorFlow cannot be imported, so TensorBoard
uses its own pure-Python record reader (which checks both CRCs of every record): the case
of a machine with `tensorboard` but no TensorFlow.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np

from dino_jax.tensorboard import ScalarWriter, crc32c

READ_BACK = """
import json, sys
sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat import tf
events = EventAccumulator(sys.argv[1])
events.Reload()
scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
out = {"tf": tf.__version__, "file_version": events.file_version, "scalars": scalars}
print(json.dumps(out))
"""


def read_back(logdir) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", READ_BACK, str(logdir)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_crc32c_known_value():
    # RFC 3720 test vector: 32 bytes of zeros
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_read_back_with_tensorboard(tmp_path):
    writer = ScalarWriter(tmp_path)
    writer.scalars(1, {"train/loss": 11.09, "knn/top1": 42.5})
    writer.scalars(7, {"train/loss": 3.25})
    writer.close()
    got = read_back(tmp_path)
    assert got["tf"] == "stub"  # TensorBoard's own reader, not TensorFlow's
    assert got["file_version"] == 2.0  # from "brain.Event:2"
    scalars = got["scalars"]
    assert sorted(scalars) == ["knn/top1", "train/loss"]
    assert [s for s, _ in scalars["train/loss"]] == [1, 7]
    assert [s for s, _ in scalars["knn/top1"]] == [1]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [11.09, 3.25], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["knn/top1"]], [42.5], rtol=1e-6)


def test_a_corrupted_record_is_not_read(tmp_path):
    # Shows that the CRCs are checked: one flipped byte in the last record's data loses it.
    writer = ScalarWriter(tmp_path)
    writer.scalars(1, {"train/loss": 2.0})
    writer.scalars(2, {"train/loss": 1.0})
    writer.close()
    path = pathlib.Path(writer.path)
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # inside the value of the last record, before its data CRC
    path.write_bytes(bytes(data))
    assert [s for s, _ in read_back(tmp_path)["scalars"]["train/loss"]] == [1]

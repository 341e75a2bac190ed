"""The pieces of checkpoint verification and of storage-failure reports, without training: array
digests (layout-free, sensitive to any changed word), the digest record of a checkpoint's
metadata, the recognition of storage errors, and the history's appends."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dino_jax import parallel
from dino_jax.checkpoint import logged_checkpoint
from dino_jax.checkpoint_digests import (
    DIGEST_SCHEME,
    DIGESTS_KEY,
    FORMAT,
    FORMAT_KEY,
    array_digests,
    digest_mismatches,
    recorded_digests,
)
from dino_jax.checkpoint_storage import append_line, storage_error, storage_failure

RNG = np.random.default_rng(0)
WEIGHTS = RNG.standard_normal((64, 48)).astype(np.float32)


def digest(x) -> str:
    return array_digests({"x": x})["x"]


def test_digest_is_the_same_for_any_device_layout():
    mesh = parallel.make_mesh()
    expected = digest(WEIGHTS)
    for spec in (PartitionSpec(), PartitionSpec("data"), PartitionSpec(None, "data")):
        placed = jax.device_put(WEIGHTS, NamedSharding(mesh, spec))
        assert digest(placed) == expected, spec
    assert len(expected) == 16 and int(expected, 16) != 0


def test_every_single_bit_flip_changes_the_digest():
    original = digest(WEIGHTS)
    words = WEIGHTS.view(np.uint32)
    for index in [(0, 0), (31, 17), (63, 47)]:
        for bit in range(32):
            flipped = words.copy()
            flipped[index] ^= np.uint32(1 << bit)
            assert digest(flipped.view(np.float32)) != original, (index, bit)


def test_changed_bytes_swaps_and_values_change_the_digest():
    original = digest(WEIGHTS)
    raw = bytearray(WEIGHTS.tobytes())
    raw[1000:1008] = bytes(b ^ 0xA5 for b in raw[1000:1008])  # 8 bytes over two words
    assert digest(np.frombuffer(bytes(raw), np.float32).reshape(WEIGHTS.shape)) != original
    swapped = WEIGHTS.copy()
    swapped[0, [0, 1]] = WEIGHTS[0, [1, 0]]
    assert digest(swapped) != original
    assert digest(WEIGHTS * np.float32(1 + 2**-20)) != original


@pytest.mark.parametrize(
    "value",
    [
        np.arange(10, dtype=np.int32),
        jnp.arange(6, dtype=jnp.bfloat16),
        np.arange(7, dtype=np.uint8),
        np.array([True, False, True]),
        np.float32(3.0),
        np.zeros((0, 3), np.float32),
        jax.random.key(0),
    ],
    ids=["int32", "bfloat16", "uint8", "bool", "scalar", "empty", "prng key"],
)
def test_every_kind_of_array_has_a_digest(value):
    assert len(digest(value)) == 16


def test_a_state_gets_one_digest_per_array_by_name():
    digests = array_digests({"a": {"w": WEIGHTS, "b": np.zeros(3, np.float32)}, "step": 1})
    assert set(digests) == {"a.w", "a.b", "step"}


def meta(**extra):
    return {"config": {}, **extra}


def test_the_digest_record_of_a_checkpoint_is_read_or_refused():
    arrays = {"a.w": "0" * 16}
    good = meta(**{FORMAT_KEY: FORMAT, DIGESTS_KEY: {"scheme": DIGEST_SCHEME, "arrays": arrays}})
    assert recorded_digests(good) == arrays
    assert recorded_digests(meta()) is None  # written before digests existed
    refused = {
        "missing": meta(**{FORMAT_KEY: FORMAT}),
        "malformed": meta(**{FORMAT_KEY: FORMAT, DIGESTS_KEY: ["a.w"]}),
        "malformed entries": meta(
            **{FORMAT_KEY: FORMAT, DIGESTS_KEY: {"scheme": DIGEST_SCHEME, "arrays": {"a": 1}}}
        ),
        "unknown kind": meta(**{FORMAT_KEY: FORMAT, DIGESTS_KEY: {"scheme": "x", "arrays": {}}}),
    }
    for what, record in refused.items():
        with pytest.raises(ValueError, match=what.split()[0]):
            recorded_digests(record)


def test_mismatches_name_every_array_that_differs_or_lacks_a_digest():
    recorded = {"a": "1", "b": "2", "gone": "3"}
    actual = {"a": "1", "b": "x", "new": "4"}
    assert digest_mismatches(recorded, actual) == [
        "b: its digest differs",
        "new: no digest recorded",
        "gone: recorded, but not restored",
    ]
    assert digest_mismatches(recorded, actual, partial=True) == [
        "b: its digest differs",
        "new: no digest recorded",
    ]


class TensorstoreError(ValueError):
    """Stands for the ValueError tensorstore raises, whose text carries the OS error."""


def test_storage_errors_are_recognised_through_causes_and_text():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert storage_failure(full) == "No space left on device [ENOSPC]"
    ts_text = (
        'RESOURCE_EXHAUSTED: Error writing "center/0" in OCDBT database: Failed to write 171'
        " bytes to file 6: No space left on device [os_error_code='28']"
    )
    assert storage_failure(TensorstoreError(ts_text)) == "No space left on device [ENOSPC]"
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as err:
            raise RuntimeError("commit failed") from err
    except RuntimeError as chained:
        assert storage_failure(chained) == "Input/output error [EIO]"
    bucket = TensorstoreError("UNAVAILABLE: error writing gs://bucket/x: HTTP 503")
    assert storage_failure(bucket).startswith("UNAVAILABLE")
    assert storage_failure(ValueError("shapes (3,) and (4,) differ")) is None
    assert storage_failure(KeyError("state")) is None


def test_an_append_after_a_cut_short_line_keeps_both_records_readable(tmp_path):
    history = tmp_path / "checkpoints.jsonl"
    history.write_text('{"step": 3, "event": "saved"}\n{"step": 6, "ev')  # disk filled mid-line
    append_line(str(history), json.dumps({"step": 6, "event": "restored"}))
    assert logged_checkpoint(str(tmp_path)) == 6
    assert history.read_text().endswith('\n{"step": 6, "event": "restored"}\n')


def test_a_storage_failure_elsewhere_names_the_file_and_the_last_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp").mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "train.jsonl"))
    assert str(storage_error(full, str(tmp_path))) == (
        f"could not write {tmp_path / 'train.jsonl'}: No space left on device [ENOSPC]. The"
        f" last complete checkpoint is step 3 at {tmp_path / 'checkpoints' / '3'} (intact)."
        " Free space (or fix the storage) and run the same command again to resume."
    )
    assert storage_error(ValueError("a bug"), str(tmp_path)) is None

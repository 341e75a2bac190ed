"""The .pth reader's resource bounds: hostile files that would make a small file cost a lot of
memory or time (memo and zip bombs, huge views, deep or self-containing nesting, hash-flooding
keys, FIFOs) are refused with a message naming the file, before anything large is built."""

import os
import pathlib
import struct
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
from helpers.pth_files import as_pth, dict_pkl, frag, tensor_ops, write_pth

from dino_jax.interop import pth_checks, pth_read, pth_storage
from dino_jax.interop.pth import PthError, TensorInfo, UnsafeCheckpointError, load_pth, open_pth

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MB = 1 << 20


def refused(path, match, error=PthError, budget_mb=32):
    """`load_pth(path)` raises `error` naming the file, having allocated at most `budget_mb`."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as caught:
            load_pth(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(caught.value)
    assert peak < budget_mb * MB, f"{peak / MB:.0f} MB allocated before the refusal"
    return str(caught.value)


# ---- the pickle ---------------------------------------------------------------------------------


def test_memo_bomb_is_refused_before_the_memo_grows(tmp_path, tally):
    # PUT with index 2**24 makes the unpickler size its memo array to 2**25 entries (256 MB);
    # the 9-byte version with 2**29 reached 8 GB. Indices must follow the entries written.
    for name, index in (("small.pth", 1 << 24), ("nine_bytes.pth", 1 << 29)):
        with tally.bad_input():
            path = tmp_path / name
            path.write_bytes(b"\x80\x02Nr" + struct.pack("<I", index) + b".")
            refused(path, "memo index .* skips entries")
    with tally.bad_input():  # the same inside a torch.save zip
        pkl = b"\x80\x02Nr" + struct.pack("<I", 1 << 24) + b"."
        refused(as_pth(tmp_path / "zipped.pth", pkl), "memo index")


def test_pickle_record_inflating_past_the_bound_is_refused_unread(tmp_path, tally, monkeypatch):
    # A 1 MiB data.pkl of one string, deflated to ~1 kB; the bound (16 MiB) is lowered to 64 kB.
    text = b"a" * MB
    pkl = b"\x80\x02X" + struct.pack("<I", len(text)) + text + b"."
    path = write_pth(tmp_path / "inflate.pth", pkl, {}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 8 * 1024
    assert load_pth(path) == text.decode()  # under the default bound it is a valid file
    monkeypatch.setattr(pth_read, "MAX_PICKLE_BYTES", 64 * 1024)
    with tally.bad_input():
        refused(path, r"data\.pkl holds 1,048,\d+ bytes, more than 65,536", budget_mb=1)


def _patch_directory_size(path, name: str, size: int):
    """Rewrite the uncompressed size that the zip's central directory gives for `name`."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    entry = data.find(b"PK\x01\x02")
    while entry >= 0:
        name_len = struct.unpack_from("<H", data, entry + 28)[0]
        if data[entry + 46 : entry + 46 + name_len] == name.encode():
            struct.pack_into("<I", data, entry + 24, size)
            break
        entry = data.find(b"PK\x01\x02", entry + 4)
    assert entry >= 0 and info.file_size != size
    path.write_bytes(bytes(data))


def test_lying_record_sizes_are_damage_not_allocation(tmp_path, tally):
    # Decompression stops at the size the directory declares: a stream that inflates to more
    # fails its checksum; one that inflates to less is short. Neither is read past the bound.
    text = b"b" * (256 * 1024)
    pkl = b"\x80\x02X" + struct.pack("<I", len(text)) + text + b"."
    for declared in (1000, len(pkl) + 4096):
        with tally.bad_input():
            path = write_pth(tmp_path / f"lie{declared}.pth", pkl, {}, compression=8)
            _patch_directory_size(path, "made/data.pkl", declared)
            refused(path, "corrupt zip|directory says", budget_mb=4)


def test_too_many_opcodes_are_refused(tmp_path, tally, monkeypatch):
    pkl = b"\x80\x02](" + b"N" * 5000 + b"e."
    path = as_pth(tmp_path / "many.pth", pkl)
    assert load_pth(path) == [None] * 5000
    assert open_pth(FIXTURES / "checkpoint.pth").tensors == 188  # 6,770 opcodes
    monkeypatch.setattr(pth_checks, "MAX_PICKLE_OPCODES", 4000)
    with tally.bad_input():
        refused(path, "more than 4,000 opcodes")


def test_plain_file_larger_than_a_pickle_is_not_read_whole(tmp_path, tally, monkeypatch):
    monkeypatch.setattr(pth_read, "MAX_PICKLE_BYTES", MB)
    path = tmp_path / "big.jpg.pth"
    with open(path, "wb") as f:
        f.truncate(64 * MB)  # sparse: 64 MB on paper
    with tally.bad_input():
        refused(path, "not a zip archive and larger than 1 MiB", budget_mb=4)


def test_deep_nesting_is_refused_naming_the_file(tmp_path, tally):
    depth = 20_000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    with tally.bad_input():
        refused(as_pth(tmp_path / "deep.pth", pkl), "nested more than 100 deep")
    pkl = b"\x80\x02" + (b"}" + frag("k")) * 300 + b"N" + b"s" * 300 + b"."
    with tally.bad_input():
        refused(as_pth(tmp_path / "dicts.pth", pkl), "nested more than 100 deep")
    # a list that contains itself: EMPTY_LIST, PUT 0, GET 0, APPEND
    with tally.bad_input():
        refused(as_pth(tmp_path / "loop.pth", b"\x80\x02]q\x00h\x00a."), "contains itself")


def test_shared_structure_is_checked_in_linear_time(tmp_path):
    # 60 levels of [x, x]: 2**60 paths through 60 lists. Each is visited once.
    pkl = b"\x80\x02N"
    for level in range(60):
        pkl += b"q" + bytes([level]) + b"h" + bytes([level]) + b"\x86"
    obj = load_pth(as_pth(tmp_path / "shared.pth", pkl + b"."))
    assert isinstance(obj, tuple) and obj[0] is obj[1]


def test_keys_that_could_share_a_hash_are_refused(tmp_path, tally):
    # Ints k * (2**61 - 1) all hash alike (so do crafted tuples): a dict of 10**5 of them takes
    # minutes to build. Keys must be strings, bytes, small ints or None.
    big = 2**61 - 1
    for name, key_ops in [
        ("big_int_keys.pth", frag(16 * big)),
        ("tuple_keys.pth", frag((1, 2))),
        ("object_keys.pth", b"ccollections\nOrderedDict\n)R"),
    ]:
        with tally.bad_input():
            pkl = b"\x80\x02}(" + key_ops + b"Nu."
            refused(as_pth(tmp_path / name, pkl), "dict key", UnsafeCheckpointError)
    assert load_pth(as_pth(tmp_path / "ok.pth", b"\x80\x02}(" + frag(2**62) + b"Nu.")) == {
        2**62: None
    }
    with tally.bad_input():  # an OrderedDict built from a list of pairs hides its keys
        pkl = b"\x80\x02ccollections\nOrderedDict\n]" + frag((16 * big, 1)) + b"a\x85R."
        refused(as_pth(tmp_path / "od.pth", pkl), "OrderedDict built from arguments")


@pytest.mark.parametrize(
    ("opcode", "what"),
    [(b"\x82\x01", "EXT1"), (b"\x97", "NEXT_BUFFER"), (b"(i__main__\nX\n", "INST")],
)
def test_opcodes_outside_torch_save_are_refused(tmp_path, tally, opcode, what):
    path = as_pth(tmp_path / "op.pth", b"\x80\x05" + opcode + b".")
    with tally.bad_input():
        refused(path, what, UnsafeCheckpointError)


# ---- the storages -------------------------------------------------------------------------------


def one_tensor(path, size, stride, numel=1, offset=0, compression=None):
    pkl = dict_pkl({"w": tensor_ops("FloatStorage", "0", numel, offset, size, stride)})
    data = np.zeros(numel, np.float32).tobytes()
    return write_pth(path, pkl, {"0": data}, compression=compression)


def test_stride_0_views_are_bounded_by_the_storages(tmp_path, tally):
    # Small expanded tensors (torch writes them for `expand`) load as views ...
    small = load_pth(one_tensor(tmp_path / "small.pth", (4096, 1024), (0, 0)))["w"]
    assert small.shape == (4096, 1024) and small.strides == (0, 0)
    # ... a stride-0 view claiming 2**31 elements of a 1-element storage is refused.
    with tally.bad_input():
        refused(one_tensor(tmp_path / "huge.pth", (1 << 31,), (0,)), "claim 2,147,483,648")
    with tally.bad_input():  # overlapping positive strides: n*n elements over 2n - 1
        n = 8192
        path = one_tensor(tmp_path / "overlap.pth", (n, n), (1, 1), numel=2 * n - 1)
        refused(path, "views .* that large are refused")
    with tally.bad_input():  # the same claim spread over many tensors
        entries = {
            f"w{i}": tensor_ops("FloatStorage", "0", 1, 0, (1 << 20,), (0,)) for i in range(20)
        }
        path = write_pth(tmp_path / "many.pth", dict_pkl(entries), {"0": bytes(4)})
        refused(path, "claim")


def test_storages_inflating_past_the_file_are_refused_unread(tmp_path, tally, monkeypatch):
    path = one_tensor(tmp_path / "zeros.pth", (1 << 20,), (1,), numel=1 << 20, compression=8)
    assert path.stat().st_size < 16 * 1024  # 4 MiB of zeros, deflated
    assert load_pth(path)["w"].shape == (1 << 20,)  # within 4 x the file + 64 MiB: read
    monkeypatch.setattr(pth_read, "STORAGE_SLACK_BYTES", 1024)
    with tally.bad_input():
        refused(
            path, "storages declare 4,194,304 bytes, more than 4 x the file's size", budget_mb=2
        )


def test_compressions_and_encryption_torch_never_writes_are_refused(tmp_path, tally):
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        with tally.bad_input():
            path = one_tensor(tmp_path / f"c{method}.pth", (4,), (1,), 4, compression=method)
            refused(path, f"zip compression {method}")
    with tally.bad_input():
        path = one_tensor(tmp_path / "enc.pth", (4,), (1,), 4)
        data = bytearray(path.read_bytes())
        entry = data.find(b"PK\x01\x02")
        data[entry + 8] |= 1  # the "encrypted" flag of the first directory entry
        path.write_bytes(bytes(data))
        refused(path, "encrypted")


def test_zip_directory_is_bounded_before_it_is_parsed(tmp_path, tally, monkeypatch):
    monkeypatch.setattr(pth_read, "MAX_ZIP_RECORDS", 100)
    with tally.bad_input():
        refused(FIXTURES / "checkpoint.pth", "194 records")


def test_partial_load_reads_only_the_storages_asked_for(tmp_path, monkeypatch):
    entries = {
        "a": tensor_ops("FloatStorage", "0", 4, 0, (4,), (1,)),
        "b": tensor_ops("FloatStorage", "1", 2, 0, (2,), (1,)),
    }
    storages = {"0": np.arange(4, dtype=np.float32).tobytes(), "1": bytes(8)}
    pth = open_pth(write_pth(tmp_path / "two.pth", dict_pkl(entries), storages))
    assert pth.tree["a"].shape == (4,) and pth.storage_sizes == {"0": 16, "1": 8}
    read = []
    original = pth_storage._read_storage
    monkeypatch.setattr(
        pth_storage,
        "_read_storage",
        lambda a, info, d: read.append(info.filename) or original(a, info, d),
    )
    loaded = pth.load({"0"})
    np.testing.assert_array_equal(loaded["a"], np.arange(4))
    assert isinstance(loaded["b"], TensorInfo) and read == ["made/data/0"]


# ---- the file itself ----------------------------------------------------------------------------


def test_fifo_directory_and_missing_path_are_refused_at_once(tmp_path, tally):
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(_error_of(fifo)), daemon=True)
    with tally.bad_input():
        worker.start()
        worker.join(20)  # opening a FIFO for reading would wait for a writer for ever
        assert result and "not a regular file" in result[0]
    with tally.bad_input():
        assert "not a regular file" in _error_of(tmp_path)
    with tally.bad_input():
        assert "cannot read it (No such file or directory)" in _error_of(tmp_path / "none.pth")


def _error_of(path) -> str:
    try:
        load_pth(path)
    except PthError as err:
        assert str(path) in str(err)
        return str(err)
    return "loaded"

"""Writer of ``torch.save``-format zip files from numpy arrays and plain Python values, without
torch: the protocol-2 pickle is emitted opcode by opcode, tensors go to 64-byte aligned records."""

from __future__ import annotations

import argparse
import collections
import os
import struct
import types
import zipfile
from pickle import (  # the protocol-2 opcodes emitted here; pickletools documents each
    APPENDS,
    BINFLOAT,
    BININT,
    BININT1,
    BININT2,
    BINPERSID,
    BINUNICODE,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    GLOBAL,
    LONG1,
    MARK,
    NEWFALSE,
    NEWOBJ,
    NEWTRUE,
    NONE,
    PROTO,
    REDUCE,
    SETITEMS,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
)
from typing import Any, BinaryIO

import numpy as np

from dino_jax.interop.pth_storage import STORAGE_DTYPES

_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_ALIGN = 64  # torch aligns record payloads so that `torch.load(mmap=True)` can map them in place
_PAD_FIELD_ID = 0x4246  # zip "extra field" id used for the alignment padding
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_ZIP64_FIELD = 20  # zip64 extra field zipfile appends when we ask for zip64

_TUPLE_N = {1: TUPLE1, 2: TUPLE2, 3: TUPLE3}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's strides for a fresh tensor (a size-0 dimension counts as 1).
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _Pickler:
    """Emits the pickle for one object tree and collects the array storages it refers to."""

    def __init__(self) -> None:
        self.out = bytearray(PROTO + b"\x02")
        self.storages: list[np.ndarray] = []
        self._open: set[int] = set()  # containers being written, to refuse cycles

    def dump(self, obj: Any) -> bytes:
        self.save(obj)
        self.out += STOP
        return bytes(self.out)

    def save(self, obj: Any) -> None:
        if obj is None:
            self.out += NONE
        elif isinstance(obj, bool):
            self.out += NEWTRUE if obj else NEWFALSE
        elif isinstance(obj, np.ndarray):
            self._array(obj)
        elif isinstance(obj, np.generic) and not isinstance(obj, str | bytes):
            self._numpy_scalar(obj)
        elif isinstance(obj, int):
            self._int(int(obj))
        elif isinstance(obj, float):
            self.out += BINFLOAT + struct.pack(">d", obj)
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, bytes):
            self._bytes(obj)
        elif hasattr(obj, "__array__") and hasattr(obj, "dtype"):  # e.g. a jax.Array
            self._array(np.asarray(obj))
        elif isinstance(obj, list | tuple | dict | argparse.Namespace | types.SimpleNamespace):
            self._container(obj)
        else:
            raise TypeError(f"save_pth cannot write a {type(obj).__qualname__}")

    def _container(self, obj: Any) -> None:
        if id(obj) in self._open:
            raise ValueError("save_pth cannot write a structure that contains itself")
        self._open.add(id(obj))
        if isinstance(obj, list):
            self._list(obj)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, dict):
            self._dict(obj)
        else:
            self._namespace(obj)
        self._open.discard(id(obj))

    def _int(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += BININT1 + bytes([value])
        elif 0 <= value < 1 << 16:
            self.out += BININT2 + struct.pack("<H", value)
        elif -(1 << 31) <= value < 1 << 31:
            self.out += BININT + struct.pack("<i", value)
        else:
            size = (value.bit_length() >> 3) + 1  # two's complement, little-endian
            if size > 255:
                raise ValueError("save_pth cannot write an int of more than 255 bytes")
            self.out += LONG1 + bytes([size]) + value.to_bytes(size, "little", signed=True)

    def _str(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.out += BINUNICODE + struct.pack("<I", len(data)) + data

    def _bytes(self, data: bytes) -> None:
        # Protocol 2 has no bytes opcode that Python 3 reads back as bytes; torch uses this form.
        self._global("_codecs", "encode")
        self.save((data.decode("latin1"), "latin1"))
        self.out += REDUCE

    def _global(self, module: str, name: str) -> None:
        self.out += GLOBAL + f"{module}\n{name}\n".encode("ascii")

    def _tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self.out += EMPTY_TUPLE
            return
        if len(items) > 3:
            self.out += MARK
        for item in items:
            self.save(item)
        self.out += _TUPLE_N.get(len(items), TUPLE)

    def _list(self, items: list[Any]) -> None:
        self.out += EMPTY_LIST
        if items:
            self.out += MARK
            for item in items:
                self.save(item)
            self.out += APPENDS

    def _dict(self, mapping: dict[Any, Any]) -> None:
        ordered = isinstance(mapping, collections.OrderedDict)
        if ordered:
            self._global("collections", "OrderedDict")
            self.out += EMPTY_TUPLE + REDUCE
        else:
            self.out += EMPTY_DICT
        if mapping:
            self.out += MARK
            for key, value in mapping.items():
                self.save(key)
                self.save(value)
            self.out += SETITEMS
        attributes = getattr(mapping, "__dict__", None) if ordered else None
        if attributes:  # a state dict's `_metadata`, pickled the way torch does
            self._dict(dict(attributes))
            self.out += BUILD

    def _namespace(self, namespace: Any) -> None:
        self._global("argparse", "Namespace")
        self.out += EMPTY_TUPLE + NEWOBJ
        self._dict(dict(vars(namespace)))
        self.out += BUILD

    def _numpy_scalar(self, value: np.generic) -> None:
        dtype = value.dtype
        if dtype.kind not in "biufc":
            raise TypeError(f"save_pth cannot write a numpy {dtype} scalar; use a 0-d array")
        self._global("numpy._core.multiarray", "scalar")
        self._global("numpy", "dtype")
        self.save((f"{dtype.kind}{dtype.itemsize}", False, True))
        self.out += REDUCE
        order = "|" if dtype.itemsize == 1 else "<"
        self.save((3, order, None, None, None, -1, -1, 0))  # numpy's dtype state for a number
        self.out += BUILD
        self._bytes(np.asarray(value, dtype=dtype.newbyteorder("<")).tobytes())
        self.out += TUPLE2 + REDUCE

    def _array(self, array: np.ndarray) -> None:
        name = _STORAGE_NAMES.get(array.dtype.newbyteorder("="))
        if name is None:
            raise TypeError(f"save_pth cannot write a {array.dtype} array: torch has no such type")
        data = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        # An empty record would break torch's opt-in offset arithmetic (it expects no data
        # descriptor after one, zipfile always writes it): give empty arrays a one-item storage.
        storage = data.reshape(-1) if data.size else np.zeros(1, data.dtype)
        key = str(len(self.storages))
        self.storages.append(storage)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += MARK
        self.out += MARK
        self.save("storage")
        self._global("torch", name)
        self.save(key)
        self.save("cpu")
        self.save(storage.size)
        self.out += TUPLE + BINPERSID
        self.save(0)  # storage offset
        self.save(tuple(data.shape))
        self.save(_contiguous_strides(data.shape))
        self.save(False)  # requires_grad
        self.save(collections.OrderedDict())  # backward hooks: none
        self.out += TUPLE + REDUCE


class _AppendOnly:
    """A file without ``seek``: zipfile then puts each record's sizes in a data descriptor after
    it, as torch's writer does, which keeps torch's computed mmap offsets (an opt-in) exact."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()


def _write_aligned(archive: zipfile.ZipFile, offset: int, name: str, payload: Any) -> None:
    """Stores ``payload`` uncompressed with its first byte at a multiple of ``_ALIGN``."""
    size = memoryview(payload).nbytes
    # zipfile refuses records past ZIP64_LIMIT unless told to use zip64, and then adds its own
    # zip64 field after ours in the local header, which the padding must count.
    zip64 = size >= zipfile.ZIP64_LIMIT
    header = _LOCAL_HEADER + len(name.encode("ascii")) + 4 + (_ZIP64_FIELD if zip64 else 0)
    padding = -(offset + header) % _ALIGN
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.extra = struct.pack("<HH", _PAD_FIELD_ID, padding) + b"\0" * padding
    with archive.open(info, "w", force_zip64=zip64) as dest:
        dest.write(payload)


def save_pth(obj: Any, path: str | os.PathLike[str]) -> None:
    """Writes ``obj`` in the zip format of ``torch.save`` (readable by ``torch.load``).

    Supports dict, ``OrderedDict`` (written as such, with a state dict's ``_metadata``), list,
    tuple, str, bytes, int, float, bool, None, numpy arrays (written contiguous, one storage
    each, little-endian; views that shared memory are no longer shared), numpy number scalars
    and ``argparse.Namespace`` / :class:`Namespace` (written as ``argparse.Namespace``). A file
    with no namespace and no numpy scalar loads with ``torch.load(path, weights_only=True)``.
    The file is written next to ``path`` first and renamed, so a crash leaves no half file.
    """
    pickler = _Pickler()
    records: list[tuple[str, Any]] = [
        ("data.pkl", pickler.dump(obj)),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGN).encode()),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{i}", a.view(np.uint8)) for i, a in enumerate(pickler.storages)]
    records.append(("version", b"3\n"))
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f, zipfile.ZipFile(_AppendOnly(f), "w") as archive:
            for name, payload in records:
                # ZipFile writes straight to f: f.tell() is where the next local header starts.
                _write_aligned(archive, f.tell(), f"archive/{name}", payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

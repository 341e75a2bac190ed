"""The records of a torch.save zip, read within bounds: tensor storages and their ledger."""

from __future__ import annotations

import dataclasses
import sys
import zipfile
from collections.abc import Collection

import ml_dtypes
import numpy as np

from dino_jax.interop.pth_limits import (
    MAX_STORAGE_INFLATION,
    MAX_VIEW_RATIO,
    STORAGE_SLACK_BYTES,
    VIEW_SLACK_ELEMENTS,
    PthError,
)

# torch's typed storage classes (the names `torch.save` pickles) and what one element is.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_CHUNK = 16 << 20  # bytes read at a time into a storage


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    ledger: _Ledger
    flat: np.ndarray | None  # 1-D, native byte order, writable; None while not read


class _Ledger:
    """Element counts of the storages and of the tensor views over them, kept within bounds."""

    def __init__(self, storage_budget: int) -> None:
        self.storage_budget = storage_budget
        self.storage_bytes = 0
        self.storage_elements = 0
        self.view_elements = 0
        self.tensors = 0
        self.sizes: dict[str, int] = {}  # storage key -> bytes

    def add_storage(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.sizes[key] = numel * dtype.itemsize
        self.storage_bytes += numel * dtype.itemsize
        self.storage_elements += numel
        if self.storage_bytes > self.storage_budget:
            raise PthError(
                f"its tensor storages declare {self.storage_bytes:,} bytes, more than "
                f"{MAX_STORAGE_INFLATION} x the file's size plus {STORAGE_SLACK_BYTES >> 20} MiB "
                "(a zip bomb or overlapping records)"
            )

    def add_view(self, elements: int) -> None:
        self.tensors += 1
        self.view_elements += elements
        bound = MAX_VIEW_RATIO * self.storage_elements + VIEW_SLACK_ELEMENTS
        if self.view_elements > bound:
            raise PthError(
                f"its tensors claim {self.view_elements:,} elements over storages of "
                f"{self.storage_elements:,}: views (such as stride-0 expansions) that large are "
                "refused"
            )


def _check_record(info: zipfile.ZipInfo) -> None:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PthError(f"record {info.filename} uses zip compression {info.compress_type}")
    if info.flag_bits & 0x1:
        raise PthError(f"record {info.filename} is encrypted")


def _read_record(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """The bytes of record ``name``: refused when its directory entry says more than ``limit``;
    zipfile stops decompressing at the declared size, and fewer bytes than declared is damage."""
    info = archive.getinfo(name)
    _check_record(info)
    if info.file_size > limit:
        raise PthError(f"record {name} holds {info.file_size:,} bytes, more than {limit:,} allowed")
    with archive.open(info) as f:
        data = f.read(limit + 1)
    if len(data) != info.file_size:
        raise PthError(f"record {name} has {len(data)} bytes, its directory says {info.file_size}")
    return data


def _read_storage(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype) -> np.ndarray:
    # Read in chunks into the final buffer: the peak is the storage plus one chunk.
    buffer = np.empty(info.file_size, np.uint8)
    view = memoryview(buffer)
    done = 0
    with archive.open(info) as f:
        while done < info.file_size:
            chunk = f.read(min(_CHUNK, info.file_size - done))
            if not chunk:
                break
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != info.file_size or f.read(1):
            raise PthError(f"storage record {info.filename} is shorter than its directory says")
    return buffer.view(dtype)


def _byteswap(flat: np.ndarray) -> None:
    # Complex numbers swap each half; every other supported type swaps whole elements.
    unit = flat.itemsize // 2 if flat.dtype.kind == "c" else flat.itemsize
    if unit > 1:
        flat.view(f"u{unit}").byteswap(inplace=True)


class _Storages:
    """The ``<prefix>/data/<key>`` records of one archive: declared when the pickle names them
    (checked against the zip directory, nothing read), read only when ``wanted``."""

    def __init__(
        self,
        archive: zipfile.ZipFile | None,
        prefix: str,
        byteorder: str,
        ledger: _Ledger,
        wanted: Collection[str] | None,
    ) -> None:
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._ledger, self._wanted = ledger, wanted
        self._cache: dict[str, tuple[_StorageType, _Storage]] = {}

    def get(self, stype: _StorageType, key: str, numel: int) -> _Storage:
        if key in self._cache:
            if self._cache[key][0] != stype or self._cache[key][1].numel != numel:
                raise PthError(f"storage {key} is declared twice, differently")
            return self._cache[key][1]
        if self._archive is None:
            raise PthError("a tensor storage outside a torch.save zip archive")
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise PthError(f"missing storage record {name}") from None
        _check_record(info)
        if info.file_size != numel * stype.dtype.itemsize:
            raise PthError(f"storage record {name} has {info.file_size} bytes, not {numel} items")
        self._ledger.add_storage(key, stype.dtype, numel)
        flat = None
        if self._wanted is None or key in self._wanted:
            flat = _read_storage(self._archive, info, stype.dtype)
            if self._byteorder != sys.byteorder:
                _byteswap(flat)
        storage = _Storage(key, stype.dtype, numel, self._ledger, flat)
        self._cache[key] = (stype, storage)
        return storage

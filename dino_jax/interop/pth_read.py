"""Safe reader for ``torch.save`` files: tensors come back as numpy arrays, and nothing in the file
can make Python run code, because every global it names must be on a short allowlist."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import sys
import types
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

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

# The first object pickled in a pre-1.6 (non-zip) torch.save file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_HOW_TO_FIX = (
    "The file is not a plain PyTorch checkpoint (tensors, dicts, lists, numbers, strings, an "
    "argparse.Namespace). If you trust it, load it in PyTorch and re-save just its weights, "
    "e.g. torch.save(model.state_dict(), new_path): such a file loads here and with "
    "torch.load(new_path, weights_only=True)."
)


class UnsafeCheckpointError(ValueError):
    """The file needs something outside the allowlist; it was refused before anything ran."""


class _Sealed(type):
    # A class the pickle can name must not be editable by the pickle (BUILD on the class object
    # would otherwise set attributes on it for the rest of the process).
    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"refusing to set attribute {name!r} on {cls.__name__}")


class Namespace(types.SimpleNamespace, metaclass=_Sealed):
    """Stands in for ``argparse.Namespace`` (DINO pickles its command-line ``args``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    flat: np.ndarray  # 1-D, native byte order, writable; tensors are views of it


class _Constructor:
    """An allowlisted callable; slots and a blocked setattr keep BUILD from editing it."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"refusing to set attribute {name!r} on a constructor")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> Any:
    # requires_grad, backward hooks and metadata do not exist for numpy arrays.
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise ValueError("malformed tensor record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
    # as_strided does no bounds checks: prove the view stays inside the storage first.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 not in size and last >= storage.flat.size:
        raise ValueError(f"tensor view {size}/{stride}+{offset} overruns its storage")
    itemsize = storage.flat.itemsize
    return np.lib.stride_tricks.as_strided(
        storage.flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )


def _rebuild_parameter(data: Any, *_ignored: Any) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise ValueError("malformed parameter record")
    return data


class _DtypeSpec:
    """What ``numpy.dtype(...)`` plus its BUILD state describe, kept as data."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "|", "="):
            raise ValueError(f"unsupported numpy dtype state {state!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _numpy_dtype(name: Any, *_flags: Any) -> _DtypeSpec:
    dtype = np.dtype(name) if isinstance(name, str) and len(name) <= 4 else None
    if dtype is None or dtype.kind not in "biufc" or dtype.fields or dtype.subdtype:
        raise UnsafeCheckpointError(f"numpy dtype {name!r} is not a plain number type")
    return _DtypeSpec(dtype)


def _numpy_scalar(spec: Any, data: Any = None) -> np.generic:
    # Built from the raw bytes ourselves rather than through numpy's own unpickling path.
    if not isinstance(spec, _DtypeSpec) or not isinstance(spec.dtype, np.dtype):
        raise ValueError("malformed numpy scalar record")
    if not isinstance(data, bytes) or len(data) != spec.dtype.itemsize:
        raise ValueError("numpy scalar record has the wrong number of bytes")
    return np.frombuffer(data, dtype=spec.dtype)[0]


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    # Pickle protocol 2 spells a bytes object as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is only allowed to rebuild latin1 bytes")
    return text.encode("latin1")


_SCALAR = _Constructor(_numpy_scalar)

# Every global a checkpoint may name, and what we build instead. The fixtures name all of these
# but _rebuild_parameter and the pre-2.0 numpy module path, which real DINO checkpoints use.
ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = types.MappingProxyType(
    {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): Namespace,
        ("torch._utils", "_rebuild_tensor_v2"): _Constructor(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _Constructor(_rebuild_parameter),
        ("numpy", "dtype"): _Constructor(_numpy_dtype),
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("_codecs", "encode"): _Constructor(_latin1_bytes),
        **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    }
)


class _StorageReader:
    """Reads ``<archive>/data/<key>`` records once each, so tensors can share a storage."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str) -> None:
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._cache: dict[str, tuple[_StorageType, _Storage]] = {}

    def get(self, stype: _StorageType, key: str, numel: int) -> _Storage:
        if key in self._cache:
            if self._cache[key][0] != stype:
                raise ValueError(f"storage {key} is used with two element types")
            return self._cache[key][1]
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise ValueError(f"missing storage record {name}") from None
        if info.file_size != numel * stype.dtype.itemsize:
            raise ValueError(f"storage record {name} has {info.file_size} bytes, not {numel} items")
        flat = np.frombuffer(bytearray(self._archive.read(name)), dtype=stype.dtype)
        if self._byteorder != sys.byteorder:
            _byteswap(flat)
        storage = _Storage(flat)
        self._cache[key] = (stype, storage)
        return storage


def _byteswap(flat: np.ndarray) -> None:
    # Complex numbers swap each half; every other supported type swaps whole elements.
    unit = flat.itemsize // 2 if flat.dtype.kind == "c" else flat.itemsize
    if unit > 1:
        flat.view(f"u{unit}").byteswap(inplace=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only allowlisted globals; tensor storages come from the zip, never from code."""

    def __init__(self, file: io.BufferedIOBase, storages: _StorageReader | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refused global {module}.{name} (nothing was run): loading the file would make "
                "Python import and call it. " + _HOW_TO_FIX
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        is_storage = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        )
        if not is_storage:
            raise UnsafeCheckpointError(f"refused persistent id {pid!r}: not a torch storage")
        if self._storages is None:
            raise ValueError("a tensor storage outside a torch.save zip archive")
        return self._storages.get(pid[1], pid[2], pid[4])


def _unpickle(data: bytes, path: str, storages: _StorageReader | None) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), storages).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except zipfile.BadZipFile:
        raise  # a damaged storage record: reported as a damaged archive by the caller
    except Exception as err:  # any malformed pickle surfaces as one clear error
        raise ValueError(
            f"{path}: cannot read the pickled data ({type(err).__name__}: {err})"
        ) from err


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        raise ValueError(f"{path}: zip archive without <name>/data.pkl: not written by torch.save")
    prefix = pickles[0][: -len("/data.pkl")]
    if f"{prefix}/constants.pkl" in names:
        raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save file")
    return prefix


def _load_zip(path: str) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            names = set(archive.namelist())
            byteorder = "little"  # what torch assumes when the record is missing
            if f"{prefix}/byteorder" in names:
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
            storages = _StorageReader(archive, prefix, byteorder)
            return _unpickle(archive.read(f"{prefix}/data.pkl"), path, storages)
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: truncated or corrupt zip archive ({err})") from err


def _load_plain(path: str, data: bytes) -> Any:
    obj = _unpickle(data, path, storages=None)
    if type(obj) is int and obj == LEGACY_MAGIC:
        raise ValueError(
            f"{path}: legacy (PyTorch < 1.6) torch.save format, which this reader does not "
            "support. Convert it with a recent PyTorch: "
            "torch.save(torch.load(path, weights_only=True), new_path)"
        )
    return obj


def load_pth(path: str | os.PathLike[str]) -> Any:
    """Reads a ``torch.save`` file without torch and without running code from it.

    Tensors (and ``nn.Parameter``) become numpy arrays with the saved dtype, shape and strides;
    tensors that shared a storage are views of one writable buffer, as in torch.
    ``OrderedDict`` stays ``OrderedDict`` (a state dict's ``_metadata`` attribute included) and
    ``dict`` stays ``dict``, so ``save_pth`` writes the same structure back; ``argparse.Namespace``
    becomes :class:`Namespace`; numpy scalars stay numpy scalars. Anything else raises
    :class:`UnsafeCheckpointError`; a damaged file raises ``ValueError`` naming ``path``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
        if head != b"PK":  # not a zip: still only ever unpickled by the restricted unpickler
            return _load_plain(path, head + f.read())
    return _load_zip(path)

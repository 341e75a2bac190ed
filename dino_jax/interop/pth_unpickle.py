"""The restricted unpickler: the globals a .pth pickle may name, and what each builds."""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import types
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dino_jax.interop.pth_limits import PthError, UnsafeCheckpointError, _short
from dino_jax.interop.pth_storage import STORAGE_DTYPES, _Storage, _Storages, _StorageType

_HOW_TO_FIX = (
    "The file is not a plain PyTorch checkpoint (tensors, dicts, lists, numbers, strings, an "
    "argparse.Namespace). If you trust it, load it in PyTorch and re-save just its weights, "
    "e.g. torch.save(model.state_dict(), new_path): such a file loads here and with "
    "torch.load(new_path, weights_only=True)."
)


class _Sealed(type):
    # A class the pickle can name must not be editable by the pickle (BUILD on the class object
    # would otherwise set attributes on it for the rest of the process).
    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"refusing to set attribute {name!r} on {cls.__name__}")


class Namespace(types.SimpleNamespace, metaclass=_Sealed):
    """Stands in for ``argparse.Namespace`` (DINO pickles its command-line ``args``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor as the pickle declares it, its elements not read: ``storage`` is the key of its
    storage record, ``offset`` and ``strides`` count elements."""

    storage: str
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


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
        shown = _short.repr(value)
        raise PthError(f"tensor {what} must be a tuple of non-negative ints, got {shown}")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> Any:
    # requires_grad, backward hooks and metadata do not exist for numpy arrays.
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise PthError("malformed tensor record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise PthError(f"tensor size {size} and stride {stride} differ in rank")
    # as_strided does no bounds checks: prove the view stays inside the storage first.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset > storage.numel or (0 not in size and last >= storage.numel):
        raise PthError(f"tensor view {size}/{stride}+{offset} overruns its storage")
    storage.ledger.add_view(math.prod(size))
    if storage.flat is None:
        return TensorInfo(storage.key, storage.dtype, size, stride, offset)
    itemsize = storage.flat.itemsize
    return np.lib.stride_tricks.as_strided(
        storage.flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    if not isinstance(data, np.ndarray | TensorInfo):
        raise PthError("malformed parameter record")
    return data


class _DtypeSpec:
    """What ``numpy.dtype(...)`` plus its BUILD state describe, kept as data."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "|", "="):
            raise PthError(f"unsupported numpy dtype state {_short.repr(state)}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _numpy_dtype(name: Any, *_flags: Any) -> _DtypeSpec:
    dtype = np.dtype(name) if isinstance(name, str) and len(name) <= 4 else None
    if dtype is None or dtype.kind not in "biufc" or dtype.fields or dtype.subdtype:
        raise UnsafeCheckpointError(f"numpy dtype {_short.repr(name)} is not a plain number type")
    return _DtypeSpec(dtype)


def _numpy_scalar(spec: Any, data: Any = None) -> np.generic:
    # Built from the raw bytes ourselves rather than through numpy's own unpickling path.
    if not isinstance(spec, _DtypeSpec) or not isinstance(spec.dtype, np.dtype):
        raise PthError("malformed numpy scalar record")
    if not isinstance(data, bytes) or len(data) != spec.dtype.itemsize:
        raise PthError("numpy scalar record has the wrong number of bytes")
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


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only allowlisted globals; tensor storages come from the zip, never from code."""

    def __init__(self, data: bytes, storages: _Storages) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refused global {_short.repr(module)[1:-1]}.{_short.repr(name)[1:-1]} (nothing "
                "was run): loading the file would make Python import and call it. " + _HOW_TO_FIX
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
            raise UnsafeCheckpointError(
                f"refused persistent id {_short.repr(pid)}: not a torch storage"
            )
        return self._storages.get(pid[1], pid[2], pid[4])


def _unpickle(data: bytes, storages: _Storages) -> Any:
    try:
        return _RestrictedUnpickler(data, storages).load()
    except (PthError, zipfile.BadZipFile, zlib.error, OSError):
        raise  # refusals say why; a damaged or unreadable record is reported by the caller
    except Exception as err:  # any malformed pickle surfaces as one clear error
        raise PthError(
            f"cannot read the pickled data ({type(err).__name__}: {_short.repr(str(err))[1:-1]})"
        ) from err

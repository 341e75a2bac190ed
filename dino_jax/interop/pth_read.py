"""Safe reader for ``torch.save`` files: tensors come back as numpy arrays, nothing in the file
can make Python run code (every global it names must be on a short allowlist), and nothing in
it can make the reader allocate more than the file's own tensors plus a bounded overhead.

Reading happens in two passes over the pickle. The first (:func:`open_pth`) reads only the
zip directory and ``data.pkl``: every tensor becomes a :class:`TensorInfo` (storage, dtype,
shape), and the sizes are checked against the bounds below. The second (:meth:`PthFile.load`)
reads the storage records that are wanted, each exactly as large as its declaration.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import os
import pickle
import pickletools
import reprlib
import stat
import struct
import sys
import types
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
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

# ---- bounds ---------------------------------------------------------------------------------
# A DINO ViT-L/16 checkpoint.pth written by torch.save (student, teacher, AdamW state: 1,508
# tensors) has a data.pkl of 142 kB, 45,974 opcodes, 1,514 zip records and containers nested
# 5 deep; each bound leaves a margin of 20x or more over that.
MAX_PICKLE_BYTES = 16 << 20  # data.pkl (or a plain pickle file), after decompression
MAX_PICKLE_OPCODES = 1 << 20  # every object the unpickler builds takes at least one opcode
MAX_NESTING = 100  # containers inside containers
MAX_ZIP_RECORDS = 1 << 16  # zip directory entries
MAX_ZIP_DIRECTORY_BYTES = 16 << 20
# The storages together may hold at most this many times the bytes of the file on disk plus
# STORAGE_SLACK_BYTES: torch stores records uncompressed (ratio 1), so only a deflated archive
# comes near it, and a zip bomb (or overlapping records) is refused before anything is read.
MAX_STORAGE_INFLATION = 4
STORAGE_SLACK_BYTES = 64 << 20
# Tensors are views of storages. Their elements together may number at most twice those of
# the storages plus VIEW_SLACK_ELEMENTS: shared weights and small expanded (stride-0) tensors
# fit; a stride-0 view claiming more elements than that is refused, never materialised.
MAX_VIEW_RATIO = 2
VIEW_SLACK_ELEMENTS = 1 << 24
MAX_INT_BITS = 2048  # no checkpoint needs larger integers (save_pth writes up to 2040 bits)
MAX_KEY_INT = 1 << 64  # larger ints as dict keys could be made to share one hash at will
_CHUNK = 16 << 20  # bytes read at a time into a storage

_HOW_TO_FIX = (
    "The file is not a plain PyTorch checkpoint (tensors, dicts, lists, numbers, strings, an "
    "argparse.Namespace). If you trust it, load it in PyTorch and re-save just its weights, "
    "e.g. torch.save(model.state_dict(), new_path): such a file loads here and with "
    "torch.load(new_path, weights_only=True)."
)

_short = reprlib.Repr()  # bounded repr for messages: values from the file can be huge or deep
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


class PthError(ValueError):
    """The file cannot be read as a checkpoint (damaged, foreign, or over a bound); the
    message names the file."""


class UnsafeCheckpointError(PthError):
    """The file needs something outside the allowlist; it was refused before anything ran."""


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

# ---- the opcode scan: bounds on what the unpickler will build, checked before it runs --------

_KEY_KINDS = frozenset({"int", "int_or_bool", "bool", "str", "bytes_or_str", "bytes", "None"})
_REFUSED_OPCODES = {
    "EXT1": "copyreg extension codes",
    "EXT2": "copyreg extension codes",
    "EXT4": "copyreg extension codes",
    "INST": "protocol-0 instances",
    "OBJ": "protocol-1 instances",
    "NEXT_BUFFER": "out-of-band buffers",
    "READONLY_BUFFER": "out-of-band buffers",
}
_ORDERED_DICT = ("global", "collections OrderedDict")


def _scan_pickle(data: bytes) -> None:
    """Walks the opcodes of ``data`` with a model of the unpickler's stack and memo (kinds of
    values, not the values), refusing what would let a small pickle build something large:
    more than MAX_PICKLE_OPCODES opcodes, memo indices beyond the entries written so far (the
    memo is an array sized by its largest index), integers of more than MAX_INT_BITS bits, dict
    keys and set items other than strings, bytes, ints below MAX_KEY_INT and None (others have
    hashes the file could make collide, making each insertion slow), calls of anything but a
    named global, and OrderedDicts built from arguments."""
    try:
        _walk_opcodes(pickletools.genops(data))
    except ValueError as err:  # genops: truncated or unknown opcodes
        if isinstance(err, PthError):
            raise
        raise PthError(f"cannot read the pickled data ({_short.repr(str(err))[1:-1]})") from None


def _value_kind(kind: str, arg: Any) -> tuple[str, Any]:
    """What the model stack holds for a pushed constant: strings keep their (short) text for
    STACK_GLOBAL, ints too large to be keys are told apart."""
    if kind == "str":
        return ("str", arg if isinstance(arg, str) and len(arg) <= 256 else None)
    if type(arg) is int and not -MAX_KEY_INT < arg < MAX_KEY_INT:
        return ("big int", None)
    return (kind, None)


# Opcodes that only push one constant (most of a pickle), and the mark position (or -1) and
# stack effect of every other opcode, from pickletools' descriptions.
_PUSHES = frozenset(
    op.name
    for op in pickletools.opcodes
    if not op.stack_before
    and len(op.stack_after) == 1
    and op.stack_after[0] is not pickletools.markobject
    and op.stack_after[0] is not pickletools.anyobject
    and op.name not in ("EMPTY_TUPLE", *_REFUSED_OPCODES)
)
_EFFECTS = {
    op.name: (
        op.stack_before.index(pickletools.markobject)
        if pickletools.markobject in op.stack_before
        else -1,
        len(op.stack_before),
        tuple((kind.name, None) for kind in op.stack_after),
    )
    for op in pickletools.opcodes
}


def _check_keys(kinds: list[tuple], what: str) -> None:
    for kind, _ in kinds:
        if kind not in _KEY_KINDS:
            raise UnsafeCheckpointError(
                f"a {what} that is a {kind} object: only strings, bytes, ints and None are allowed"
            )


def _walk_opcodes(opcodes: Any) -> None:
    stack: list[tuple] = []  # (kind, detail) of each value the unpickler would hold
    marks: list[int] = []  # stack heights at each MARK: the unpickler's fences
    memo: dict[int, tuple] = {}

    def pop(n: int) -> list[tuple]:
        if n > len(stack) - (marks[-1] if marks else 0):
            raise PthError("malformed pickle (stack underflow)")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    for count, (op, arg, _pos) in enumerate(opcodes, start=1):
        if count > MAX_PICKLE_OPCODES:
            raise PthError(f"the pickle has more than {MAX_PICKLE_OPCODES:,} opcodes")
        name = op.name
        if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
            raise PthError(f"an integer of {arg.bit_length():,} bits in the pickle")
        if name in _PUSHES:
            stack.append(_value_kind(op.stack_after[0].name, arg))
            continue
        if name in _REFUSED_OPCODES:
            raise UnsafeCheckpointError(f"pickle opcode {name} ({_REFUSED_OPCODES[name]})")
        mark_at, n_before, after = _EFFECTS[name]
        below: list[tuple] = []
        if mark_at >= 0:
            if not marks:
                raise PthError("malformed pickle (no mark)")
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            below = pop(mark_at)
        else:
            items = pop(n_before)
        pushed: Any = after
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > len(memo):
                raise PthError(f"pickle memo index {index:,} skips entries ({len(memo)} written)")
            stack.extend(items)
            memo[index] = pop(1)[0]  # the top of the stack, above the current mark
            pushed = [memo[index]]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if arg not in memo:
                raise PthError(f"malformed pickle (memo entry {arg} read before written)")
            pushed = [memo[arg]]
        elif name == "DUP":
            pushed = items * 2
        elif name == "GLOBAL":
            pushed = [("global", arg)]
        elif name == "STACK_GLOBAL":
            if not all(kind == "str" and isinstance(text, str) for kind, text in items):
                raise PthError("malformed pickle (STACK_GLOBAL without two strings)")
            pushed = [("global", f"{items[0][1]} {items[1][1]}")]
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            if len(items) % 2 and name != "SETITEM":
                raise PthError("malformed pickle (a dict from an odd number of items)")
            _check_keys(items[1:2] if name == "SETITEM" else items[0::2], "dict key")
            pushed = items[:1] if name == "SETITEM" else below or after
        elif name in ("ADDITEMS", "FROZENSET"):
            _check_keys(items, "set item")
            pushed = below or after
        elif name == "REDUCE":
            func, args = items
            if func[0] != "global":
                raise UnsafeCheckpointError(f"a pickle call of a {func[0]}, not of a global")
            if func == _ORDERED_DICT and args != ("tuple", 0):
                raise UnsafeCheckpointError("an OrderedDict built from arguments")
        elif name in ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            pushed = [("tuple", len(items))]
        elif name == "APPENDS":
            pushed = below
        stack.extend(pushed)


# ---- zip records, read within bounds ------------------------------------------------------------


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


def _children(obj: Any) -> list[Any] | None:
    """What a container refers to (None for a leaf), attributes of a dict subclass included."""
    if isinstance(obj, dict):
        kids = [*obj.keys(), *obj.values()]
        attributes = getattr(obj, "__dict__", None)  # an OrderedDict's `_metadata`
        return [*kids, attributes] if attributes else kids
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, types.SimpleNamespace):
        return [vars(obj)]
    return None


def check_nesting(root: Any, limit: int = MAX_NESTING) -> None:
    """Raise PthError if containers nest more than ``limit`` deep or contain themselves.

    Iterative, and each container is visited once (a shared one is not walked again), so any
    structure the bounded unpickler can build is checked in time linear in its size.
    """
    if _children(root) is None:
        return
    heights: dict[int, int] = {}  # id -> levels from this container down
    on_path = {id(root)}
    frames = [[root, _children(root), 0, 0]]  # container, children, next child, tallest child
    while frames:
        frame = frames[-1]
        container, kids, index, tallest = frame
        if index < len(kids):
            frame[2] += 1
            child = kids[index]
            if id(child) in heights:
                frame[3] = max(tallest, heights[id(child)])
                continue
            grandchildren = _children(child)
            if grandchildren is None:
                continue
            if not grandchildren:  # an empty container: one level, nothing below
                frame[3] = max(frame[3], 1)
                continue
            if id(child) in on_path:
                raise PthError("a container that contains itself")
            if len(frames) >= limit:
                raise PthError(f"containers nested more than {limit} deep")
            on_path.add(id(child))
            frames.append([child, grandchildren, 0, 0])
            continue
        frames.pop()
        on_path.discard(id(container))
        heights[id(container)] = tallest + 1
        if tallest + 1 > limit:
            raise PthError(f"containers nested more than {limit} deep")
        if frames:
            frames[-1][3] = max(frames[-1][3], tallest + 1)


# ---- files -------------------------------------------------------------------------------------


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        raise PthError("zip archive without <name>/data.pkl: not written by torch.save")
    prefix = pickles[0][: -len("/data.pkl")]
    if f"{prefix}/constants.pkl" in names:
        raise PthError("a TorchScript archive (torch.jit.save), not a torch.save file")
    return prefix


# What zipfile and zlib raise on a damaged archive (zipfile also lets struct and value errors
# of its header parsing through).
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, struct.error, ValueError)


def _open_zip(f: io.BufferedReader) -> zipfile.ZipFile:
    # zipfile reads the whole central directory into objects: bound it from the end record first.
    end = zipfile._EndRecData(f)  # the (zip64-aware) end-of-directory record, or None
    if end is None:
        raise PthError("truncated or corrupt zip archive (no end-of-directory record)")
    records, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if records > MAX_ZIP_RECORDS or directory > MAX_ZIP_DIRECTORY_BYTES:
        raise PthError(
            f"its zip directory lists {records:,} records in {directory:,} bytes, more than "
            f"{MAX_ZIP_RECORDS:,} records or {MAX_ZIP_DIRECTORY_BYTES >> 20} MiB"
        )
    return zipfile.ZipFile(f)


def _open_regular(path: str) -> io.BufferedReader:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PthError("not a regular file")
    return os.fdopen(fd, "rb")


def _read_plain(f: io.BufferedReader) -> bytes:
    data = f.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise PthError(
            f"not a zip archive and larger than {MAX_PICKLE_BYTES >> 20} MiB: not a checkpoint "
            "this reader accepts"
        )
    if not data.startswith(pickle.PROTO):  # every pickle torch.save ever wrote (protocol >= 2)
        raise PthError("not a torch.save file: neither a zip archive nor a pickle")
    return data


@dataclasses.dataclass
class PthFile:
    """A checked ``torch.save`` file: its pickle read (``tree``, with a :class:`TensorInfo` in
    place of each tensor), its storage records not read. :meth:`load` reads them."""

    path: str
    tree: Any
    tensors: int  # tensor records in the pickle
    storage_bytes: int  # what the storages named by the pickle hold together
    storage_sizes: dict[str, int]  # bytes of each storage record, by key
    _pickle: bytes = dataclasses.field(repr=False)
    _zip: bool = dataclasses.field(repr=False)
    _prefix: str = dataclasses.field(repr=False, default="")
    _byteorder: str = dataclasses.field(repr=False, default="little")

    def load(self, storages: Collection[str] | None = None) -> Any:
        """The object with tensors as numpy arrays; with ``storages`` (keys, as in
        ``TensorInfo.storage``) only tensors of those storages are read, the others stay
        :class:`TensorInfo`."""
        with _naming(self.path):
            if not self._zip:
                return self._unpickle(None, storages)
            with _open_regular(self.path) as f, _open_zip(f) as archive:
                return self._unpickle(archive, storages)

    def _unpickle(self, archive: zipfile.ZipFile | None, wanted: Collection[str] | None) -> Any:
        budget = self.storage_bytes  # the first pass already held the storages to the bound
        ledger = _Ledger(budget)
        storages = _Storages(archive, self._prefix, self._byteorder, ledger, wanted)
        return _unpickle(self._pickle, storages)


def _unpickle(data: bytes, storages: _Storages) -> Any:
    try:
        return _RestrictedUnpickler(data, storages).load()
    except (PthError, zipfile.BadZipFile, zlib.error, OSError):
        raise  # refusals say why; a damaged or unreadable record is reported by the caller
    except Exception as err:  # any malformed pickle surfaces as one clear error
        raise PthError(
            f"cannot read the pickled data ({type(err).__name__}: {_short.repr(str(err))[1:-1]})"
        ) from err


def _first_pass(path: str) -> PthFile:
    with _open_regular(path) as f:
        disk_bytes = os.fstat(f.fileno()).st_size
        budget = MAX_STORAGE_INFLATION * disk_bytes + STORAGE_SLACK_BYTES
        is_zip = f.read(2) == b"PK"
        f.seek(0)
        prefix, byteorder = "", "little"  # what torch assumes when the record is missing
        if is_zip:
            with _open_zip(f) as archive:
                prefix = _archive_prefix(archive)
                if f"{prefix}/byteorder" in set(archive.namelist()):
                    record = _read_record(archive, f"{prefix}/byteorder", 16)
                    byteorder = record.decode("ascii", "replace")
                if byteorder not in ("little", "big"):
                    raise PthError(f"unknown byteorder record {_short.repr(byteorder)}")
                data = _read_record(archive, f"{prefix}/data.pkl", MAX_PICKLE_BYTES)
                _scan_pickle(data)
                ledger = _Ledger(budget)
                storages = _Storages(archive, prefix, byteorder, ledger, wanted=())
                tree = _unpickle(data, storages)
        else:
            data = _read_plain(f)
            _scan_pickle(data)
            ledger = _Ledger(budget)
            tree = _unpickle(data, _Storages(None, "", "little", ledger, wanted=()))
            if type(tree) is int and tree == LEGACY_MAGIC:
                raise PthError(
                    "legacy (PyTorch < 1.6) torch.save format, which this reader does not "
                    "support. Convert it with a recent PyTorch: "
                    "torch.save(torch.load(path, weights_only=True), new_path)"
                )
    check_nesting(tree)
    sizes = (ledger.tensors, ledger.storage_bytes, ledger.sizes)
    return PthFile(path, tree, *sizes, data, is_zip, prefix, byteorder)


def open_pth(path: str | os.PathLike[str]) -> PthFile:
    """Reads and checks the pickle of a ``torch.save`` file, not its tensor storages.

    Costs about the size of ``data.pkl`` (well under a megabyte for DINO checkpoints) whatever
    the size of the file. Raises :class:`UnsafeCheckpointError` for anything outside the
    allowlist and :class:`PthError` for a file that is damaged, not a checkpoint, or over one
    of the bounds at the top of this module; both name ``path``.
    """
    path = os.fspath(path)
    with _naming(path):
        return _first_pass(path)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Every error of reading `path` as a PthError whose message starts with the file."""
    try:
        yield
    except PthError as err:
        raise type(err)(f"{path}: {err}") from None
    except OSError as err:
        raise PthError(f"{path}: cannot read it ({err.strerror or err})") from err
    except _DAMAGE as err:
        raise PthError(f"{path}: truncated or corrupt zip archive ({err})") from err


def load_pth(path: str | os.PathLike[str]) -> Any:
    """Reads a ``torch.save`` file without torch and without running code from it.

    Tensors (and ``nn.Parameter``) become numpy arrays with the saved dtype, shape and strides;
    tensors that shared a storage are views of one writable buffer, as in torch.
    ``OrderedDict`` stays ``OrderedDict`` (a state dict's ``_metadata`` attribute included) and
    ``dict`` stays ``dict``, so ``save_pth`` writes the same structure back; ``argparse.Namespace``
    becomes :class:`Namespace`; numpy scalars stay numpy scalars. Anything else raises
    :class:`UnsafeCheckpointError`; a damaged file, or one over a bound, raises
    :class:`PthError` (a ``ValueError``) naming ``path``.
    """
    return open_pth(path).load()

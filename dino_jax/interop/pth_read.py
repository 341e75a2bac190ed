"""Safe reader for ``torch.save`` files: the pickle is checked first, the storages read after.

Tensors come back as numpy arrays, nothing in the file can make Python run code (every global it
names must be on a short allowlist, in pth_unpickle), and nothing in it can make the reader
allocate more than the file's own tensors plus a bounded overhead (the bounds of pth_limits).

Reading happens in two passes over the pickle. The first (:func:`open_pth`) reads only the
zip directory and ``data.pkl``: every tensor becomes a :class:`TensorInfo` (storage, dtype,
shape), and the sizes are checked against the bounds. The second (:meth:`PthFile.load`)
reads the storage records that are wanted, each exactly as large as its declaration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import stat
import struct
import zipfile
import zlib
from collections.abc import Collection, Iterator
from typing import Any

from dino_jax.interop.pth_checks import _scan_pickle, check_nesting
from dino_jax.interop.pth_limits import (
    MAX_PICKLE_BYTES,
    MAX_STORAGE_INFLATION,
    MAX_ZIP_DIRECTORY_BYTES,
    MAX_ZIP_RECORDS,
    STORAGE_SLACK_BYTES,
    PthError,
    _short,
)
from dino_jax.interop.pth_storage import _Ledger, _read_record, _Storages
from dino_jax.interop.pth_unpickle import _unpickle

# The first object pickled in a pre-1.6 (non-zip) torch.save file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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
    of the bounds in pth_limits; both name ``path``.
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

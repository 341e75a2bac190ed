"""The download and cache of dino_jax.hub: where a released file is fetched from
(`url`: the official server, or `base_url=` / $DINO_JAX_HUB_URL) and cached
(`cache_path`: `cache_dir=`, else $DINO_JAX_CACHE, else $XDG_CACHE_HOME/dino_jax, else
~/.cache/dino_jax), and `download`, which fetches it once and checks it on every later call.

A download is written to a hidden temporary file beside its final path, checked (as many
bytes as the server announced, a complete torch.save zip archive whose records match their
CRC-32s), synced and only then renamed into place; its URL, size and SHA-256 are recorded
beside it (`<file>.json`) and a cached file is checked against that record. Failures raise
HubError (dino_jax.hub_registry) with a message that says what was tried and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from dino_jax import __version__
from dino_jax.hub_registry import BASE_URL, HubError, _release

ENV_CACHE = "DINO_JAX_CACHE"  # the cache folder
ENV_URL = "DINO_JAX_HUB_URL"  # the base URL (a mirror), instead of the official server
TIMEOUT_S = 60.0  # seconds without a byte from the server before giving up
_CHUNK = 1 << 20
_LOG = logging.getLogger("dino_jax.hub")  # the name of the module users call


class _NetworkError(Exception):
    """The server could not be reached or broke off (the cause: what urllib raised)."""


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(ENV_URL) or BASE_URL).rstrip("/")


def url(name: str, base_url: str | None = None) -> str:
    """Where `name` is downloaded from: the official server, or `base_url` / $DINO_JAX_HUB_URL."""
    return f"{_base_url(base_url)}/{_release(name).path}"


def _cache_folder(cache_dir: str | os.PathLike[str] | None) -> str:
    xdg = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "dino_jax")
    return os.path.expanduser(os.fspath(cache_dir or os.environ.get(ENV_CACHE) or xdg))


def cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Where `name` is (or will be) cached: `<cache folder>/<official file name>`."""
    return os.path.join(_cache_folder(cache_dir), _release(name).filename)


def _record_path(path: str) -> str:
    """The JSON beside a cached file: the URL, size and SHA-256 it was downloaded with."""
    return path + ".json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_problem(path: str) -> str | None:
    """Why `path` is not a complete torch.save zip archive (every record is read and checked
    against its CRC-32), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        return f"not a complete zip archive, as torch.save writes ({err})"
    return None if bad is None else f"its record {bad!r} does not match its CRC-32"


@contextlib.contextmanager
def _temporary(path: str, mode: str = "wb") -> Iterator[tuple[IO, str]]:
    """(open file, its path): a hidden `.part` file beside `path`, removed on the way out
    unless the caller has renamed it onto `path` (os.replace, after closing it)."""
    folder, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with open(descriptor, mode) as f:
            yield f, temporary
    finally:
        _remove(temporary)


def _synced(f: IO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_record(path: str, record: dict[str, Any]) -> None:
    """The record beside `path`, written atomically (a temporary file renamed into place)."""
    with _temporary(_record_path(path), "w") as (f, temporary):
        json.dump(record, f, indent=1)
        _synced(f)
        f.close()
        os.replace(temporary, _record_path(path))


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _check_cached(path: str, source: str) -> None:
    """HubError unless the cached `path` is the file recorded beside it (size, SHA-256). A
    file without a record (put there by hand) is checked as an archive and recorded now."""
    record_path = _record_path(path)
    redo = f"Delete it ({path}) and {record_path} to download it again"
    if not os.path.exists(record_path):
        problem = _archive_problem(path)
        if problem:
            raise HubError(
                f"{path} is in the cache but is {problem}: delete it to download it again"
            )
        record = {"url": source, "size": os.path.getsize(path), "sha256": _sha256(path)}
        try:
            _write_record(path, record)
        except OSError as err:  # a read-only cache still loads, checked each time instead
            _LOG.info("cannot record the checksum of %s (%s)", path, err)
        return
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        size, sha = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise HubError(
            f"{record_path}, the record of {path}, is unreadable ({err}). {redo}"
        ) from None
    found = os.path.getsize(path)
    if found != size:
        raise HubError(
            f"{path} is damaged: {found:,} bytes where {size:,} were downloaded ({record_path}). "
            f"{redo}"
        )
    if _sha256(path) != sha:
        raise HubError(
            f"{path} is damaged: its SHA-256 is not the one recorded when it was downloaded "
            f"({record_path}). {redo}"
        )


def _content_length(response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (TypeError, ValueError):  # absent (chunked) or malformed: the archive check decides
        return None


def _receive(source: str, out: IO, timeout: float, progress: bool) -> tuple[int, int | None, str]:
    """Stream `source` into the open file `out`: (bytes received, bytes announced or None,
    SHA-256). A network failure raises _NetworkError; a write failure its OSError."""
    digest, size = hashlib.sha256(), 0
    request = urllib.request.Request(source, headers={"User-Agent": f"dino_jax/{__version__}"})
    with _network():
        response = urllib.request.urlopen(request, timeout=timeout)
    with response:
        total = _content_length(response)
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=os.path.basename(source),
            disable=not progress,
            leave=False,
        )
        with bar:
            while chunk := _read(response):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    return size, total, digest.hexdigest()


@contextlib.contextmanager
def _network() -> Iterator[None]:
    """What urllib and http.client raise (URLError, HTTPError, timeouts, refused or reset
    connections, malformed URLs) as _NetworkError."""
    try:
        yield
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _NetworkError(err) from err


def _read(response) -> bytes:
    """The next bytes of `response`, b"" at its end, also when the connection closed before
    the announced length (the caller compares the sizes)."""
    with _network():
        try:
            return response.read(_CHUNK)
        except http.client.IncompleteRead as err:
            return err.partial


def _network_problem(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"the server answered HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, Exception) else err
    if isinstance(err, TimeoutError):
        return "no answer in time (timed out)"
    if isinstance(err, http.client.HTTPException):
        return f"the connection broke ({type(err).__name__}: {err})"
    return f"cannot connect ({getattr(err, 'strerror', None) or err})"


def _not_had(name: str, source: str, path: str, why: str, base_url: str | None) -> HubError:
    """The error of a download that failed: what was tried, and how to do without it."""
    official = f"{BASE_URL}/{_release(name).path}"
    mirror = (
        f" ({ENV_URL} or base_url points to a mirror; the official file is {official})"
        if source != official
        else ""
    )
    return HubError(
        f"cannot download {name!r} from {source}: {why}. It is not in the cache ({path}) either; "
        f"nothing was kept. Try again, or download it by hand to that path{mirror}, or set "
        f"{ENV_CACHE} to a folder that holds {os.path.basename(path)}, or pass the file's path: "
        f"dino_jax.hub.load('/path/to/{os.path.basename(path)}')"
    )


def _fetch(source: str, path: str, timeout: float, progress: bool) -> str | None:
    """Download `source` to `path` through a temporary file beside it; None when done, else
    why the download was refused (nothing kept). Raises _NetworkError, or the OSError of a
    failed write into the cache folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _temporary(path) as (out, temporary):
        size, total, sha = _receive(source, out, timeout, progress)
        _synced(out)
        out.close()
        if total is not None and size != total:
            return f"the connection closed after {size:,} of {total:,} bytes (a truncated file)"
        problem = _archive_problem(temporary)
        if problem:
            return f"what arrived ({size:,} bytes) is {problem}"
        os.replace(temporary, path)
    try:
        _write_record(path, {"url": source, "size": size, "sha256": sha})
    except BaseException:
        _remove(path)
        raise
    return None


def _download(
    name: str,
    cache_dir: str | os.PathLike[str] | None,
    base_url: str | None,
    progress: bool,
    timeout: float,
) -> tuple[str, bool]:
    """(path of the checked file, whether it was downloaded by this call)."""
    path, source = cache_path(name, cache_dir), url(name, base_url)
    if os.path.exists(path):
        _check_cached(path, source)
        return path, False
    _LOG.info("downloading %s to %s", source, path)
    try:
        refused = _fetch(source, path, timeout, progress)
    except _NetworkError as err:
        raise _not_had(name, source, path, _network_problem(err.__cause__), base_url) from None
    except OSError as err:
        raise HubError(
            f"cannot write {name!r} into the cache folder {os.path.dirname(path)} "
            f"({err.strerror or err}): free space there, or set {ENV_CACHE} or pass cache_dir="
            " to use another folder"
        ) from None
    if refused:
        raise _not_had(name, source, path, refused, base_url)
    return path, True


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> str:
    """The path of the cached file of `name` (one of `names()`), downloaded first if it is not
    there, else checked against the size and SHA-256 recorded at download. `progress` shows a
    tqdm bar on stderr; `timeout`: seconds without data before giving up."""
    return _download(name, cache_dir, base_url, progress, timeout)[0]

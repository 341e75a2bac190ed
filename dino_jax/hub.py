"""The released DINO weights by name, as torch.hub gives them to PyTorch users:

    model, variables = dino_jax.hub.load("dino_vits16")
    out = model.apply(variables, images)  # images (B, H, W, 3), ImageNet-normalised

Names (`names()`): the official torch.hub names of facebookresearch/dino's hubconf.py for the
backbone-only files, and the same name with `_full` for the full checkpoints (teacher and
student with their heads; dino_jax.hub_registry). A `.pth` path loads the same way.

A file is downloaded once (urllib) from the official server, or from `base_url=` /
$DINO_JAX_HUB_URL (a mirror with the server's layout, `<folder>/<file>.pth`, `file://` too),
into a cache folder: `cache_dir=`, else $DINO_JAX_CACHE, else $XDG_CACHE_HOME/dino_jax, else
~/.cache/dino_jax. It is written to a temporary file in that folder, checked (as many bytes as
the server announced, a complete torch.save zip archive whose records match their CRC-32s),
synced and only then renamed into place, so the final name never holds a partial file; a
refused or failed download leaves nothing behind (only a killed process can leave a hidden
`.*.part` file). Its size and SHA-256 are recorded beside it (`<file>.json`) and checked on
every later load, which needs no network. Every failure raises HubError with a message that
says what was tried and what to do.
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
from dino_jax.config import closest_key
from dino_jax.hub_registry import BASE_URL, FULL_SUFFIX, RELEASES, Release
from dino_jax.interop.official import load_backbone
from dino_jax.models.backbones import RESNET_ARCHS, VIT_ARCHS, XCIT_ARCHS, family

__all__ = ["ENV_CACHE", "ENV_URL", "HubError", "cache_path", "download", "load", "names", "url"]

ENV_CACHE = "DINO_JAX_CACHE"  # the cache folder
ENV_URL = "DINO_JAX_HUB_URL"  # the base URL (a mirror), instead of the official server
TIMEOUT_S = 60.0  # seconds without a byte from the server before giving up
WHICH = ("teacher", "student")
_CHUNK = 1 << 20
_MODULES = {"vit": "VisionTransformer", "xcit": "XCiT", "resnet": "ResNet"}
_LOG = logging.getLogger(__name__)


class HubError(ValueError):
    """A named model or a file that cannot be had or loaded; the message says what was tried
    and what to do (a user error: the command-line tools print it without a traceback)."""


class _NetworkError(Exception):
    """The server could not be reached or broke off (the cause: what urllib raised)."""


def names() -> tuple[str, ...]:
    """Every name `load` and `download` accept: the torch.hub backbones, then the `_full`
    checkpoints."""
    return tuple(RELEASES)


def _release(name: str) -> Release:
    if not isinstance(name, str):
        raise HubError(f"{name!r} is not a model name: give one of names() (load takes paths)")
    if name in RELEASES:
        return RELEASES[name]
    close = closest_key(name.lower(), RELEASES)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise HubError(
        f"unknown DINO model {name!r}{hint}. Known names: {', '.join(RELEASES)} (the backbones,"
        f" and with {FULL_SUFFIX!r} the full checkpoints with heads); or give the path of a"
        " .pth file"
    )


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


def _expected_fields(release: Release) -> dict[str, Any]:
    """The backbone module fields a file of `release` must give (its sizes)."""
    kind = family(release.arch)
    if kind == "vit":
        spec = VIT_ARCHS[release.arch]
        return {
            "patch_size": release.patch_size,
            "embed_dim": spec["embed_dim"],
            "depth": spec["depth"],
        }
    if kind == "xcit":
        spec = XCIT_ARCHS[release.arch]
        return {k: spec[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    return dict(RESNET_ARCHS[release.arch])


def _architecture_problem(model: Any, release: Release) -> str | None:
    """What of `model` differs from the architecture `release` names, or None."""
    wanted = _MODULES[family(release.arch)]
    if type(model).__name__ != wanted:
        return f"a {type(model).__name__}, not a {wanted}"
    wrong = [
        f"{key} {getattr(model, key)!r} (expected {value!r})"
        for key, value in _expected_fields(release).items()
        if getattr(model, key) != value
    ]
    return f"a {wanted} with " + ", ".join(wrong) if wrong else None


def _load_file(path: str, which: str, kw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    try:
        return load_backbone(path, which=which, **kw)
    except (ValueError, OSError) as err:  # PthError / OfficialCheckpointError name the file
        raise HubError(str(err)) from None


def _local_file(path: str | os.PathLike[str]) -> str:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise HubError(
            f"{path} is a directory: give a .pth file (a dino_jax work directory loads with "
            "dino_jax.evaluate.weights.load_weights)"
        )
    if not os.path.isfile(path):
        raise HubError(f"{path}: no such file")
    return path


def _is_path(text: str) -> bool:
    """Whether `text` (not a known name) is meant as a file path rather than a model name."""
    seps = [s for s in (os.sep, os.altsep) if s]
    return any(s in text for s in seps) or text.endswith(".pth") or text.startswith(("~", "."))


def load(
    name_or_path: str | os.PathLike[str],
    *,
    which: str = "teacher",
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    **kw,
) -> tuple[Any, dict[str, Any]]:
    """(model, variables) ready for `model.apply(variables, images)`: the backbone of a
    released DINO file by name (downloaded and cached as `download` does; a known name wins
    over a file of that name) or of a `.pth` path, through
    `dino_jax.interop.official.load_backbone`.

    `which`: the teacher (the network the official evaluations use) or, in a `_full`
    checkpoint, the student. A named file must hold the architecture its name says. `kw`:
    backbone module fields (dtype, attention_impl, ...) and `num_heads` (a ViT's, which its
    tensors do not hold; the official size's for a named file).
    """
    if which not in WHICH:
        raise HubError(f"which={which!r}: use one of {WHICH}")
    name = name_or_path if isinstance(name_or_path, str) else None
    if name is None or (name not in RELEASES and (_is_path(name) or os.path.exists(name))):
        return _load_file(_local_file(name_or_path), which, kw)
    release = _release(name)
    if which == "student" and not release.full:
        raise HubError(
            f"which='student': {name!r} is the teacher's backbone alone; the student is in the "
            f"full checkpoint {name + FULL_SUFFIX!r}"
        )
    if family(release.arch) == "vit":
        kw.setdefault("num_heads", VIT_ARCHS[release.arch]["num_heads"])
    path, fresh = _download(name, cache_dir, base_url, progress, timeout)
    try:
        model, variables = _load_file(path, which, kw)
        problem = _architecture_problem(model, release)
        if problem:
            raise HubError(f"{path} holds {problem}: it is not the {release.title} {name!r} names")
    except HubError as err:
        if fresh:
            _remove(path, _record_path(path))
        raise HubError(_sentence(str(err)) + " " + _origin(name, path, fresh, base_url)) from None
    return model, variables


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def _origin(name: str, path: str, fresh: bool, base_url: str | None) -> str:
    """Where a refused named file came from, and what to do."""
    if fresh:
        source = url(name, base_url)
        mirror = (
            f" ({ENV_URL} or base_url points to a mirror)"
            if _base_url(base_url) != BASE_URL
            else ""
        )
        return (
            f"It was downloaded from {source} just now and removed from the cache: that server"
            f"{mirror} serves another file under this name"
        )
    return f"Delete it ({path}) and {_record_path(path)} to download it again"

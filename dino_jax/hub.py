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

This module holds `load` and the checks of what a named file holds; the download, the cache
and the checksums are in dino_jax.hub_download, the names and HubError in
dino_jax.hub_registry (all public names are importable from here).
"""

from __future__ import annotations

import os
from typing import Any

from dino_jax.hub_download import (
    ENV_CACHE,
    ENV_URL,
    TIMEOUT_S,
    _base_url,
    _download,
    _record_path,
    _remove,
    cache_path,
    download,
    url,
)
from dino_jax.hub_registry import BASE_URL, FULL_SUFFIX, RELEASES, HubError, Release, _release
from dino_jax.interop.official import load_backbone
from dino_jax.models.backbones import RESNET_ARCHS, VIT_ARCHS, XCIT_ARCHS, family

__all__ = ["ENV_CACHE", "ENV_URL", "HubError", "cache_path", "download", "load", "names", "url"]

WHICH = ("teacher", "student")
_MODULES = {"vit": "VisionTransformer", "xcit": "XCiT", "resnet": "ResNet"}


def names() -> tuple[str, ...]:
    """Every name `load` and `download` accept: the torch.hub backbones, then the `_full`
    checkpoints."""
    return tuple(RELEASES)


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

"""A folder of images: class sub-folders (label = sorted sub-folder index) or flat (label -1)."""

from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np

from dino_jax.data.decode import SkipLog, read_file
from dino_jax.data.sources.base import DataError, IndexedSource, process_slice

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Listing:
    """Every image file under a root, in a fixed order (class, then relative path)."""

    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]  # empty for a flat folder
    other_files: int  # files ignored because of their extension


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible_entries(path: str, skips: SkipLog) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as e:
        skips.add(path, f"unreadable directory: {e.strerror or type(e).__name__}")
        return []
    return sorted(entries, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop raises instead of answering False
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _why_not_a_file(path: str) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno == errno.ENOENT:
            return "broken symlink"
        return f"unreadable: {e.strerror or type(e).__name__}"
    return "not a regular file"


def _dir_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(root: str, skips: SkipLog, visited: set) -> tuple[list[str], int]:
    """Image files under root (following directory symlinks, each real directory once)."""
    images, other = [], 0
    for entry in _visible_entries(root, skips):
        if _is_dir(entry):
            identity = _dir_identity(entry.path)
            if identity in visited:
                skips.add(entry.path, "symlink loop: directory already listed")
                continue
            visited.add(identity)
            sub_images, sub_other = _walk_images(entry.path, skips, visited)
            images += sub_images
            other += sub_other
        else:
            other += _take_file(entry, images, skips)
    return images, other


def _take_file(entry: os.DirEntry, images: list[str], skips: SkipLog) -> int:
    """Append an image file's path to `images` (or count it skipped, saying why); 1 for a file
    whose name is not an image's, else 0."""
    if not _is_image_name(entry.name):
        return 1
    if _is_file(entry):
        images.append(entry.path)
    else:
        skips.add(entry.path, _why_not_a_file(entry.path))
    return 0


def list_folder(root: str, skips: SkipLog) -> Listing:
    """List `root`: class layout if it has sub-folders, else flat. Hidden entries are ignored."""
    entries = _visible_entries(root, skips)
    class_dirs = [e for e in entries if _is_dir(e)]
    if not class_dirs:
        images, other = _walk_files_flat(entries, skips)
        return Listing(tuple(images), np.full(len(images), -1, np.int32), (), other)
    paths, labels, other = [], [], 0
    visited = {_dir_identity(root)}
    for label, entry in enumerate(class_dirs):
        visited.add(_dir_identity(entry.path))
        images, sub_other = _walk_images(entry.path, skips, visited)
        paths += images
        labels += [label] * len(images)
        other += sub_other
    for entry in entries:
        if not _is_dir(entry) and _is_image_name(entry.name):
            # In a class layout a loose file has no label; leaving it out must still be seen.
            skips.add(entry.path, "outside the class folders")
    names = tuple(e.name for e in class_dirs)
    return Listing(tuple(paths), np.asarray(labels, np.int32), names, other)


def _walk_files_flat(entries: list[os.DirEntry], skips: SkipLog) -> tuple[list[str], int]:
    images: list[str] = []
    other = sum(_take_file(entry, images, skips) for entry in entries)
    return images, other


def folder_root(data_dir: str, split: str) -> str:
    """data_dir/split (split '' or '.' means data_dir itself); DataError if it is not there."""
    if not data_dir:
        raise DataError(
            "config.data.source='folder' needs config.data.data_dir: the folder that holds the "
            "images (one sub-folder per class, or the images themselves)"
        )
    base = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(base):
        raise DataError(
            f"config.data.data_dir={base} does not exist or is not a directory: point it at a "
            "folder of images (one sub-folder per class, or the images themselves)"
        )
    if split in ("", "."):
        return base
    root = os.path.join(base, split)
    if not os.path.isdir(root):
        found = sorted(e.name for e in os.scandir(base) if _is_dir(e))
        raise DataError(
            f"split {split!r} expects the folder {root}, which does not exist (sub-folders of "
            f"{base}: {found[:10]}); set config.data.split (or the eval split) to one of them, "
            "or to '' to read data_dir itself"
        )
    return root


def folder_source(
    data_dir: str, split: str, *, process_index: int, process_count: int, skips: SkipLog
) -> IndexedSource:
    """This process's stride of the images under data_dir/split."""
    root = folder_root(data_dir, split)
    listing = list_folder(root, skips)
    if not listing.paths:
        exts = " ".join(IMAGE_EXTENSIONS)
        raise DataError(
            f"no images ({exts}, any case) under {root}: {listing.other_files} other files "
            f"and {skips.count} unusable entries; put the images there, one sub-folder per "
            "class or all in that folder"
        )
    ids = process_slice(len(listing.paths), process_index, process_count)
    paths = [listing.paths[i] for i in ids]
    labels = listing.labels[ids]

    def read(i: int) -> tuple[bytes, int]:
        return read_file(paths[i]), int(labels[i])

    return IndexedSource(
        name=f"folder:{root}",
        length=len(paths),
        read=read,
        key=paths.__getitem__,
        global_size=len(listing.paths),
    )

"""A folder of images: class sub-folders (label = sorted sub-folder index) or flat (label -1).

Labels come from class names. Every split is labelled by its own sorted class folders, except
the k-NN test split, which is labelled by the names of the bank split's class folders, so that
a class has one label in both even when the test split lacks some classes; a test class that
the bank lacks is refused. File-system clutter (JUNK_NAMES, hidden entries) is never a class
or an image.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import logging
import os

import numpy as np

from dino_jax.data.decode import SkipLog, byte_limit, printable, read_file
from dino_jax.data.sources.base import DataError, IndexedSource, process_slice

_LOG = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Entries that operating systems, archivers and NAS boxes leave beside real data, compared
# case-insensitively. Any name starting with "." is hidden and ignored as well: macOS's
# .DS_Store, AppleDouble "._x.jpg" resource forks, .Spotlight-V100, .Trashes, .fseventsd,
# Jupyter's .ipynb_checkpoints, version-control folders, QNAP's .@__thumb.
JUNK_NAMES = frozenset(
    {
        "__macosx",  # resource forks added by macOS's zip (mirrors the tree: ._x.jpg files)
        "@eadir",  # Synology's thumbnail folders (SYNOPHOTO_THUMB_*.jpg: real JPEGs)
        "thumbs.db",  # Windows Explorer's thumbnail caches
        "ehthumbs.db",
        "ehthumbs_vista.db",
        "desktop.ini",  # Windows folder settings
        "$recycle.bin",  # Windows and Samba recycle bins, and NTFS system data
        "recycler",
        "system volume information",
        "@recycle",  # QNAP's recycle bin
        "#recycle",  # Synology's recycle bin
        "lost+found",  # fsck's folder at the root of ext2/3/4 file systems
        "icon\r",  # macOS's custom folder icon
    }
)


@dataclasses.dataclass(frozen=True)
class Listing:
    """Every image file under a root, in a fixed order (class, then relative path)."""

    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]  # empty for a flat folder
    other_files: int  # files ignored because of their extension
    junk: tuple[str, ...] = ()  # paths of clutter ignored (JUNK_NAMES, hidden entries)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_junk(name: str) -> bool:
    """Whether a directory entry is clutter, never data: hidden, or one of JUNK_NAMES."""
    return name.startswith(".") or name.casefold() in JUNK_NAMES


def _visible_entries(path: str, skips: SkipLog, junk: list[str] | None = None) -> list:
    """The entries of `path` sorted by name, clutter left out (and its paths put in `junk`)."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as e:
        skips.add(path, f"unreadable directory: {e.strerror or type(e).__name__}")
        return []
    if junk is not None:
        junk += sorted(e.path for e in entries if is_junk(e.name))
    return sorted((e for e in entries if not is_junk(e.name)), key=lambda e: e.name)


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


def _walk_images(root: str, skips: SkipLog, visited: set, junk: list[str]) -> tuple[list[str], int]:
    """Image files under root (following directory symlinks, each real directory once)."""
    images, other = [], 0
    for entry in _visible_entries(root, skips, junk):
        if _is_dir(entry):
            identity = _dir_identity(entry.path)
            if identity in visited:
                skips.add(entry.path, "symlink loop: directory already listed")
                continue
            visited.add(identity)
            sub_images, sub_other = _walk_images(entry.path, skips, visited, junk)
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
    """List `root`: class layout if it has sub-folders, else flat. Clutter is ignored."""
    junk: list[str] = []
    entries = _visible_entries(root, skips, junk)
    class_dirs = [e for e in entries if _is_dir(e)]
    if not class_dirs:
        images, other = _walk_files_flat(entries, skips)
        labels = np.full(len(images), -1, np.int32)
        return Listing(tuple(images), labels, (), other, tuple(junk))
    paths, labels, other = [], [], 0
    visited = {_dir_identity(root)}
    for label, entry in enumerate(class_dirs):
        visited.add(_dir_identity(entry.path))
        images, sub_other = _walk_images(entry.path, skips, visited, junk)
        paths += images
        labels += [label] * len(images)
        other += sub_other
    for entry in entries:
        if not _is_dir(entry) and _is_image_name(entry.name):
            # In a class layout a loose file has no label; leaving it out must still be seen.
            skips.add(entry.path, "outside the class folders")
    names = tuple(e.name for e in class_dirs)
    return Listing(tuple(paths), np.asarray(labels, np.int32), names, other, tuple(junk))


def _walk_files_flat(entries: list[os.DirEntry], skips: SkipLog) -> tuple[list[str], int]:
    images: list[str] = []
    other = sum(_take_file(entry, images, skips) for entry in entries)
    return images, other


def class_names(root: str) -> tuple[str, ...]:
    """The class folders of `root`, sorted, as list_folder takes them (empty: a flat folder)."""
    return tuple(e.name for e in _visible_entries(root, SkipLog()) if _is_dir(e))


def _names(names, limit: int = 10) -> str:
    shown = ", ".join(repr(printable(n)) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def bank_labels(
    test_names: tuple[str, ...], bank_names: tuple[str, ...], test: str, bank: str
) -> dict[str, int]:
    """{test class name: its label in the bank}, the bank's labels being its sorted class
    folders; DataError naming the differences if a test class has no folder in the bank, or
    if either split has no class folders. `test`, `bank`: how to name the splits."""
    for names, what in ((bank_names, bank), (test_names, test)):
        if not names:
            raise DataError(
                f"k-NN evaluation needs labelled images, but the {what} has no class "
                "sub-folders (a flat folder has no labels): give it one sub-folder per class, "
                "or choose other splits (config.data.eval_train_split, eval_test_split)"
            )
    index = {name: label for label, name in enumerate(bank_names)}
    missing = [name for name in test_names if name not in index]
    if missing:
        hints = []
        for name in missing[:5]:
            close = difflib.get_close_matches(name, bank_names, n=1)
            if close:
                hints.append(f"{printable(name)!r} ~ {printable(close[0])!r}")
        hint = f"; near misses: {', '.join(hints)}" if hints else ""
        raise DataError(
            f"the k-NN test classes must be bank classes (labels come from class names), but "
            f"the {test} has class folders that the {bank} lacks: {_names(missing)}{hint}. "
            "Add those classes to the bank, remove them from the test split, or choose other "
            "splits (config.data.eval_train_split, eval_test_split); bank classes missing from "
            "the test split are fine"
        )
    return {name: index[name] for name in test_names}


def split_name(split: str, root: str) -> str:
    return f"split {split!r} ({printable(root)})"


def check_eval_classes(data_dir: str, bank_split: str, test_split: str) -> None:
    """DataError unless every class folder of the test split has one in the bank split (and
    both have class folders); lists only the top-level folders, nothing is decoded."""
    bank_root, test_root = folder_root(data_dir, bank_split), folder_root(data_dir, test_split)
    bank_labels(
        class_names(test_root),
        class_names(bank_root),
        split_name(test_split, test_root),
        split_name(bank_split, bank_root),
    )


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
            f"config.data.data_dir={printable(base)} does not exist or is not a directory: "
            "point it at a folder of images (one sub-folder per class, or the images themselves)"
        )
    if split in ("", "."):
        return base
    root = os.path.join(base, split)
    if not os.path.isdir(root):
        found = [printable(n) for n in class_names(base)]
        raise DataError(
            f"split {printable(split)!r} expects the folder {printable(root)}, which does not "
            f"exist (sub-folders of {printable(base)}: {found[:10]}); set config.data.split (or "
            "the eval split) to one of them, or to '' to read data_dir itself"
        )
    return root


def _labels_by_bank(listing: Listing, split: str, root: str, data_dir: str, bank: str):
    """The labels of `listing` (the test split) in the bank split's class order."""
    bank_root = folder_root(data_dir, bank)
    bank_names = class_names(bank_root)
    mapping = bank_labels(
        listing.class_names, bank_names, split_name(split, root), split_name(bank, bank_root)
    )
    unseen = [name for name in bank_names if name not in mapping]
    if unseen:
        _LOG.info(
            "%s: labelled by the classes of %s; bank classes without a test folder: %s",
            split_name(split, root),
            split_name(bank, bank_root),
            _names(unseen),
        )
    relabel = np.array([mapping[name] for name in listing.class_names], np.int32)
    return relabel[listing.labels]


def _report(listing: Listing, root: str) -> None:
    if listing.junk:
        _LOG.info(
            "%s: ignored %d entries of clutter (hidden files, __MACOSX, @eaDir, Thumbs.db ...),"
            " e.g. %s",
            printable(root),
            len(listing.junk),
            ", ".join(printable(p) for p in listing.junk[:3]),
        )
    counts = np.bincount(listing.labels[listing.labels >= 0], minlength=len(listing.class_names))
    empty = [name for name, n in zip(listing.class_names, counts, strict=True) if n == 0]
    if empty:
        _LOG.warning(
            "%s: class folders without any image (their labels have no examples): %s",
            printable(root),
            _names(empty),
        )


def folder_source(
    data_dir: str,
    split: str,
    *,
    process_index: int,
    process_count: int,
    skips: SkipLog,
    canvas_size: int,
    bank_split: str | None = None,
) -> IndexedSource:
    """This process's stride of the images under data_dir/split. With `bank_split` (for the
    k-NN test split), labels are the bank's class indices (see bank_labels)."""
    root = folder_root(data_dir, split)
    listing = list_folder(root, skips)
    if not listing.paths:
        exts = " ".join(IMAGE_EXTENSIONS)
        raise DataError(
            f"no images ({exts}, any case) under {printable(root)}: {listing.other_files} other"
            f" files and {skips.count} unusable entries; put the images there, one sub-folder "
            "per class or all in that folder"
        )
    _report(listing, root)
    all_labels = listing.labels
    if bank_split is not None:
        all_labels = _labels_by_bank(listing, split, root, data_dir, bank_split)
    ids = process_slice(len(listing.paths), process_index, process_count)
    paths = [listing.paths[i] for i in ids]
    labels = all_labels[ids]
    max_bytes = byte_limit(canvas_size)

    def read(i: int) -> tuple[bytes, int]:
        return read_file(paths[i], max_bytes), int(labels[i])

    return IndexedSource(
        name=f"folder:{printable(root)}",
        length=len(paths),
        read=read,
        key=paths.__getitem__,
        global_size=len(listing.paths),
    )

"""The bundled demo set (a class-balanced Fashion-MNIST subset) or the full set from IDX files."""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zlib

import numpy as np
from PIL import Image

from dino_jax.data.decode import fit_size
from dino_jax.data.sources.base import ArraySource, DataError, process_slice

DEMO_FILE = pathlib.Path(__file__).resolve().parent.parent / "demo" / "fashion_mnist_demo.npz"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Fashion-MNIST keeps MNIST's file names: split -> (images, labels) IDX files.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# The largest IDX payload read (the full Fashion-MNIST training images are 47 MB): a header or a
# gzip stream claiming more is refused before it is read.
MAX_IDX_BYTES = 1 << 31


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped): 2 zero bytes, a type code, the rank, big-endian dims.

    The header is read first; then exactly the payload it announces (and one byte more, to
    find padding), so neither a large file nor a gzip bomb is read past what the header says.
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DataError(f"{path} is not an IDX file (bad magic number)")
            rank = magic[3]
            dims = f.read(4 * rank)
            if len(dims) < 4 * rank:
                raise DataError(f"{path} is truncated: its header stops inside the dimensions")
            shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            size = dtype.itemsize * math.prod(shape)
            if size > MAX_IDX_BYTES:
                raise DataError(
                    f"{path} announces {shape} values ({size:,} bytes), more than the demo"
                    f" source reads ({MAX_IDX_BYTES:,}): it is not a Fashion-MNIST file"
                )
            payload = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or a broken gzip stream
        raise DataError(f"{path} cannot be read: {err}") from None
    expected = 4 + 4 * rank + size
    if len(payload) != size:
        found = "longer than" if len(payload) > size else "shorter than"
        raise DataError(
            f"{path} is {found} its header says ({expected} bytes"
            f"{' uncompressed' if opener is gzip.open else ''}): not a complete IDX file"
        )
    return np.frombuffer(payload, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"config.data.data_dir={directory} has no {stem} or {stem}.gz: point it at the directory "
        "of Fashion-MNIST IDX files, or leave it empty to use the bundled demo subset"
    )


def load_split(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int32) from the bundled file or an IDX directory."""
    if split not in IDX_FILES:
        raise DataError(f"the demo source has splits {sorted(IDX_FILES)}, not {split!r}")
    if data_dir:
        directory = os.path.abspath(os.path.expanduser(data_dir))
        if not os.path.isdir(directory):
            raise DataError(f"config.data.data_dir={directory} does not exist")
        images_file, labels_file = (_find_idx(directory, stem) for stem in IDX_FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
    else:
        with np.load(DEMO_FILE) as bundle:
            images, labels = bundle[f"{split}_images"], bundle[f"{split}_labels"]
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"demo {split}: images {images.shape} and labels {labels.shape} disagree")
    return images.astype(np.uint8), labels.astype(np.int32)


def stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} examples, fewer than {per_class}")
        picks.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def fit_images(images: np.ndarray, canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) or (N, h, w, C) images of one size -> ((N, h', w', C), sizes) within the canvas."""
    if images.ndim == 3:
        images = images[..., None]
    n, height, width, _ = images.shape
    new_h, new_w = fit_size(height, width, canvas_size)
    if (new_h, new_w) != (height, width):
        resize = lambda im: np.asarray(
            Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).resize(
                (new_w, new_h), Image.Resampling.BICUBIC
            )
        ).reshape(new_h, new_w, -1)
        images = np.stack([resize(im) for im in images])
    sizes = np.tile(np.array([[new_h, new_w]], np.int32), (n, 1))
    return images, sizes


def demo_source(
    split: str, data_dir: str, canvas_size: int, *, process_index: int, process_count: int
) -> ArraySource:
    """This process's stride of the demo split, greyscale kept as one channel until batching."""
    images, labels = load_split(split, data_dir)
    ids = process_slice(len(labels), process_index, process_count)
    local, sizes = fit_images(images[ids], canvas_size)
    origin = data_dir or DEMO_FILE.name
    return ArraySource(
        name=f"demo:{origin}:{split}",
        images=local,
        sizes=sizes,
        labels=labels[ids],
        global_size=len(labels),
    )

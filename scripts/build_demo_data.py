"""Build dino_jax/data/demo/fashion_mnist_demo.npz: a class-balanced Fashion-MNIST subset.

Usage: python scripts/build_demo_data.py [IDX_DIR (default: Debian's location)] [--out PATH]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

# Runs from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from dino_jax.data.sources.demo import (
    CLASS_NAMES,
    DEMO_FILE,
    load_split,
    stratified_subset,
)

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
PER_CLASS = {"train": 1000, "test": 200}  # 10,000 train and 2,000 test images
SEED = 0


def build(idx_dir: str, out: pathlib.Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, per_class in PER_CLASS.items():
        images, labels = load_split(split, idx_dir)
        keep = stratified_subset(labels, per_class, SEED)
        arrays[f"{split}_images"] = images[keep]
        arrays[f"{split}_labels"] = labels[keep].astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("idx_dir", nargs="?", default=DEFAULT_IDX_DIR)
    parser.add_argument("--out", type=pathlib.Path, default=DEMO_FILE)
    args = parser.parse_args(argv)
    arrays = build(args.idx_dir, args.out)
    sizes = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {sizes}")


if __name__ == "__main__":
    main()

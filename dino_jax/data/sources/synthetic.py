"""Random canvases with random valid sizes and labels, for benchmarks: no files, no TensorFlow."""

from __future__ import annotations

import numpy as np

from dino_jax.data.sources.base import ArraySource, process_slice

# Distinct canvases kept in memory; examples cycle through them (content is irrelevant to speed).
POOL_SIZE = 64


def synthetic_source(
    num_examples: int,
    num_classes: int,
    canvas_size: int,
    seed: int,
    *,
    process_index: int,
    process_count: int,
) -> ArraySource:
    """`num_examples` over all processes; sides uniform in [canvas_size / 2, canvas_size]."""
    ids = process_slice(num_examples, process_index, process_count)
    labels = np.random.default_rng([seed, 0]).integers(0, num_classes, num_examples)[ids]
    rng = np.random.default_rng([seed, 1, process_index])
    pool = min(POOL_SIZE, max(1, len(ids)))
    sizes = rng.integers(max(1, canvas_size // 2), canvas_size + 1, (pool, 2)).astype(np.int32)
    images = np.zeros((pool, canvas_size, canvas_size, 3), np.uint8)
    for image, (height, width) in zip(images, sizes, strict=True):
        image[:height, :width] = rng.integers(0, 256, (height, width, 3), np.uint8)
    return ArraySource(
        name=f"synthetic:{num_examples}x{canvas_size}",
        images=images,
        sizes=sizes,
        labels=labels.astype(np.int32),
        global_size=num_examples,
    )

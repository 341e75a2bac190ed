"""iBOT block masks on the host: DINOv2's MaskingGenerator and the per-batch mask sampling of its
collate function, replayable from (seed, step) so a resumed run sees the same masks."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

import numpy as np


def masks_rng(seed: int, step: int, chunk: int = 0) -> random.Random:
    """The mask stream of one (seed, step, chunk of the batch): a fresh `random.Random`, so
    masks need no RNG state in checkpoints and do not depend on which process or device
    draws them; all inputs must be >= 0."""
    state = np.random.SeedSequence([seed, step, chunk]).generate_state(4, np.uint32)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


@dataclasses.dataclass(frozen=True)
class MaskingGenerator:
    """Block-wise masks on a (height, width) patch grid, as dinov2/data/masking.py's
    MaskingGenerator (BEiT's scheme): rectangles of `min_num_patches`..`max_num_patches` cells
    with a log-uniform aspect ratio in [min_aspect, max_aspect] (default 1 / min_aspect) are
    added until the target count is reached or a block attempt (10 tries) adds nothing.

    Randomness comes from the `random.Random` passed to each call, drawn in the official order
    (uniform area, uniform log aspect, randint top, randint left): with the generator seeded
    as the official global `random` was, the masks are identical.
    """

    height: int
    width: int
    min_num_patches: float = 4
    max_num_patches: float | None = None  # None: no per-block cap beyond the remaining count
    min_aspect: float = 0.3
    max_aspect: float | None = None
    attempts: int = 10

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def _log_aspect_range(self) -> tuple[float, float]:
        max_aspect = self.max_aspect or 1 / self.min_aspect
        return math.log(self.min_aspect), math.log(max_aspect)

    def _block_shape(self, rng: random.Random, max_new: float) -> tuple[int, int]:
        """(h, w) of a block: area U(min_num_patches, max_new), log aspect h/w uniform."""
        lo, hi = self._log_aspect_range()
        area = rng.uniform(self.min_num_patches, max_new)
        aspect = math.exp(rng.uniform(lo, hi))
        # Python's round (half to even), as the official code.
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def _add_block(self, mask: np.ndarray, rng: random.Random, max_new: float) -> np.ndarray | None:
        """Tries up to `attempts` rectangles; the first that adds 1..max_new new cells is set.
        Returns the (height, width) cells it added, or None if no attempt added any."""
        for _ in range(self.attempts):
            h, w = self._block_shape(rng, max_new)
            if not (w < self.width and h < self.height):
                continue  # too big for the grid: no position is drawn for it
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            # Only blocks within the remaining budget count, so a mask never exceeds its target.
            if 0 < new <= max_new:
                added = np.zeros_like(mask)
                added[top : top + h, left : left + w] = ~region
                region[...] = True
                return added
        return None

    def sample_with_blocks(
        self, rng: random.Random, num_masking_patches: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(mask (height, width) bool, the cells each accepted block added): for statistics."""
        mask = np.zeros((self.height, self.width), bool)
        blocks = []
        count = 0
        while count < num_masking_patches:
            max_new = num_masking_patches - count
            if self.max_num_patches is not None:
                max_new = min(max_new, self.max_num_patches)
            added = self._add_block(mask, rng, max_new)
            if added is None:
                break  # no block fits the budget any more: the mask stops short of its target
            blocks.append(added)
            count += int(added.sum())
        return mask, blocks

    def __call__(self, rng: random.Random, num_masking_patches: int = 0) -> np.ndarray:
        """A (height, width) bool mask of at most `num_masking_patches` cells."""
        return self.sample_with_blocks(rng, num_masking_patches)[0]


def dinov2_masking_generator(img_size: int, patch_size: int) -> MaskingGenerator:
    """The generator dinov2/train/train.py builds for global crops of `img_size`: per-block cap
    `0.5 * img_size // patch_size * img_size // patch_size` evaluated left to right, as written
    there (a float; half the grid for the usual sizes)."""
    grid = img_size // patch_size
    return MaskingGenerator(
        grid, grid, max_num_patches=0.5 * img_size // patch_size * img_size // patch_size
    )


def _fma_f32(a: np.float32, b: float, c: np.float32) -> np.float32:
    # a * b + c rounded once to float32: the product of two float32 values is exact in float64.
    return np.float32(np.float64(a) * np.float64(np.float32(b)) + np.float64(c))


def ratio_bins(lo: float, hi: float, n_bins: int) -> np.ndarray:
    """`torch.linspace(lo, hi, n_bins + 1)` in float32 as PyTorch's CPU kernel computes it
    (start + step*i below the midpoint, end - step*(n-1-i) above, each a fused multiply-add)."""
    steps = n_bins + 1
    start, end = np.float32(lo), np.float32(hi)
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / np.float32(steps - 1))
    half = steps // 2
    out = [
        _fma_f32(step, i, start) if i < half else _fma_f32(-step, steps - 1 - i, end)
        for i in range(steps)
    ]
    return np.asarray(out, np.float32)


def mask_capacity(
    n_rows: int, n_tokens: int, mask_ratio_tuple=(0.1, 0.5), mask_probability: float = 0.5
) -> int:
    """The official `upperbound`: sum over masked rows of int(n_tokens * bin upper edge). It
    does not depend on the random draws, so it sizes a static buffer of masked tokens."""
    n_masked_rows = int(n_rows * mask_probability)
    probs = ratio_bins(*mask_ratio_tuple, n_masked_rows)
    return sum(int(np.float32(n_tokens) * probs[i + 1]) for i in range(n_masked_rows))


def flat_masks_weight(collated_masks: np.ndarray) -> np.ndarray:
    """One float32 weight per masked token, in flat (row-major) order: 1 / (masked tokens of
    its row), the collate's `masks_weight`."""
    counts = np.maximum(collated_masks.sum(-1), 1).astype(np.float32)
    dense = np.broadcast_to((np.float32(1) / counts)[:, None], collated_masks.shape)
    return dense[collated_masks]


@dataclasses.dataclass(frozen=True)
class CollatedMasks:
    """The masks of one batch of global crops, in the official collate's layout.

    collated_masks: (n_global_crops * n_images, n_tokens) bool, crop-major rows (row
    c * n_images + i is crop c of image i), tokens row-major over the patch grid.
    """

    collated_masks: np.ndarray
    n_global_crops: int
    upperbound: int  # = mask_capacity(...): static size of a masked-token buffer

    @property
    def mask_indices_list(self) -> np.ndarray:  # (n_masked,) int32 indices into rows * tokens
        return np.flatnonzero(self.collated_masks).astype(np.int32)

    @property
    def masks_weight(self) -> np.ndarray:  # (n_masked,) float32, flat order
        return flat_masks_weight(self.collated_masks)

    @property
    def n_masked_patches(self) -> int:
        return int(self.collated_masks.sum())

    @property
    def masks(self) -> np.ndarray:
        """(n_images, n_global_crops, n_tokens) bool: images first, like the crops of a batch,
        so sharding the first axis keeps each image's masks with its crops."""
        rows, n_tokens = self.collated_masks.shape
        per_crop = self.collated_masks.reshape(
            self.n_global_crops, rows // self.n_global_crops, n_tokens
        )
        return np.ascontiguousarray(per_crop.swapaxes(0, 1))

    def padded(self, capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, weights), each (capacity,) (default `upperbound`): the masked tokens'
        flat indices and weights padded with index 0 / weight 0, a static-shape gather list."""
        capacity = self.upperbound if capacity is None else capacity
        idx, w = self.mask_indices_list, self.masks_weight
        if len(idx) > capacity:
            raise ValueError(f"{len(idx)} masked tokens exceed the capacity {capacity}")
        pad = capacity - len(idx)
        return np.pad(idx, (0, pad)), np.pad(w, (0, pad))


def collate_masks(
    rng: random.Random,
    n_images: int,
    generator: MaskingGenerator,
    *,
    n_global_crops: int = 2,
    n_tokens: int | None = None,
    mask_ratio_tuple=(0.1, 0.5),
    mask_probability: float = 0.5,
) -> CollatedMasks:
    """Masks for the global crops of `n_images` images, as dinov2/data/collate.py's
    collate_data_and_cast draws them.

    Of the rows = n_global_crops * n_images crops, int(rows * mask_probability) get a mask,
    the i-th with target int(n_tokens * U(p_i, p_{i+1})) over the float32 linspace p of
    mask_ratio_tuple (so mask ratios spread evenly over the range), the rest none; the rows
    are then shuffled. The official code draws per GPU batch; here it is whatever batch the
    caller passes (a process's local batch), which spreads the same ratios over more rows.
    """
    n_tokens = generator.num_patches if n_tokens is None else n_tokens
    rows = n_global_crops * n_images
    n_masked_rows = int(rows * mask_probability)
    probs = ratio_bins(*mask_ratio_tuple, n_masked_rows)
    n = np.float32(n_tokens)
    masks = []
    for i in range(n_masked_rows):
        # random.uniform's a + (b - a) * U, in float32 as on the official float32 tensors.
        ratio = probs[i] + (probs[i + 1] - probs[i]) * np.float32(rng.random())
        masks.append(generator(rng, int(n * ratio)))
    masks += [generator(rng, 0) for _ in range(n_masked_rows, rows)]
    rng.shuffle(masks)
    collated = np.stack(masks).reshape(rows, -1)
    if collated.shape[1] != n_tokens:
        raise ValueError(f"the generator's grid has {collated.shape[1]} cells, not {n_tokens}")
    upperbound = mask_capacity(rows, n_tokens, mask_ratio_tuple, mask_probability)
    return CollatedMasks(collated, n_global_crops, upperbound)


@dataclasses.dataclass(frozen=True)
class StepMasks:
    """The iBOT masks of every step of a run, drawn on the host.

    The global batch of `batch_size` images is split into `chunks` equal chunks, each with
    its own collate_masks draw from masks_rng(seed, step, chunk) (the official code draws
    per GPU batch: chunks = the official GPU count reproduces its statistics). The masks are
    a function of (seed, step, chunk) alone, whatever the devices and processes.
    """

    generator: MaskingGenerator
    batch_size: int
    seed: int
    n_global_crops: int = 2
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    chunks: int = 1

    @property
    def images_per_chunk(self) -> int:
        return self.batch_size // self.chunks

    @property
    def capacity_per_image(self) -> int:
        """Gathered tokens per image of a chunk: the chunk's official `upperbound`, rounded up
        to a multiple of its images so the buffer has one row per image (and shards with
        the batch)."""
        n = self.images_per_chunk
        rows = self.n_global_crops * n
        bound = mask_capacity(
            rows, self.generator.num_patches, self.mask_ratio_tuple, self.mask_probability
        )
        return max(-(-bound // n), 1)

    def chunk(self, step: int, index: int) -> dict[str, np.ndarray]:
        """The masks of chunk `index` at `step`: "masks" (images, n_global, N) bool,
        "mask_index" (images, capacity_per_image) int32 flat indices of the masked tokens into
        the chunk's (images, n_global, N) tokens, padded with 0, and "mask_weight" the same
        shape float32: the collate's masks_weight on masked tokens, 0 on padding."""
        collated = collate_masks(
            masks_rng(self.seed, step, index),
            self.images_per_chunk,
            self.generator,
            n_global_crops=self.n_global_crops,
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
        )
        masks = collated.masks  # (images, n_global, N), image-major
        counts = np.maximum(masks.sum(-1, keepdims=True), 1).astype(np.float32)
        weights = np.broadcast_to(np.float32(1) / counts, masks.shape)
        index_list = np.flatnonzero(masks).astype(np.int32)
        capacity = self.capacity_per_image * self.images_per_chunk
        pad = capacity - len(index_list)
        shape = (self.images_per_chunk, self.capacity_per_image)
        return {
            "masks": masks,
            "mask_index": np.pad(index_list, (0, pad)).reshape(shape),
            "mask_weight": np.pad(weights.reshape(-1)[index_list], (0, pad)).reshape(shape),
        }

    def local(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """The masks of this process's images (its equal, consecutive share of the batch;
        whole chunks, as validation requires chunks % processes == 0)."""
        per_process = self.chunks // process_count
        first = process_index * per_process
        parts = [self.chunk(step, first + i) for i in range(per_process)]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def with_step_masks(
    batches: Iterator[dict], masks: StepMasks, start_step: int, process_index=0, process_count=1
) -> Iterator[dict]:
    """`batches` (this process's, from `start_step` on) with each step's masks added;
    closing this stream closes `batches`."""
    try:
        for step, batch in enumerate(batches, start_step):
            yield {**batch, **masks.local(step, process_index, process_count)}
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()

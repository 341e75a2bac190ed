"""Whole-crop statistics, to compare two augmentation pipelines' distributions of crops.

The per-op tests check each op on given parameters; these check what the network is shown:
the distribution, over random draws, of a crop's mean level, contrast and fine detail. Used by
the crop-level parity test (tests/test_crop_statistics.py, against crops of the official
DataAugmentationDINO) and by scripts/crop_gap.py.
"""

from __future__ import annotations

import math

import numpy as np

STATISTICS = ("mean", "contrast", "hf_energy", "chroma")


def crop_statistics(crops: np.ndarray) -> dict[str, np.ndarray]:
    """(n, H, W, C) crops on the 0..255 scale -> one value per crop of each of STATISTICS.

    mean: the mean level; contrast: the standard deviation over pixels and channels;
    hf_energy: the mean squared difference of horizontal and vertical neighbours (what blur
    removes and resampling shapes); chroma: the mean over pixels of max - min over channels
    (0 for grey pixels: what jitter's saturation and hue and the grayscale op move).
    """
    x = np.asarray(crops, np.float64)
    if x.ndim != 4:
        raise ValueError(f"crops must be (n, H, W, C), got shape {x.shape}")
    energy = (np.diff(x, axis=1) ** 2).mean((1, 2, 3)) + (np.diff(x, axis=2) ** 2).mean((1, 2, 3))
    return {
        "mean": x.mean((1, 2, 3)),
        "contrast": x.reshape(len(x), -1).std(1),
        "hf_energy": energy,
        "chroma": (x.max(-1) - x.min(-1)).mean((1, 2)),
    }


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_bound(n: int, m: int, alpha: float = 1e-3) -> float:
    """The KS distance that two samples (sizes n, m) of one distribution exceed with
    probability about alpha (Kolmogorov's asymptotic bound)."""
    return math.sqrt(-0.5 * math.log(alpha / 2.0)) * math.sqrt((n + m) / (n * m))

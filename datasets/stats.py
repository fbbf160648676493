"""Per-channel normalisation statistics of a split's pixels in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch

# Enough images per chunk to amortise the Python loop, small enough that a float64 copy of a chunk
# of 224-px images stays in the tens of MB.
_CHUNK_PIXELS = 1 << 22


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``images`` (N, C, H, W) scaled to [0, 1].

    uint8 images are divided by 255; floating images are taken as already in [0, 1]. Sums run in
    float64, a chunk of images at a time, so the result does not depend on the chunk size beyond
    float64 rounding.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}"
        )
    n, c, h, w = images.shape
    chunk = max(1, _CHUNK_PIXELS // (c * h * w))
    if images.dtype == torch.uint8:
        return _uint8_stats(images, chunk)
    return _float_stats(images, chunk)


def _uint8_stats(images: torch.Tensor, chunk: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # A per-channel histogram of the 256 levels is exact and lets the mean and the centred second
    # moment be formed in one pass without cancellation.
    c = images.shape[1]
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].numpy()
        for ch in range(c):
            counts[ch] += np.bincount(block[:, ch].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for ch in range(c):
        total = counts[ch].sum()
        mean = float((counts[ch] * levels).sum() / total)
        var = float((counts[ch] * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def _float_stats(images: torch.Tensor, chunk: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Two passes (mean, then centred squares) avoid the cancellation of E[x^2] - E[x]^2.
    c = images.shape[1]
    count = images[:, 0].numel()
    sums = np.zeros(c, dtype=np.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64)
        sums += block.sum(dim=(0, 2, 3)).numpy()
    means = sums / count
    centred = np.zeros(c, dtype=np.float64)
    mean_t = torch.from_numpy(means).view(1, c, 1, 1)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) - mean_t
        centred += (block * block).sum(dim=(0, 2, 3)).numpy()
    stds = np.sqrt(centred / count)
    return tuple(float(m) for m in means), tuple(float(s) for s in stds)

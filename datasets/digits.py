"""scikit-learn's 8x8 handwritten digits, upsampled to 16x16 (docs/recipes.md §2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from datasets.base import DatasetBundle, DatasetError, ImageSplit

SIZE = 16
SEED = 0
TEST_FRACTION = 0.2


def load_digits(root: str | None = None, download: bool = False) -> DatasetBundle:
    """1,437 train / 360 test float32 images (N, 1, 16, 16) in [0, 1]; pretrain is train.

    The data ship inside scikit-learn, so ``root`` and ``download`` are ignored. The split is
    stratified 80/20 with seed 0.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    raw = sk_load_digits()
    labels = np.asarray(raw.target, dtype=np.int64)
    # Doubling with align_corners=False weights neighbours by 1/4 and 3/4, so every output is a
    # multiple of 1/256 and float32 holds it exactly: no precision is lost by working in float32.
    pixels = torch.from_numpy(np.asarray(raw.images, dtype=np.float32) / 16.0).unsqueeze(1)
    up = F.interpolate(
        pixels, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False
    )
    images = up.clamp_(0.0, 1.0).contiguous()

    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    train = ImageSplit(
        labels=torch.from_numpy(labels[idx_train]), images=images[torch.from_numpy(idx_train)]
    )
    test = ImageSplit(
        labels=torch.from_numpy(labels[idx_test]), images=images[torch.from_numpy(idx_test)]
    )
    return DatasetBundle.from_splits("digits", train, test, [str(d) for d in range(10)])


def check_digits(root: str | None = None, download: bool = False) -> None:
    """Digits ship inside scikit-learn: the check is that scikit-learn can be imported."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as exc:
        raise DatasetError(f"digits needs scikit-learn, which cannot be imported ({exc})") from exc

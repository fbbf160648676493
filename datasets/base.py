"""Containers every dataset loader returns.

A split holds its pixels either in memory (``images``) or as a list of image files read lazily
(``files``); the training engine picks the in-memory path (whole split on the device, batched
augmentation) or the DataLoader path (per-sample decode and crop in workers) from that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from datasets.stats import channel_stats


class DatasetError(ValueError):
    """A dataset name, path or on-disk layout that cannot be used; the message says what is valid."""


@dataclass
class ImageSplit:
    """One split of a dataset.

    ``images``: uint8 (N, C, H, W), or float32 in [0, 1] for data that is not 8-bit (digits).
    ``files``: image paths decoded lazily, for splits too large to hold in memory.
    ``labels``: int64 (N,); -1 marks an unlabelled image (STL-10's ``unlabeled`` split).
    """

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[str] | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.files is None):
            raise ValueError("an ImageSplit holds exactly one of `images` or `files`")
        n = len(self.images) if self.images is not None else len(self.files)  # type: ignore[arg-type]
        if len(self.labels) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None


@dataclass
class DatasetBundle:
    """Everything the harness needs from one dataset.

    ``pretrain`` feeds self-supervised training (labels unused); ``train`` is the k-NN bank and the
    linear-probe fit set; ``test`` is scored. ``image_size`` is the pre-training and evaluation
    resolution. For file-backed splits the deterministic eval transform is
    Resize(``eval_resize``) + CenterCrop(``image_size``); in-memory splits are already at
    ``image_size``. ``mean``/``std`` are per-channel statistics of the train split in [0, 1]
    (ImageNet-1k's for ImageNet-100).
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrain: ImageSplit
    train: ImageSplit
    test: ImageSplit
    class_names: list[str] = field(default_factory=list)
    eval_resize: int | None = None

    @classmethod
    def from_splits(
        cls, name: str, train: ImageSplit, test: ImageSplit, class_names: Sequence[str],
        pretrain: ImageSplit | None = None,
    ) -> DatasetBundle:
        """A bundle of in-memory splits of square images, normalised by the train split's own
        per-channel statistics. ``num_classes`` is ``len(class_names)``; channels and
        ``image_size`` are read from the train images; ``pretrain`` defaults to ``train``."""
        if train.images is None:
            raise ValueError(f"{name}: DatasetBundle.from_splits needs an in-memory train split")
        _, channels, height, width = train.images.shape
        if height != width:
            raise ValueError(f"{name}: images are {height}x{width}; expected square images")
        mean, std = channel_stats(train.images)
        return cls(
            name=name,
            num_classes=len(class_names),
            channels=channels,
            image_size=height,
            mean=mean,
            std=std,
            pretrain=train if pretrain is None else pretrain,
            train=train,
            test=test,
            class_names=list(class_names),
        )

"""Batches of views for training, and eval-transformed images for feature extraction.

Two paths, one contract: ``TrainBatches.epoch(epoch)`` yields ``(indices, views)`` with ``views`` a
list of V normalised float tensors on the training device.

- In-memory splits (digits, CIFAR, STL-10, Tiny-ImageNet): the whole split lives on the device as
  one tensor; each batch is indexed and augmented there in a handful of batched ops (airbench's
  shape). No per-sample Python, no workers.
- File-backed splits (ImageNet-100, imagefolder): DataLoader workers decode each image and cut its
  random resized crops (the only geometric op that needs the full-resolution image); flips and the
  photometric ops then run batched on the device.

Randomness is derived from (seed, epoch): the data order from a CPU generator, augmentation from a
generator on the device, worker crops from (seed, epoch, index). A run resumed at an epoch boundary
therefore replays exactly what an uninterrupted run would have done, from an epoch boundary or
from any step inside an epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from datasets import DatasetBundle, ImageSplit
from datasets.imagefolder import decode_image
from datasets.views import MultiViewAugment, ViewConfig, eval_view, sample_crop_boxes
from engine.distributed import shard_slice


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, purpose, epoch, ...), stable across processes."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class _CropDataset(Dataset):
    """Decode one file and cut one random resized crop per view (uint8, view size)."""

    def __init__(self, files: Sequence[str], channels: int, views: Sequence[ViewConfig], seed: int):
        self.files = files
        self.channels = channels
        self.views = views
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = decode_image(self.files[index], channels=self.channels)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "crop", self.epoch, index))
        crops = []
        for view in self.views:
            top, left, h, w = sample_crop_boxes(
                image.shape[-2], image.shape[-1], 1, view.crop_scale, view.crop_ratio, generator
            )[0].tolist()
            crops.append(
                TF.resized_crop(image, top, left, h, w, [view.size, view.size], antialias=True)
            )
        return crops


class TrainBatches:
    """Shuffled, drop-last global batches of the pre-training split, as lists of augmented views.

    With ``world_size`` W > 1 processes, ``epoch`` yields this ``rank``'s contiguous 1/W slice of
    every global batch (``engine.distributed`` module docstring). In-memory splits are augmented
    as the whole global batch on every process, from the same (seed, epoch) generator as one
    process, so the union of the slices is exactly what one process sees. File-backed splits
    decode only this rank's slice: the crops are per image (seed, epoch, index), identical to
    W = 1, and the device's photometric ops draw from a per-rank generator (seed, epoch, rank, W).
    """

    def __init__(
        self,
        bundle: DatasetBundle,
        views: Sequence[ViewConfig],
        batch_size: int,
        device: torch.device,
        seed: int,
        num_workers: int = 4,
        max_steps_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        split = bundle.pretrain
        self.split = split
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.shard = shard_slice(batch_size, rank, world_size)
        self.steps_per_epoch = len(split) // batch_size
        if max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        if split.in_memory:
            self.images = split.images.to(device)
            self.augment = MultiViewAugment(views, bundle.mean, bundle.std)
        else:
            self.crops = _CropDataset(split.files, bundle.channels, views, seed)
            # The crop already happened in the worker; on the device only flips and photometric
            # ops remain, so the device stage gets a full-image crop.
            identity_crop = [
                dataclasses.replace(v, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)) for v in views
            ]
            self.augment = MultiViewAugment(identity_crop, bundle.mean, bundle.std)
            self.crop_shapes = [(bundle.channels, v.size, v.size) for v in views]

    @property
    def identical_augmentation(self) -> bool:
        """Whether the W processes together see exactly the augmentations of one process."""
        return self.world_size == 1 or self.split.in_memory

    def order(self, epoch: int) -> torch.Tensor:
        """(steps, batch_size) indices of every global batch of ``epoch``."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        perm = torch.randperm(len(self.split), generator=generator)
        return perm[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, -1)

    def epoch(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """This rank's (indices, views) of every step of ``epoch`` from ``start_step`` on.

        The steps before ``start_step`` are not yielded but still draw their augmentation
        parameters, so that the steps after them get exactly the views of an uninterrupted epoch.
        """
        if self.split.in_memory:
            yield from self._memory_epoch(epoch, start_step)
        else:
            yield from self._file_epoch(epoch, start_step)

    def _memory_epoch(
        self, epoch: int, start_step: int
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        batches = self.order(epoch)
        generator = _generator(self.device, derive_seed(self.seed, "augment", epoch))
        for step in range(self.steps_per_epoch):
            indices = batches[step]
            views = self.augment(self.images[indices.to(self.device)], generator=generator)
            if step >= start_step:
                yield indices[self.shard], [v[self.shard] for v in views]

    def _file_epoch(
        self, epoch: int, start_step: int
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        shards = self.order(epoch)[:, self.shard]
        parts: tuple[object, ...] = (self.seed, "augment", epoch)
        if self.world_size > 1:
            parts = (*parts, "rank", self.rank, self.world_size)
        generator = _generator(self.device, derive_seed(*parts))
        # Skipped steps: the device ops draw per image, whatever the pixels, so blank crops of
        # the right shape advance the generator without decoding a file.
        for _ in range(start_step):
            for i, shape in enumerate(self.crop_shapes):
                blank = torch.zeros((shards.shape[1], *shape), dtype=torch.uint8, device=self.device)
                self.augment.forward_one(i, blank, generator=generator)
        self.crops.epoch = epoch
        remaining = shards[start_step:]
        loader = DataLoader(
            self.crops,
            batch_sampler=[s.tolist() for s in remaining],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for indices, crops in zip(remaining, loader, strict=True):
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            views = [
                self.augment.forward_one(i, c, generator=generator) for i, c in enumerate(crops)
            ]
            yield indices, views


def sample_split(split: ImageSplit, n: int, seed: int) -> ImageSplit:
    """``n`` images of ``split`` drawn at random from ``seed`` (all if it has fewer), in split order."""
    if len(split) <= n:
        return split
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort()
    if split.in_memory:
        return ImageSplit(split.labels[index.values], images=split.images[index.values])
    assert split.files is not None
    return ImageSplit(split.labels[index.values], files=[split.files[i] for i in index.values.tolist()])


class _EvalDataset(Dataset):
    def __init__(self, split: ImageSplit, channels: int, resize: int, size: int) -> None:
        self.split = split
        self.channels = channels
        self.resize = resize
        self.size = size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = decode_image(self.split.files[index], channels=self.channels)
        image = TF.resize(image, [self.resize], antialias=True)
        return TF.center_crop(image, [self.size, self.size])


def eval_batches(
    split: ImageSplit,
    bundle: DatasetBundle,
    batch_size: int,
    device: torch.device,
    num_workers: int = 4,
) -> Iterator[torch.Tensor]:
    """The split under the deterministic eval transform, normalised, in order, on ``device``."""
    if split.in_memory:
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device)
            yield eval_view(images, bundle.mean, bundle.std)
        return
    dataset = _EvalDataset(split, bundle.channels, bundle.eval_resize or bundle.image_size, bundle.image_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for images in loader:
        yield eval_view(images.to(device, non_blocking=True), bundle.mean, bundle.std)

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
therefore replays exactly what an uninterrupted run would have done.
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
    """Shuffled, drop-last batches of the pre-training split, as lists of augmented views."""

    def __init__(
        self,
        bundle: DatasetBundle,
        views: Sequence[ViewConfig],
        batch_size: int,
        device: torch.device,
        seed: int,
        num_workers: int = 4,
        max_steps_per_epoch: int | None = None,
    ) -> None:
        split = bundle.pretrain
        self.split = split
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.num_workers = num_workers
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

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        perm = torch.randperm(len(self.split), generator=generator)
        return perm[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, -1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        batches = self.order(epoch)
        aug_generator = _generator(self.device, derive_seed(self.seed, "augment", epoch))
        if self.split.in_memory:
            for step in range(self.steps_per_epoch):
                indices = batches[step]
                images = self.images[indices.to(self.device)]
                views = self.augment(images, generator=aug_generator)
                if step >= start_step:
                    yield indices, views
            return
        self.crops.epoch = epoch
        loader = DataLoader(
            self.crops,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for step, (indices, crops) in enumerate(zip(batches, loader, strict=True)):
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            views = [
                self.augment.forward_one(i, c, generator=aug_generator) for i, c in enumerate(crops)
            ]
            if step >= start_step:
                yield indices, views


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

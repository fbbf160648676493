"""STL-10 in its binary format (``stl10_binary``), as torchvision reads it.

Each image is 3 x 96 x 96 uint8 stored channel by channel, each channel column-major; labels are
uint8 1..10. Pre-training uses train + unlabeled (105,000 images); the k-NN bank and probe use the
5,000 labelled train images; the 8,000 test images are scored.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from datasets.base import DatasetBundle, DatasetError, ImageSplit
from datasets.locate import Layout, download_root, find_folder

FOLDER = "stl10_binary"
SIZE = 96
_IMAGE_BYTES = 3 * SIZE * SIZE
# Official class_names.txt order, used when the file is absent (torchvision treats it as optional).
DEFAULT_CLASS_NAMES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
_LAYOUT = (
    f"<root>/{FOLDER}/{{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, "
    f"class_names.txt}} (or root pointing at {FOLDER}/ itself)"
)


def _locate(root: str | None) -> str:
    return find_folder(
        root,
        Layout(
            name="stl10", folders=(FOLDER,), markers=("train_X.bin",), describe=_LAYOUT,
            basename=FOLDER,
        ),
    )  # fmt: skip


def _map_images(path: str) -> np.ndarray:
    """A read-only (N, 3, 96, 96) view of an ``*_X.bin`` file, rows and columns already swapped."""
    if not os.path.isfile(path):
        raise DatasetError(f"stl10: missing {path!r}; expected {_LAYOUT}")
    size = os.path.getsize(path)
    if size == 0 or size % _IMAGE_BYTES:
        raise DatasetError(
            f"stl10: {path!r} has {size} bytes, not a positive multiple of {_IMAGE_BYTES} "
            "(one 3x96x96 uint8 image)"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return raw.reshape(-1, 3, SIZE, SIZE).transpose(0, 1, 3, 2)


def _read_labels(path: str, count: int) -> torch.Tensor:
    if not os.path.isfile(path):
        raise DatasetError(f"stl10: missing {path!r}; expected {_LAYOUT}")
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count:
        raise DatasetError(f"stl10: {path!r} holds {len(raw)} labels for {count} images")
    if len(raw) and (raw.min() < 1 or raw.max() > 10):
        raise DatasetError(f"stl10: {path!r} has labels outside 1..10")
    return torch.from_numpy(raw.astype(np.int64) - 1)


def _download(root: str | None) -> None:
    root = download_root(root, "stl10", FOLDER)
    import torchvision.datasets as tvd

    try:
        # split="test" makes torchvision parse only the small test files after the download.
        tvd.STL10(root, split="test", download=True)
    except Exception as exc:  # network and archive errors alike
        raise DatasetError(f"stl10: download into {root!r} failed ({exc})") from exc


def load_stl10(
    root: str | None = None, download: bool = False, allow_missing_unlabeled: bool = False
) -> DatasetBundle:
    """STL-10: pretrain = train + unlabeled (labels -1), train = 5,000 labelled, test = 8,000.

    Without ``unlabeled_X.bin`` this raises, unless ``allow_missing_unlabeled`` is set, in which
    case pre-training uses the labelled train images only. Mean/std come from the labelled train
    split.
    """
    if download:
        _download(root)
    folder = _locate(root)
    train_x = _map_images(os.path.join(folder, "train_X.bin"))
    train_y = _read_labels(os.path.join(folder, "train_y.bin"), len(train_x))
    test_x = _map_images(os.path.join(folder, "test_X.bin"))
    test_y = _read_labels(os.path.join(folder, "test_y.bin"), len(test_x))

    unlabeled_path = os.path.join(folder, "unlabeled_X.bin")
    if os.path.isfile(unlabeled_path):
        unlabeled_x = _map_images(unlabeled_path)
    elif allow_missing_unlabeled:
        unlabeled_x = None
    else:
        raise DatasetError(
            f"stl10: missing {unlabeled_path!r}, which the pre-training split (train + unlabeled) "
            "needs; restore it, or pass allow_missing_unlabeled=True to pre-train on the 5,000 "
            "labelled train images only"
        )

    train = ImageSplit(labels=train_y, images=torch.from_numpy(np.ascontiguousarray(train_x)))
    test = ImageSplit(labels=test_y, images=torch.from_numpy(np.ascontiguousarray(test_x)))
    if unlabeled_x is None:
        pretrain = train
    else:
        # Filled in place so the ~2.9 GB tensor is never built twice by a concatenation; train keeps
        # its own storage so that saving or sharing it does not drag the whole tensor along.
        n_train = len(train_x)
        images = torch.empty((n_train + len(unlabeled_x), 3, SIZE, SIZE), dtype=torch.uint8)
        images[:n_train] = train.images  # type: ignore[index]
        images[n_train:].numpy()[...] = unlabeled_x
        labels = torch.cat([train_y, torch.full((len(unlabeled_x),), -1, dtype=torch.int64)])
        pretrain = ImageSplit(labels=labels, images=images)

    class_names = list(DEFAULT_CLASS_NAMES)
    names_path = os.path.join(folder, "class_names.txt")
    if os.path.isfile(names_path):
        with open(names_path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != 10:
            raise DatasetError(f"stl10: {names_path!r} names {len(names)} classes, expected 10")
        class_names = names

    return DatasetBundle.from_splits("stl10", train, test, class_names, pretrain=pretrain)


def check_stl10(
    root: str | None = None, download: bool = False, allow_missing_unlabeled: bool = False
) -> None:
    """Cheap checks: files present, image files a whole number of images, one label byte each."""
    if download:
        download_root(root, "stl10", FOLDER)
        return
    folder = _locate(root)
    for split in ("train", "test"):
        images = _map_images(os.path.join(folder, f"{split}_X.bin"))
        labels_path = os.path.join(folder, f"{split}_y.bin")
        if not os.path.isfile(labels_path):
            raise DatasetError(f"stl10: missing {labels_path!r}; expected {_LAYOUT}")
        if os.path.getsize(labels_path) != len(images):
            raise DatasetError(
                f"stl10: {labels_path!r} holds {os.path.getsize(labels_path)} labels for "
                f"{len(images)} images"
            )
    unlabeled = os.path.join(folder, "unlabeled_X.bin")
    if os.path.isfile(unlabeled):
        _map_images(unlabeled)
    elif not allow_missing_unlabeled:
        raise DatasetError(
            f"stl10: missing {unlabeled!r}, which the pre-training split (train + unlabeled) "
            "needs; restore it, or pass allow_missing_unlabeled=True"
        )

"""File-backed image folders: a generic ImageFolder and ImageNet-100 (CMC class list).

Both read ``<root>/train/<class>/...`` and ``<root>/val/<class>/...`` (``test/`` if there is no
``val/``) with torchvision's own folder scan, so class order (sorted names) and accepted extensions
(``IMG_EXTENSIONS``) match ``torchvision.datasets.ImageFolder``. Images are not decoded at load; the
engine's DataLoader path calls :func:`decode_image` per sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from datasets.base import DatasetBundle, DatasetError, ImageSplit

# ImageNet-1k statistics, as in facebookresearch/moco main_moco.py.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET100_FOLDER = "imagenet100"
IMAGENET100_CLASSES_FILE = Path(__file__).with_name("imagenet100_classes.txt")
_LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (or <root>/test/...)"
# Missing classes listed in an error message before the rest is summarised.
_SHOW_MISSING = 5


def decode_image(path: str, channels: int = 3) -> torch.Tensor:
    """Decode one image file to a uint8 (C, H, W) tensor; C = 3 converts to RGB, C = 1 to grey."""
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise DatasetError(f"decode_image: channels={channels!r}; valid values are 1 and 3")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(modes[channels]))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path!r} ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # PIL's buffer is read-only; the copy gives torch a writable, contiguous CHW array.
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_imagenet100_classes() -> list[str]:
    """The 100 CMC WordNet IDs in the order of CLD's ``imagenet100.txt`` (docs/recipes.md §2)."""
    with open(IMAGENET100_CLASSES_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _require_root(name: str, root: str | None) -> str:
    if root is None:
        raise DatasetError(f"{name} needs root: a directory laid out as {_LAYOUT}")
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{name} root {root!r} is not a directory; expected {_LAYOUT}")
    return root


def _split_dirs(name: str, root: str) -> tuple[str, str]:
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DatasetError(f"{name}: no train/ folder in {root!r}; expected {_LAYOUT}")
    for candidate in ("val", "test"):
        eval_dir = os.path.join(root, candidate)
        if os.path.isdir(eval_dir):
            return train_dir, eval_dir
    raise DatasetError(f"{name}: no val/ (or test/) folder in {root!r}; expected {_LAYOUT}")


def _scan(directory: str, class_to_idx: dict[str, int]) -> tuple[ImageSplit, set[str]]:
    """Files of the given classes (sorted), and the classes that have no image at all."""
    samples = make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    present = {c for _, c in samples}
    split = ImageSplit(
        labels=torch.tensor([c for _, c in samples], dtype=torch.int64),
        files=[p for p, _ in samples],
    )
    return split, {cls for cls, i in class_to_idx.items() if i not in present}


def _check_triple(name: str, option: str, value: object) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise DatasetError(f"{name}: {option}={value!r}; expected three per-channel floats")
    return triple  # type: ignore[return-value]


def load_imagefolder(
    root: str | None = None,
    download: bool = False,
    image_size: int = 224,
    eval_resize: int = 256,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> DatasetBundle:
    """Any ImageFolder tree; classes are train/'s sub-folders in sorted order, pretrain = train.

    ``mean``/``std`` default to ImageNet-1k's statistics: exact statistics of an arbitrary folder
    would need a full decoding pass over its files, so pass them in when they matter.
    """
    name = "imagefolder"
    if download:
        raise DatasetError(f"{name} cannot be downloaded; point root at an existing {_LAYOUT}")
    for option, value in (("image_size", image_size), ("eval_resize", eval_resize)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DatasetError(f"{name}: {option}={value!r}; expected a positive int")
    if eval_resize < image_size:
        raise DatasetError(
            f"{name}: eval_resize={eval_resize} is smaller than image_size={image_size}; "
            "the eval transform resizes then centre-crops image_size"
        )
    mean = _check_triple(name, "mean", mean)
    std = _check_triple(name, "std", std)
    root = _require_root(name, root)
    train_dir, eval_dir = _split_dirs(name, root)
    try:
        classes, class_to_idx = find_classes(train_dir)
    except FileNotFoundError:
        raise DatasetError(
            f"{name}: no class folders in {train_dir!r}; expected {_LAYOUT}"
        ) from None

    train, empty = _scan(train_dir, class_to_idx)
    if empty:
        raise DatasetError(
            f"{name}: class folders without images in {train_dir!r}: {', '.join(sorted(empty))} "
            f"(accepted extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    unknown = sorted(
        e.name for e in os.scandir(eval_dir) if e.is_dir() and e.name not in class_to_idx
    )
    if unknown:
        raise DatasetError(
            f"{name}: {eval_dir!r} has class folders absent from train/: {', '.join(unknown)}"
        )
    test, _ = _scan(eval_dir, class_to_idx)
    if len(test) == 0:
        raise DatasetError(f"{name}: no images in {eval_dir!r}; expected {_LAYOUT}")
    return DatasetBundle(
        name=name,
        num_classes=len(classes),
        channels=3,
        image_size=image_size,
        mean=mean,
        std=std,
        pretrain=train,
        train=train,
        test=test,
        class_names=list(classes),
        eval_resize=eval_resize,
    )


def load_imagenet100(root: str | None = None, download: bool = False) -> DatasetBundle:
    """ImageNet-100: the CMC list's 100 classes of an ImageFolder tree, indexed in sorted wnid order.

    root may be a prepared 100-class folder, a directory holding it as ``imagenet100/``, or a full
    ImageNet-1k ImageFolder tree (train/ and a class-sorted val/); other classes are ignored. Every one of the 100 classes must have images in
    both splits.
    """
    name = "imagenet100"
    if download:
        raise DatasetError(f"{name} cannot be downloaded; point root at an existing {_LAYOUT}")
    root = _require_root(name, root)
    nested = os.path.join(root, IMAGENET100_FOLDER)
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(nested):
        # A data directory holding imagenet100/, like the parent roots the other loaders accept.
        root = nested
    train_dir, eval_dir = _split_dirs(name, root)
    classes = sorted(read_imagenet100_classes())
    class_to_idx = {wnid: i for i, wnid in enumerate(classes)}

    train, train_missing = _scan(train_dir, class_to_idx)
    test, test_missing = _scan(eval_dir, class_to_idx)
    problems = []
    for directory, missing in ((train_dir, train_missing), (eval_dir, test_missing)):
        if missing:
            shown = sorted(missing)[:_SHOW_MISSING]
            more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
            problems.append(
                f"{len(missing)} of the {len(classes)} classes have no images in {directory!r}: "
                f"{', '.join(shown)}{more}"
            )
    if problems:
        raise DatasetError(
            f"{name}: {'; '.join(problems)} (class list: {IMAGENET100_CLASSES_FILE}; "
            f"expected {_LAYOUT}; accepted extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    return DatasetBundle(
        name=name,
        num_classes=len(classes),
        channels=3,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrain=train,
        train=train,
        test=test,
        class_names=classes,
        eval_resize=256,
    )


def check_imagefolder(root: str | None = None, download: bool = False, **options: object) -> None:
    """Cheap checks: root exists and holds train/ and val/ (or test/); nothing is scanned."""
    if download:
        raise DatasetError(f"imagefolder cannot be downloaded; point root at an existing {_LAYOUT}")
    _split_dirs("imagefolder", _require_root("imagefolder", root))


def check_imagenet100(root: str | None = None, download: bool = False) -> None:
    """Cheap checks: root (or root/imagenet100) holds train/ and val/; the class list's folders
    exist in train/."""
    name = "imagenet100"
    if download:
        raise DatasetError(f"{name} cannot be downloaded; point root at an existing {_LAYOUT}")
    root = _require_root(name, root)
    nested = os.path.join(root, IMAGENET100_FOLDER)
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(nested):
        root = nested
    train_dir, _ = _split_dirs(name, root)
    missing = [c for c in read_imagenet100_classes() if not os.path.isdir(os.path.join(train_dir, c))]
    if missing:
        shown = sorted(missing)[:_SHOW_MISSING]
        more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
        raise DatasetError(
            f"{name}: {len(missing)} of the 100 class folders are missing from {train_dir!r}: "
            f"{', '.join(shown)}{more} (class list: {IMAGENET100_CLASSES_FILE})"
        )

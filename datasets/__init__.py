"""Dataset registry: ``load_dataset(name, root, download, **options) -> DatasetBundle``.

Loader modules are imported on first use, so importing this package stays cheap (no scikit-learn
or torchvision import until a dataset that needs it is loaded). Nothing is downloaded unless
``download=True``.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

from datasets.base import DatasetBundle, DatasetError, ImageSplit

__all__ = [
    "DATASET_INFO",
    "DatasetBundle",
    "DatasetError",
    "ImageSplit",
    "check_dataset",
    "list_datasets",
    "load_dataset",
]

# name -> (module, loader function); each module also has ``check_<name>`` (see check_dataset).
_LOADERS: dict[str, tuple[str, str]] = {
    "cifar10": ("datasets.cifar", "load_cifar10"),
    "cifar100": ("datasets.cifar", "load_cifar100"),
    "digits": ("datasets.digits", "load_digits"),
    "fashion_mnist": ("datasets.mnist", "load_fashion_mnist"),
    "imagefolder": ("datasets.imagefolder", "load_imagefolder"),
    "imagenet100": ("datasets.imagefolder", "load_imagenet100"),
    "kmnist": ("datasets.mnist", "load_kmnist"),
    "mnist": ("datasets.mnist", "load_mnist"),
    "stl10": ("datasets.stl10", "load_stl10"),
    "tinyimagenet": ("datasets.tinyimagenet", "load_tinyimagenet"),
}

# Static facts, usable without touching disk. ``root`` is the conventional folder name under a
# data directory (None: no files, or chosen by the user); loaders accept either that folder or its
# parent as ``root``. imagefolder's class count depends on the folder, hence None.
DATASET_INFO: dict[str, dict] = {
    "cifar10": {"num_classes": 10, "channels": 3, "image_size": 32, "root": "cifar-10-batches-py"},
    "cifar100": {"num_classes": 100, "channels": 3, "image_size": 32, "root": "cifar-100-python"},
    "digits": {"num_classes": 10, "channels": 1, "image_size": 16, "root": None},
    "fashion_mnist": {"num_classes": 10, "channels": 1, "image_size": 28, "root": "FashionMNIST"},
    "imagefolder": {"num_classes": None, "channels": 3, "image_size": 224, "root": None},
    "imagenet100": {"num_classes": 100, "channels": 3, "image_size": 224, "root": "imagenet100"},
    "kmnist": {"num_classes": 10, "channels": 1, "image_size": 28, "root": "KMNIST"},
    "mnist": {"num_classes": 10, "channels": 1, "image_size": 28, "root": "MNIST"},
    "stl10": {"num_classes": 10, "channels": 3, "image_size": 96, "root": "stl10_binary"},
    "tinyimagenet": {
        "num_classes": 200,
        "channels": 3,
        "image_size": 64,
        "root": "tiny-imagenet-200",
    },
}


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_LOADERS)


def _loader(name: str, options: dict[str, object], prefix: str = "load") -> Callable[..., Any]:
    """The module function ``<prefix>_<name>`` of dataset ``name``, after checking the options
    against the loader's keyword arguments."""
    if not isinstance(name, str) or name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    module_name, func_name = _LOADERS[name]
    module = importlib.import_module(module_name)
    loader = getattr(module, func_name)
    valid = [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.name not in ("root", "download")
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DatasetError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) if valid else 'none'}"
        )
    return getattr(module, f"{prefix}_{name}")


def load_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = False, **options: object
) -> DatasetBundle:
    """Load dataset ``name`` from ``root``; ``options`` are the loader's own keyword arguments.

    Options per dataset: stl10 ``allow_missing_unlabeled``; tinyimagenet ``cache``,
    ``cache_dir``, ``threads``; imagefolder ``image_size``, ``eval_resize``, ``mean``, ``std``.
    """
    loader = _loader(name, options)
    return loader(root=os.fspath(root) if root is not None else None, download=download, **options)


def check_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = False, **options: object
) -> None:
    """Raise DatasetError if ``load_dataset`` with these arguments would find missing or malformed
    files; cheap checks only (the name, the options, the folder layout, file presence, headers and
    counts where a header or the file size gives them). Nothing is decoded or downloaded; with
    ``download=True`` only what the download needs (a root) is checked."""
    checker = _loader(name, options, prefix="check")
    checker(root=os.fspath(root) if root is not None else None, download=download, **options)

"""CIFAR-10 and CIFAR-100 in torchvision's python-pickle format.

The pickles are read here rather than through ``torchvision.datasets.CIFAR10/100``: those classes
refuse any file whose md5 differs from the official archive's, which rules out re-packed or test
copies. The parsing rules are torchvision's (latin-1 pickles, ``data`` uint8 (N, 3072) in CHW order,
``labels`` or ``fine_labels``). torchvision is used only to download.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from datasets.base import DatasetBundle, DatasetError, ImageSplit
from datasets.locate import Layout, download_root, find_folder


@dataclass(frozen=True)
class _Format:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


CIFAR10 = _Format(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)

CIFAR100 = _Format(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)


def _layout(fmt: _Format) -> str:
    files = ", ".join(fmt.train_files + fmt.test_files + (fmt.meta_file,))
    return f"<root>/{fmt.folder}/{{{files}}} (or root pointing at {fmt.folder}/ itself)"


def _locate(root: str | None, fmt: _Format) -> str:
    return find_folder(
        root,
        Layout(
            name=fmt.name,
            folders=(fmt.folder,),
            # root may be the batch folder itself, whatever it is called.
            markers=fmt.train_files + fmt.test_files,
            describe=_layout(fmt),
            basename=fmt.folder,
        ),
    )


def _read_pickle(path: str, fmt: _Format) -> dict:
    try:
        with open(path, "rb") as f:
            # The official files are Python 2 pickles; latin-1 maps their byte strings to str.
            entry = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DatasetError(f"{fmt.name}: missing {path!r}; expected {_layout(fmt)}") from None
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DatasetError(f"{fmt.name}: cannot read {path!r} as a CIFAR pickle ({exc})") from exc
    if not isinstance(entry, dict):
        raise DatasetError(f"{fmt.name}: {path!r} holds a {type(entry).__name__}, expected a dict")
    return entry


def _read_batches(folder: str, files: tuple[str, ...], fmt: _Format) -> ImageSplit:
    datas, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        entry = _read_pickle(path, fmt)
        if "data" not in entry or fmt.label_key not in entry:
            raise DatasetError(
                f"{fmt.name}: {path!r} lacks 'data' or {fmt.label_key!r}; "
                f"keys found: {sorted(map(str, entry))}"
            )
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(
                f"{fmt.name}: {path!r} 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
            )
        lab = np.asarray(entry[fmt.label_key], dtype=np.int64)
        if lab.shape != (len(data),):
            raise DatasetError(f"{fmt.name}: {path!r} has {len(data)} images but {lab.size} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= fmt.num_classes):
            raise DatasetError(f"{fmt.name}: {path!r} has labels outside 0..{fmt.num_classes - 1}")
        datas.append(data)
        labels.append(lab)
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)
    return ImageSplit(
        labels=torch.from_numpy(np.concatenate(labels)),
        images=torch.from_numpy(np.ascontiguousarray(images)),
    )


def _download(root: str | None, fmt: _Format) -> None:
    root = download_root(root, fmt.name, fmt.folder)
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if fmt is CIFAR10 else tvd.CIFAR100
    try:
        # train=False makes torchvision parse only the test file after fetching the archive.
        cls(root, train=False, download=True)
    except Exception as exc:  # network and archive errors alike
        raise DatasetError(f"{fmt.name}: download into {root!r} failed ({exc})") from exc


def _folder_with_files(fmt: _Format, root: str | None) -> str:
    folder = _locate(root, fmt)
    missing = [
        f
        for f in fmt.train_files + fmt.test_files + (fmt.meta_file,)
        if not os.path.isfile(os.path.join(folder, f))
    ]
    if missing:
        raise DatasetError(
            f"{fmt.name}: {folder!r} lacks {', '.join(missing)}; expected {_layout(fmt)}"
        )
    return folder


def _load(fmt: _Format, root: str | None, download: bool) -> DatasetBundle:
    if download:
        _download(root, fmt)
    folder = _folder_with_files(fmt, root)
    train = _read_batches(folder, fmt.train_files, fmt)
    test = _read_batches(folder, fmt.test_files, fmt)
    meta_path = os.path.join(folder, fmt.meta_file)
    meta = _read_pickle(meta_path, fmt)
    if fmt.names_key not in meta:
        raise DatasetError(f"{fmt.name}: {meta_path!r} lacks {fmt.names_key!r}")
    class_names = [str(n) for n in meta[fmt.names_key]]
    if len(class_names) != fmt.num_classes:
        raise DatasetError(
            f"{fmt.name}: {meta_path!r} names {len(class_names)} classes, expected {fmt.num_classes}"
        )
    return DatasetBundle.from_splits(fmt.name, train, test, class_names)


def load_cifar10(root: str | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-10: 50,000 train (also the pre-training set) and 10,000 test images, uint8 32x32."""
    return _load(CIFAR10, root, download)


def load_cifar100(root: str | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-100 with its 100 fine labels: 50,000 train and 10,000 test images, uint8 32x32."""
    return _load(CIFAR100, root, download)


def check_cifar10(root: str | None = None, download: bool = False) -> None:
    """Cheap checks: the folder and its batch files exist (with download, only that root is set)."""
    _check(CIFAR10, root, download)


def check_cifar100(root: str | None = None, download: bool = False) -> None:
    """Cheap checks: the folder and its files exist (with download, only that root is set)."""
    _check(CIFAR100, root, download)


def _check(fmt: _Format, root: str | None, download: bool) -> None:
    if download:
        download_root(root, fmt.name, fmt.folder)
        return
    _folder_with_files(fmt, root)

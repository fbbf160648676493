"""Fashion-MNIST, MNIST and Kuzushiji-MNIST in the IDX format (``.gz`` or not).

Each dataset is four IDX files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped. An IDX file is
a big-endian header (magic number ``0x000008NN``: unsigned bytes, NN dimensions; then one 32-bit
size per dimension) followed by the values. The folder is found in torchvision's layout
(``<root>/FashionMNIST/raw/``, ``<root>/MNIST/raw/``, ``<root>/KMNIST/raw/``) or ``root`` may be
the folder holding the four files. ``fashion_mnist`` with no root reads the files of Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).

The images stay at their native 28 x 28 (uint8, one channel): every pixel of the 28 x 28 frame is
real data, zero-padding to 32 would add only background and (32/28)^2 = 1.31x the backbone work
per image, and the low-resolution stems do not need a power-of-two input.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from datasets.base import DatasetBundle, DatasetError, ImageSplit
from datasets.locate import Layout, download_root, find_folder

SIZE = 28
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic numbers: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class IdxFormat:
    """One dataset of the MNIST family: its name, torchvision folder, class names and files."""

    name: str
    folder: str  # torchvision's folder under root; the files are in <folder>/raw/
    torchvision_class: str
    class_names: tuple[str, ...]
    default_roots: tuple[str, ...] = ()

    @property
    def layout(self) -> Layout:
        files = ", ".join(FILES.values())
        describe = (
            f"<root>/{self.folder}/raw/{{{files}}} (each may be .gz), as torchvision writes it, "
            "or root pointing at the folder holding the four files"
        )
        hint = " (dataset.download=true fetches it; download=True in Python"
        if self.default_roots:
            hint += ", or leave root unset to read the Debian package dataset-fashion-mnist"
        hint += ")"
        return Layout(
            name=self.name,
            folders=(f"{self.folder}/raw", "raw"),
            markers=tuple(f + ext for f in FILES.values() for ext in ("", ".gz")),
            describe=describe,
            default_roots=self.default_roots,
            not_found_hint=hint,
        )


FASHION_MNIST = IdxFormat(
    name="fashion_mnist",
    folder="FashionMNIST",
    torchvision_class="FashionMNIST",
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),  # fmt: skip
    default_roots=(DEBIAN_FASHION_MNIST,),
)
MNIST = IdxFormat(
    name="mnist",
    folder="MNIST",
    torchvision_class="MNIST",
    class_names=tuple(str(d) for d in range(10)),
)
KMNIST = IdxFormat(
    name="kmnist",
    folder="KMNIST",
    torchvision_class="KMNIST",
    # torchvision's romanisations of the ten hiragana.
    class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
)
FORMATS = {f.name: f for f in (FASHION_MNIST, MNIST, KMNIST)}


def _file(folder: str, key: str, fmt: IdxFormat) -> str:
    """The path of one of the four files, uncompressed preferred over ``.gz``."""
    base = os.path.join(folder, FILES[key])
    for path in (base, base + ".gz"):
        if os.path.isfile(path):
            return path
    raise DatasetError(
        f"{fmt.name}: missing {base!r} (or {FILES[key]}.gz) in {folder!r}; "
        f"expected {fmt.layout.describe}"
    )


def _read_bytes(path: str, fmt: IdxFormat, limit: int = -1) -> bytes:
    """The (decompressed) contents of ``path``, or its first ``limit`` bytes."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read(limit)
        with open(path, "rb") as f:
            return f.read(limit)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(
            f"{fmt.name}: {path!r} is a truncated or corrupt gzip file ({exc})"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{fmt.name}: cannot read {path!r} ({exc})") from exc


def _header(data: bytes, path: str, fmt: IdxFormat, magic: int) -> tuple[int, ...]:
    """The dimensions in an IDX header, after checking its magic number."""
    ndim = magic & 0xFF
    kind = "images (unsigned bytes, 3-D)" if ndim == 3 else "labels (unsigned bytes, 1-D)"
    if len(data) < 4:
        raise DatasetError(
            f"{fmt.name}: {path!r} is truncated: {len(data)} bytes, too short for an IDX header"
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetError(
            f"{fmt.name}: {path!r} has the wrong magic number 0x{found:08x}; an IDX file of "
            f"{kind} starts with 0x{magic:08x}"
        )
    end = 4 + 4 * ndim
    if len(data) < end:
        raise DatasetError(
            f"{fmt.name}: {path!r} is truncated: {len(data)} bytes, too short for its "
            f"{end}-byte IDX header"
        )
    dims = struct.unpack(f">{ndim}I", data[4:end])
    if ndim == 3 and dims[1:] != (SIZE, SIZE):
        raise DatasetError(
            f"{fmt.name}: {path!r} holds {dims[1]}x{dims[2]} images, expected {SIZE}x{SIZE}"
        )
    return dims


def _read_idx(path: str, fmt: IdxFormat, magic: int) -> np.ndarray:
    data = _read_bytes(path, fmt)
    dims = _header(data, path, fmt, magic)
    offset = 4 + 4 * len(dims)
    need = int(np.prod(dims))
    have = len(data) - offset
    if have < need:
        raise DatasetError(
            f"{fmt.name}: {path!r} is truncated: its header declares shape {dims} "
            f"({need} bytes of values) but the file holds {have}"
        )
    if have > need:
        raise DatasetError(
            f"{fmt.name}: {path!r} has {have - need} bytes after the {need} bytes of values its "
            f"header declares (shape {dims})"
        )
    return np.frombuffer(data, dtype=np.uint8, count=need, offset=offset).reshape(dims)


def _read_split(folder: str, split: str, fmt: IdxFormat) -> ImageSplit:
    images_path = _file(folder, f"{split}_images", fmt)
    labels_path = _file(folder, f"{split}_labels", fmt)
    images = _read_idx(images_path, fmt, IMAGES_MAGIC)
    labels = _read_idx(labels_path, fmt, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(
            f"{fmt.name}: {images_path!r} holds {len(images)} images but {labels_path!r} holds "
            f"{len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.flatnonzero(labels >= NUM_CLASSES)[0])
        raise DatasetError(
            f"{fmt.name}: {labels_path!r} has label {int(labels[bad])} at index {bad}, outside "
            f"0..{NUM_CLASSES - 1}"
        )
    return ImageSplit(
        labels=torch.from_numpy(labels.astype(np.int64)),
        # np.frombuffer views immutable bytes; the copy gives torch a writable array.
        images=torch.from_numpy(images.reshape(-1, 1, SIZE, SIZE).copy()),
    )


def _download(root: str | None, fmt: IdxFormat) -> None:
    root = download_root(root, fmt.name, fmt.folder)
    import torchvision.datasets as tvd

    try:
        # train=False: torchvision fetches all four files and then parses only the small test set.
        getattr(tvd, fmt.torchvision_class)(root, train=False, download=True)
    except Exception as exc:  # network and archive errors alike
        raise DatasetError(f"{fmt.name}: download into {root!r} failed ({exc})") from exc


def _load(fmt: IdxFormat, root: str | None, download: bool) -> DatasetBundle:
    if download:
        _download(root, fmt)
    folder = find_folder(root, fmt.layout)
    train = _read_split(folder, "train", fmt)
    test = _read_split(folder, "test", fmt)
    return DatasetBundle.from_splits(fmt.name, train, test, fmt.class_names)


def check_idx(fmt: IdxFormat, root: str | None, download: bool) -> None:
    """Cheap checks of the four files: found, right magic numbers and image size, matching
    image/label counts, and sizes that agree with the headers (for ``.gz`` files the size stored
    in the gzip trailer). Values are not read."""
    if download:
        download_root(root, fmt.name, fmt.folder)
        return
    folder = find_folder(root, fmt.layout)
    for split in ("train", "test"):
        counts = []
        for kind, magic in (("images", IMAGES_MAGIC), ("labels", LABELS_MAGIC)):
            path = _file(folder, f"{split}_{kind}", fmt)
            dims = _header(_read_bytes(path, fmt, 16), path, fmt, magic)
            expected = 4 + 4 * len(dims) + int(np.prod(dims))
            actual = _stored_size(path, fmt)
            if path.endswith(".gz"):
                expected %= 1 << 32  # gzip stores the size modulo 2**32
            if actual != expected:
                raise DatasetError(
                    f"{fmt.name}: {path!r} holds {actual} bytes but its header (shape {dims}) "
                    f"declares {expected}: the file is truncated or has trailing data"
                )
            counts.append((dims[0], path))
        (n_images, images_path), (n_labels, labels_path) = counts
        if n_images != n_labels:
            raise DatasetError(
                f"{fmt.name}: {images_path!r} holds {n_images} images but {labels_path!r} holds "
                f"{n_labels} labels"
            )


def _stored_size(path: str, fmt: IdxFormat) -> int:
    """The uncompressed size: the file's, or a gzip file's ISIZE trailer (size mod 2**32)."""
    size = os.path.getsize(path)
    if not path.endswith(".gz"):
        return size
    if size < 18:
        raise DatasetError(f"{fmt.name}: {path!r} is a truncated gzip file ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def load_fashion_mnist(root: str | None = None, download: bool = False) -> DatasetBundle:
    """Fashion-MNIST: 60,000 train (also pretrain) and 10,000 test uint8 28x28 grey images.

    With ``root`` None the Debian package's files are read.
    """
    return _load(FASHION_MNIST, root, download)


def load_mnist(root: str | None = None, download: bool = False) -> DatasetBundle:
    """MNIST: 60,000 train (also pretrain) and 10,000 test uint8 28x28 grey images."""
    return _load(MNIST, root, download)


def load_kmnist(root: str | None = None, download: bool = False) -> DatasetBundle:
    """Kuzushiji-MNIST: 60,000 train (also pretrain) and 10,000 test uint8 28x28 grey images."""
    return _load(KMNIST, root, download)


def check_fashion_mnist(root: str | None = None, download: bool = False) -> None:
    check_idx(FASHION_MNIST, root, download)


def check_mnist(root: str | None = None, download: bool = False) -> None:
    check_idx(MNIST, root, download)


def check_kmnist(root: str | None = None, download: bool = False) -> None:
    check_idx(KMNIST, root, download)

"""Tiny-ImageNet-200, decoded once into uint8 tensors (test split = the labelled ``val`` set).

Decoding the 110,000 JPEGs takes about a minute, so the decoded arrays are cached next to the data
in ``.groupbench_cache_v1.npz``. The cache records a fingerprint of every input file (relative
path, size, mtime) plus the two index files' contents; any difference, including a copy that did
not preserve mtimes, makes the loader decode again and rewrite the cache. Results are identical
with or without it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from datasets.base import DatasetBundle, DatasetError, ImageSplit
from datasets.locate import Layout, find_folder

FOLDER = "tiny-imagenet-200"
SIZE = 64
CACHE_NAME = ".groupbench_cache_v1.npz"
_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_LAYOUT = (
    f"<root>/{FOLDER}/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
    f"val/val_annotations.txt (or root pointing at {FOLDER}/ itself)"
)
# JPEG decoding in Pillow releases the GIL, so threads scale; capped to stay polite on shared nodes.
_MAX_THREADS = 8
# Images per task handed to a decoding thread.
_BLOCK = 512


def _locate(root: str | None) -> str:
    return find_folder(
        root,
        Layout(
            name="tinyimagenet",
            folders=(FOLDER,),
            markers=("wnids.txt",),
            describe=_LAYOUT,
            not_found_what=f"{FOLDER}/ (nor wnids.txt)",
            not_found_hint=f"; get {_URL} and unzip it there",
        ),
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"tinyimagenet: missing {path!r}; expected {_LAYOUT}") from None


def _is_jpeg_name(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg"))


def _index(folder: str) -> tuple[list[str], list[str], list[int], list[str], list[int], str]:
    """Class list, train and val files with labels, and a fingerprint of everything read."""
    wnids_text = _read_text(os.path.join(folder, "wnids.txt"))
    wnids = sorted({w.strip() for w in wnids_text.split() if w.strip()})
    if not wnids:
        raise DatasetError(f"tinyimagenet: {os.path.join(folder, 'wnids.txt')!r} lists no wnids")
    class_to_idx = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid in wnids:
        images_dir = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(images_dir):
            raise DatasetError(f"tinyimagenet: missing {images_dir!r}; expected {_LAYOUT}")
        names = sorted(e.name for e in os.scandir(images_dir) if _is_jpeg_name(e.name))
        if not names:
            raise DatasetError(f"tinyimagenet: no JPEG images in {images_dir!r}")
        train_files += [os.path.join(images_dir, n) for n in names]
        train_labels += [class_to_idx[wnid]] * len(names)

    ann_path = os.path.join(folder, "val", "val_annotations.txt")
    ann_text = _read_text(ann_path)
    val_files, val_labels = [], []
    # Annotation order, which is the val_0 ... val_9999 order of the official file.
    for lineno, line in enumerate(ann_text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in class_to_idx:
            raise DatasetError(
                f"tinyimagenet: {ann_path!r} line {lineno} ({line.strip()!r}) does not name an "
                "image and a wnid from wnids.txt"
            )
        val_files.append(os.path.join(folder, "val", "images", fields[0].strip()))
        val_labels.append(class_to_idx[fields[1].strip()])
    if not val_files:
        raise DatasetError(f"tinyimagenet: {ann_path!r} lists no images")

    digest = hashlib.sha256()
    digest.update(wnids_text.encode())
    digest.update(ann_text.encode())
    for path in train_files + val_files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DatasetError(f"tinyimagenet: missing {path!r}") from None
        rel = os.path.relpath(path, folder)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return wnids, train_files, train_labels, val_files, val_labels, digest.hexdigest()


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"tinyimagenet: cannot decode {path!r} ({exc})") from exc
    if arr.shape != (SIZE, SIZE, 3):
        raise DatasetError(
            f"tinyimagenet: {path!r} is {arr.shape[1]}x{arr.shape[0]}, expected {SIZE}x{SIZE}"
        )
    return arr


def _decode_all(files: list[str], threads: int) -> np.ndarray:
    out = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + _BLOCK, len(files))):
            out[i] = _decode(files[i]).transpose(2, 0, 1)

    starts = range(0, len(files), _BLOCK)
    if threads <= 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            # list() re-raises the first worker exception here.
            list(pool.map(work, starts))
    return out


def _read_cache(path: str, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                return None
            return {k: npz[k] for k in ("train_images", "train_labels", "val_images", "val_labels")}
    except Exception as exc:  # a truncated or foreign file is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable Tiny-ImageNet cache {path!r} ({exc})", stacklevel=3)
        return None


def _write_cache(path: str, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".groupbench_cache_", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), **arrays)
            # Without the fsync a crash soon after the rename can leave the new name pointing at
            # unwritten blocks: a cache that exists but is truncated.
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private to its owner; others sharing the dataset should read it.
        os.chmod(tmp, 0o644)
        # Readers see either the old file or the complete new one, never a partial write.
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # a read-only dataset directory only costs the next load a re-decode
        warnings.warn(f"could not write Tiny-ImageNet cache {path!r} ({exc})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_tinyimagenet(
    root: str | None = None,
    download: bool = False,
    cache: bool = True,
    cache_dir: str | None = None,
    threads: int | None = None,
) -> DatasetBundle:
    """Tiny-ImageNet-200: 100,000 train (also pretrain) and 10,000 val-as-test uint8 64x64 images.

    Classes are indexed in sorted wnid order. ``cache`` reads and writes the decoded-array cache in
    ``cache_dir`` (default: the ``tiny-imagenet-200`` folder). ``threads`` bounds the decoding
    threads (default: CPU count, at most 8).
    """
    if download:
        raise DatasetError(
            f"tinyimagenet cannot be downloaded by this harness; get {_URL} and unzip it under root"
        )
    folder = _locate(root)
    wnids, train_files, train_labels, val_files, val_labels, fingerprint = _index(folder)

    cache_path = os.path.join(
        os.path.expanduser(cache_dir) if cache_dir is not None else folder, CACHE_NAME
    )
    arrays = _read_cache(cache_path, fingerprint) if cache else None
    if arrays is not None and (
        len(arrays["train_images"]) != len(train_files)
        or len(arrays["val_images"]) != len(val_files)
    ):
        arrays = None  # cannot happen with a matching fingerprint unless the file was tampered with
    if arrays is None:
        n_threads = threads if threads is not None else min(_MAX_THREADS, os.cpu_count() or 1)
        arrays = {
            "train_images": _decode_all(train_files, n_threads),
            "train_labels": np.asarray(train_labels, dtype=np.int64),
            "val_images": _decode_all(val_files, n_threads),
            "val_labels": np.asarray(val_labels, dtype=np.int64),
        }
        if cache:
            _write_cache(cache_path, arrays, fingerprint)

    train = ImageSplit(
        labels=torch.from_numpy(arrays["train_labels"]),
        images=torch.from_numpy(arrays["train_images"]),
    )
    test = ImageSplit(
        labels=torch.from_numpy(arrays["val_labels"]), images=torch.from_numpy(arrays["val_images"])
    )
    return DatasetBundle.from_splits("tinyimagenet", train, test, wnids)


def check_tinyimagenet(root: str | None = None, download: bool = False, **options: object) -> None:
    """Cheap checks: the folder, wnids.txt, train/<wnid>/images/ and val_annotations.txt exist."""
    if download:
        raise DatasetError(
            f"tinyimagenet cannot be downloaded by this harness; get {_URL} and unzip it under root"
        )
    folder = _locate(root)
    wnids = sorted({w for w in _read_text(os.path.join(folder, "wnids.txt")).split() if w})
    if not wnids:
        raise DatasetError(f"tinyimagenet: {os.path.join(folder, 'wnids.txt')!r} lists no wnids")
    for wnid in wnids:
        images_dir = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(images_dir):
            raise DatasetError(f"tinyimagenet: missing {images_dir!r}; expected {_LAYOUT}")
    ann_path = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(ann_path):
        raise DatasetError(f"tinyimagenet: missing {ann_path!r}; expected {_LAYOUT}")

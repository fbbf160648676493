"""Dataset loaders read tiny files written in each dataset's exact on-disk format."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
from datasets import DATASET_INFO, DatasetBundle, DatasetError, ImageSplit, list_datasets
from datasets import load_dataset as load
from datasets import stats as stats_module
from datasets import tinyimagenet as tiny_module
from datasets.imagefolder import IMAGENET_MEAN, IMAGENET_STD, decode_image

ALL_NAMES = [
    "cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "imagenet100", "kmnist",
    "mnist", "stl10", "tinyimagenet",
]  # fmt: skip


def _np_stats(pixels01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference per-channel mean / population std of (N, C, H, W) values in [0, 1]."""
    per_channel = pixels01.astype(np.float64).transpose(1, 0, 2, 3).reshape(pixels01.shape[1], -1)
    return per_channel.mean(axis=1), per_channel.std(axis=1)


def _assert_split(split: ImageSplit, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    assert split.in_memory and len(split) == n
    assert split.images.shape == (n, *shape) and split.images.dtype == dtype
    assert split.labels.dtype == torch.int64 and split.labels.shape == (n,)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_info() -> None:
    assert list_datasets() == ALL_NAMES
    assert sorted(DATASET_INFO) == ALL_NAMES
    sizes = {k: v["image_size"] for k, v in DATASET_INFO.items()}
    assert sizes == {
        "cifar10": 32,
        "cifar100": 32,
        "digits": 16,
        "fashion_mnist": 28,
        "imagefolder": 224,
        "imagenet100": 224,
        "kmnist": 28,
        "mnist": 28,
        "stl10": 96,
        "tinyimagenet": 64,
    }
    assert DATASET_INFO["cifar10"]["root"] == "cifar-10-batches-py"
    assert datasets.DatasetBundle is DatasetBundle and datasets.ImageSplit is ImageSplit
    # Our package, not Hugging Face's library of the same name.
    assert Path(datasets.__file__).parent.name == "datasets"
    assert hasattr(datasets, "load_dataset") and not hasattr(datasets, "load_from_disk")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as info:
        load("cifar-10")
    msg = str(info.value)
    assert "'cifar-10'" in msg and all(name in msg for name in ALL_NAMES)


def test_unknown_option_lists_valid_options(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"unknown option\(s\) unlabeled.*allow_missing_unlabeled"
    ):
        load("stl10", tmp_path, unlabeled=False)


@pytest.mark.parametrize(
    "name", ["cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet100", "mnist", "kmnist"]
)
def test_root_errors_name_path_and_layout(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="needs root"):
        load(name)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load(name, missing)
    msg = str(info.value)
    assert str(missing) in msg and "expected" in msg and "<root>/" in msg


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channel_stats_match_numpy_across_chunks(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=gen)
        ref = images.numpy() / 255.0
    else:
        images = torch.rand((37, 2, 5, 7), generator=gen)
        ref = images.numpy()
    want_mean, want_std = _np_stats(ref)
    whole = stats_module.channel_stats(images)
    monkeypatch.setattr(stats_module, "_CHUNK_PIXELS", 100)  # a few images per chunk
    chunked = stats_module.channel_stats(images)
    for mean, std in (whole, chunked):
        assert all(isinstance(v, float) for v in mean + std)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
        np.testing.assert_allclose(std, want_std, rtol=1e-12)


def test_bundle_from_splits_uses_train_statistics_only() -> None:
    gen = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 128, (6, 3, 4, 4), dtype=torch.uint8, generator=gen)
    test_images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)  # would move mean and std
    train = ImageSplit(labels=torch.tensor([0, 1, 2, 0, 1, 2]), images=train_images)
    test = ImageSplit(labels=torch.tensor([0, 1]), images=test_images)
    bundle = DatasetBundle.from_splits("toy", train, test, ("a", "b", "c"))
    want_mean, want_std = _np_stats(train_images.numpy() / 255.0)
    np.testing.assert_allclose(bundle.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(bundle.std, want_std, rtol=1e-12)
    assert (bundle.name, bundle.num_classes, bundle.channels, bundle.image_size) == ("toy", 3, 3, 4)
    assert bundle.class_names == ["a", "b", "c"] and bundle.eval_resize is None
    assert bundle.pretrain is train and bundle.train is train and bundle.test is test

    unlabelled = ImageSplit(labels=torch.full((1,), -1), images=train_images[:1])
    assert DatasetBundle.from_splits("toy", train, test, "abc", unlabelled).pretrain is unlabelled
    wide = ImageSplit(labels=torch.tensor([0]), images=torch.zeros((1, 1, 4, 5)))
    with pytest.raises(ValueError, match="toy: images are 4x5; expected square images"):
        DatasetBundle.from_splits("toy", wide, test, "abc")
    files = ImageSplit(labels=torch.tensor([0]), files=["a.png"])
    with pytest.raises(ValueError, match="needs an in-memory train split"):
        DatasetBundle.from_splits("toy", files, test, "abc")


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load("digits")


def test_digits_split_values_and_stats(digits: DatasetBundle) -> None:
    from sklearn.datasets import load_digits

    assert (digits.num_classes, digits.channels, digits.image_size) == (10, 1, 16)
    assert digits.pretrain is digits.train and digits.eval_resize is None
    _assert_split(digits.train, 1437, (1, 16, 16), torch.float32)
    _assert_split(digits.test, 360, (1, 16, 16), torch.float32)
    for split in (digits.train, digits.test):
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert sorted(split.labels.unique().tolist()) == list(range(10))
        # 2x bilinear upsampling of k/16 values lands exactly on multiples of 1/256.
        scaled = split.images * 256
        assert torch.equal(scaled, scaled.round())

    # Stratified: every class keeps its 80/20 proportion to within one image.
    raw = load_digits()
    totals = np.bincount(raw.target, minlength=10)
    test_counts = np.bincount(digits.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1)
    np.testing.assert_array_equal(
        np.bincount(digits.train.labels.numpy(), minlength=10) + test_counts, totals
    )

    # The first test image is an 8x8 digit, /16, upsampled exactly as specified.
    from sklearn.model_selection import train_test_split

    _, idx_test = train_test_split(
        np.arange(len(raw.target)), test_size=0.2, stratify=raw.target, random_state=0
    )
    src = torch.from_numpy(raw.images[idx_test[:1]] / 16.0).unsqueeze(1)
    want = F.interpolate(src, size=(16, 16), mode="bilinear", align_corners=False).float()
    assert torch.equal(digits.test.images[:1], want)
    assert digits.test.labels[0].item() == raw.target[idx_test[0]]

    mean, std = _np_stats(digits.train.images.numpy())
    np.testing.assert_allclose(digits.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(digits.std, std, rtol=1e-12)


def test_digits_is_deterministic(digits: DatasetBundle) -> None:
    again = load("digits", root="/ignored")
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels, digits.test.labels)


# ----------------------------------------------------------------------------- CIFAR


def _dump(path: Path, obj: dict) -> None:
    # The official files are Python 2 pickles read back with encoding="latin1", which yields str
    # keys; protocol 2 with str keys is what torchvision's reader sees.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(parent: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    data = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        _dump(
            folder / name,
            {
                "batch_label": f"batch {b + 1} of 5",
                "labels": [int(v) for v in labels[rows]],
                "data": data[rows],
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
        )
    class_names = [f"class{i}" for i in range(10)]
    _dump(
        folder / "batches.meta",
        {"num_cases_per_batch": per_batch, "label_names": class_names, "num_vis": 3072},
    )
    return data, labels, np.array(class_names)


def test_cifar10_reads_torchvision_pickles(tmp_path: Path) -> None:
    data, labels, class_names = _write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        bundle = load("cifar10", root)
        assert (bundle.num_classes, bundle.channels, bundle.image_size) == (10, 3, 32)
        assert bundle.class_names == list(class_names)
        _assert_split(bundle.train, 20, (3, 32, 32), torch.uint8)
        _assert_split(bundle.test, 4, (3, 32, 32), torch.uint8)
        assert bundle.pretrain is bundle.train
        assert bundle.train.labels.tolist() == labels[:20].tolist()
        assert bundle.test.labels.tolist() == labels[20:].tolist()
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
        for i, c, y, x in [(0, 0, 0, 0), (7, 1, 3, 30), (19, 2, 31, 5)]:
            assert bundle.train.images[i, c, y, x].item() == data[i, c * 1024 + y * 32 + x]
        assert bundle.test.images[3, 2, 31, 31].item() == data[23, 3071]
        mean, std = _np_stats(data[:20].reshape(-1, 3, 32, 32) / 255.0)
        np.testing.assert_allclose(bundle.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(bundle.std, std, rtol=1e-12)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(100)
    data = {
        s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 6), ("test", 3))
    }
    fine = {"train": [0, 99, 5, 42, 7, 1], "test": [3, 98, 0]}
    for split in ("train", "test"):
        _dump(
            folder / split,
            {
                "filenames": ["x.png"] * len(fine[split]),
                "batch_label": f"{split} batch",
                "fine_labels": fine[split],
                "coarse_labels": [v // 5 for v in fine[split]],
                "data": data[split],
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    bundle = load("cifar100", tmp_path)
    assert bundle.num_classes == 100 and bundle.class_names[99] == "fine99"
    assert bundle.train.labels.tolist() == fine["train"]
    assert bundle.test.labels.tolist() == fine["test"]
    assert bundle.train.images[5, 1, 10, 20].item() == data["train"][5, 1024 + 10 * 32 + 20]


def test_cifar_missing_batches_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(DatasetError) as info:
        load("cifar10", tmp_path)
    msg = str(info.value)
    assert str(folder) in msg and "data_batch_1" in msg and "test_batch" in msg
    # The folder itself given as root gives the same message.
    with pytest.raises(DatasetError, match="lacks data_batch_1"):
        load("cifar10", folder)
    # A parent without the folder at all.
    with pytest.raises(DatasetError, match=r"no cifar-100-python/ under .*download=True"):
        load("cifar100", tmp_path)


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load("cifar10", tmp_path)


def test_cifar_download_only_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    calls: list[tuple[str, bool]] = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            if download and not (Path(root) / "cifar-10-batches-py").exists():
                _write_cifar10(Path(root))

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DatasetError):
        load("cifar10", tmp_path)
    assert calls == []
    bundle = load("cifar10", tmp_path, download=True)
    assert calls == [(str(tmp_path), True)] and len(bundle.train) == 20
    # Given the batch folder itself, the download goes to its parent.
    load("cifar10", tmp_path / "cifar-10-batches-py", download=True)
    assert calls[-1] == (str(tmp_path), True)


# ----------------------------------------------------------------------------- STL-10


def _write_stl_images(path: Path, images: np.ndarray) -> None:
    # On disk each channel is stored column-major: the file order is (N, C, W, H).
    images.transpose(0, 1, 3, 2).tofile(path)


def _write_stl10(parent: Path, unlabeled: bool = True) -> dict[str, np.ndarray]:
    folder = parent / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(96)
    arrays = {
        "train_X": rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8),
        "train_y": np.array([1, 10, 4], dtype=np.uint8),
        "test_X": rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8),
        "test_y": np.array([2, 3], dtype=np.uint8),
        "unlabeled_X": rng.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8),
    }
    for key in ("train_X", "test_X") + (("unlabeled_X",) if unlabeled else ()):
        _write_stl_images(folder / f"{key}.bin", arrays[key])
    for key in ("train_y", "test_y"):
        arrays[key].tofile(folder / f"{key}.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return arrays


def test_stl10_binary_layout(tmp_path: Path) -> None:
    arrays = _write_stl10(tmp_path)
    raw = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin", dtype=np.uint8)
    bundle = load("stl10", tmp_path)
    assert (bundle.num_classes, bundle.channels, bundle.image_size) == (10, 3, 96)
    assert bundle.class_names[0] == "airplane" and bundle.class_names[-1] == "truck"
    _assert_split(bundle.train, 3, (3, 96, 96), torch.uint8)
    _assert_split(bundle.test, 2, (3, 96, 96), torch.uint8)
    _assert_split(bundle.pretrain, 7, (3, 96, 96), torch.uint8)
    # Byte offset of (image i, channel c, row y, column x) in the column-major file.
    for i, c, y, x in [(0, 0, 0, 1), (1, 2, 95, 0), (2, 1, 40, 77)]:
        assert bundle.train.images[i, c, y, x].item() == raw[i * 27648 + c * 9216 + x * 96 + y]
    assert torch.equal(bundle.train.images, torch.from_numpy(arrays["train_X"]))
    assert torch.equal(bundle.test.images, torch.from_numpy(arrays["test_X"]))
    assert bundle.train.labels.tolist() == [0, 9, 3]
    assert bundle.test.labels.tolist() == [1, 2]
    assert bundle.pretrain.labels.tolist() == [0, 9, 3, -1, -1, -1, -1]
    assert torch.equal(bundle.pretrain.images[:3], bundle.train.images)
    assert torch.equal(bundle.pretrain.images[3:], torch.from_numpy(arrays["unlabeled_X"]))
    # Statistics come from the labelled train split only.
    mean, std = _np_stats(arrays["train_X"] / 255.0)
    np.testing.assert_allclose(bundle.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bundle.std, std, rtol=1e-12)
    # root may also be the stl10_binary folder itself.
    again = load("stl10", tmp_path / "stl10_binary")
    assert torch.equal(again.pretrain.images, bundle.pretrain.images)


def test_stl10_missing_unlabeled(tmp_path: Path) -> None:
    _write_stl10(tmp_path, unlabeled=False)
    with pytest.raises(DatasetError) as info:
        load("stl10", tmp_path)
    assert "unlabeled_X.bin" in str(info.value) and "allow_missing_unlabeled" in str(info.value)
    bundle = load("stl10", tmp_path, allow_missing_unlabeled=True)
    assert bundle.pretrain is bundle.train and len(bundle.pretrain) == 3


def test_stl10_bad_files(tmp_path: Path) -> None:
    _write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DatasetError, match="3 labels for 2 images"):
        load("stl10", tmp_path)
    (folder / "test_X.bin").write_bytes(bytes(100))
    with pytest.raises(DatasetError, match="not a positive multiple of 27648"):
        load("stl10", tmp_path)
    (folder / "train_y.bin").unlink()
    with pytest.raises(DatasetError, match=r"missing .*train_y\.bin"):
        load("stl10", tmp_path)


# ----------------------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = ["n09999999", "n01443537", "n02124075"]  # deliberately not in sorted order
TINY_COLORS = {"n01443537": (200, 30, 30), "n02124075": (30, 200, 30), "n09999999": (30, 30, 200)}


def _tiny_image(color: tuple[int, int, int], seed: int) -> Image.Image:
    # Flat colour with a small bright square so images differ yet decode near their colour.
    arr = np.empty((64, 64, 3), dtype=np.uint8)
    arr[:] = color
    arr[8 * seed : 8 * seed + 8, 8:16] = 255
    return Image.fromarray(arr)


def _write_tiny(parent: Path) -> Path:
    folder = parent / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(2):
            _tiny_image(TINY_COLORS[wnid], j).save(images / f"{wnid}_{j}.JPEG", quality=95)
    # A greyscale JPEG, as some real Tiny-ImageNet images are.
    Image.new("L", (64, 64), 77).save(
        folder / "train" / "n01443537" / "images" / "n01443537_2.JPEG"
    )
    val = [("val_0.JPEG", "n02124075"), ("val_1.JPEG", "n09999999"), ("val_2.JPEG", "n01443537")]
    for k, (fname, wnid) in enumerate(val):
        _tiny_image(TINY_COLORS[wnid], k).save(folder / "val" / "images" / fname, quality=95)
    lines = [f"{fname}\t{wnid}\t0\t0\t63\t63" for fname, wnid in val]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def _pil_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write_tiny(tmp_path)


def test_tinyimagenet_decodes_tree(tiny: Path) -> None:
    bundle = load("tinyimagenet", tiny.parent, cache=False, threads=2)
    assert not (tiny / tiny_module.CACHE_NAME).exists()
    assert bundle.class_names == sorted(TINY_WNIDS) and bundle.num_classes == 3
    assert (bundle.channels, bundle.image_size) == (3, 64)
    _assert_split(bundle.train, 7, (3, 64, 64), torch.uint8)
    _assert_split(bundle.test, 3, (3, 64, 64), torch.uint8)
    assert bundle.pretrain is bundle.train
    # Sorted wnids, then sorted file names within a class.
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert bundle.test.labels.tolist() == [1, 2, 0]  # annotation-file order
    train_paths = [
        tiny / "train" / w / "images" / f"{w}_{j}.JPEG"
        for w, js in (("n01443537", (0, 1, 2)), ("n02124075", (0, 1)), ("n09999999", (0, 1)))
        for j in js
    ]
    for i, path in enumerate(train_paths):
        assert np.array_equal(bundle.train.images[i].numpy(), _pil_pixels(path))
    # JPEG is lossy, but a flat colour decodes close to it; the greyscale image becomes RGB.
    assert np.abs(bundle.train.images[3, :, 40, 40].numpy() - (30, 200, 30)).max() <= 4
    assert bundle.train.images[2, :, 5, 5].tolist() == [77, 77, 77]
    assert np.abs(bundle.test.images[1, :, 40, 40].numpy() - (30, 30, 200)).max() <= 4
    mean, std = _np_stats(bundle.train.images.numpy() / 255.0)
    np.testing.assert_allclose(bundle.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bundle.std, std, rtol=1e-12)
    # root may be the tiny-imagenet-200 folder itself.
    again = load("tinyimagenet", tiny, cache=False, threads=1)
    assert torch.equal(again.train.images, bundle.train.images)


def test_tinyimagenet_cache_is_transparent(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = load("tinyimagenet", tiny.parent, cache=False)
    first = load("tinyimagenet", tiny.parent)
    cache = tiny / tiny_module.CACHE_NAME
    assert cache.is_file()
    assert not [p for p in os.listdir(tiny) if p.endswith(".tmp")]

    def no_decode(path: str) -> np.ndarray:
        raise AssertionError(f"decoded {path} although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(tiny_module, "_decode", no_decode)
        cached = load("tinyimagenet", tiny.parent)
    for bundle in (first, cached):
        for a, b in ((bundle.train, fresh.train), (bundle.test, fresh.test)):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert bundle.mean == fresh.mean and bundle.std == fresh.std
        assert bundle.class_names == fresh.class_names

    # A new image invalidates the cache: it is decoded again and rewritten.
    _tiny_image((1, 2, 3), 0).save(tiny / "train" / "n02124075" / "images" / "n02124075_9.JPEG")
    changed = load("tinyimagenet", tiny.parent)
    assert len(changed.train) == 8
    with monkeypatch.context() as m:
        m.setattr(tiny_module, "_decode", no_decode)
        assert len(load("tinyimagenet", tiny.parent).train) == 8

    # A corrupt cache is ignored with a warning and replaced.
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable Tiny-ImageNet cache"):
        rebuilt = load("tinyimagenet", tiny.parent)
    assert torch.equal(rebuilt.train.images, changed.train.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("tinyimagenet", tiny.parent)


def test_tinyimagenet_errors(tiny: Path) -> None:
    ann = tiny / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_3.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="n00000000"):
        load("tinyimagenet", tiny.parent, cache=False)
    ann.write_text("val_0.JPEG\tn02124075\t0\t0\t1\t1\nval_7.JPEG\tn02124075\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"missing .*val_7\.JPEG"):
        load("tinyimagenet", tiny.parent, cache=False)
    ann.write_text("val_0.JPEG\tn02124075\t0\t0\t1\t1\n")
    Image.new("RGB", (32, 32)).save(tiny / "val" / "images" / "val_0.JPEG")
    with pytest.raises(DatasetError, match=r"val_0\.JPEG.*expected 64x64"):
        load("tinyimagenet", tiny.parent, cache=False)
    (tiny / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="wnids.txt"):
        load("tinyimagenet", tiny.parent, cache=False)
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        load("tinyimagenet", tiny.parent, download=True)


# ----------------------------------------------------------------------------- image folders


def _pattern(seed: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [(x * 40 + seed) % 256, (y * 30 + seed) % 256, np.full_like(x, seed)], -1
    ).astype(np.uint8)


@pytest.fixture(scope="module")
def imagenet100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet100")
    wnids = datasets.imagefolder.read_imagenet100_classes()
    for k, wnid in enumerate(wnids):
        for split, count in (("train", 2 if k % 10 == 0 else 1), ("val", 1)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(count):
                Image.fromarray(_pattern(k)).save(folder / f"{wnid}_{j}.PNG")
    # A class outside the list (as in a full ImageNet tree) and a non-image file are ignored.
    (root / "train" / "n99999999").mkdir()
    Image.fromarray(_pattern(1)).save(root / "train" / "n99999999" / "x.png")
    (root / "train" / wnids[0] / "notes.txt").write_text("not an image")
    return root


def test_imagenet100_class_list() -> None:
    wnids = datasets.imagefolder.read_imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"


def test_imagenet100_tree(imagenet100_root: Path) -> None:
    bundle = load("imagenet100", imagenet100_root)
    wnids = datasets.imagefolder.read_imagenet100_classes()
    assert bundle.class_names == sorted(wnids) and bundle.num_classes == 100
    assert (bundle.channels, bundle.image_size, bundle.eval_resize) == (3, 224, 256)
    assert bundle.mean == IMAGENET_MEAN and bundle.std == IMAGENET_STD
    for split, n in ((bundle.train, 110), (bundle.test, 100)):
        assert not split.in_memory and split.images is None and len(split.files) == n
        assert split.labels.dtype == torch.int64
    assert bundle.pretrain is bundle.train
    assert not any("n99999999" in f or f.endswith(".txt") for f in bundle.train.files)
    # Labels follow sorted wnids; each file sits in its label's folder.
    for path, label in zip(bundle.train.files, bundle.train.labels.tolist(), strict=True):
        assert Path(path).parent.name == bundle.class_names[label]
    assert bundle.train.labels.tolist() == sorted(bundle.train.labels.tolist())
    # A data directory holding imagenet100/ works as root too.
    parent = imagenet100_root.parent / "data"
    parent.mkdir(exist_ok=True)
    link = parent / DATASET_INFO["imagenet100"]["root"]
    if not link.exists():
        link.symlink_to(imagenet100_root, target_is_directory=True)
    assert len(load("imagenet100", parent).train) == 110
    first = bundle.test.files[0]
    k = wnids.index(bundle.class_names[0])
    assert decode_image(first).numpy().transpose(1, 2, 0).tolist() == _pattern(k).tolist()


def test_imagenet100_missing_classes(tmp_path: Path) -> None:
    wnids = sorted(datasets.imagefolder.read_imagenet100_classes())
    for wnid in wnids[3:]:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.fromarray(_pattern(0)).save(tmp_path / "train" / wnid / "a.png")
    for wnid in wnids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(_pattern(0)).save(tmp_path / "val" / wnid / "a.png")
    (tmp_path / "val" / wnids[50] / "a.png").unlink()  # an empty folder counts as missing
    with pytest.raises(DatasetError) as info:
        load("imagenet100", tmp_path)
    msg = str(info.value)
    assert "3 of the 100 classes" in msg and all(w in msg for w in wnids[:3])
    assert "1 of the 100 classes" in msg and wnids[50] in msg
    assert str(tmp_path / "train") in msg and str(tmp_path / "val") in msg


def _write_folder(root: Path, eval_name: str = "test") -> None:
    for split, per_class in (("train", 2), (eval_name, 1)):
        for c, cls in enumerate(("dog", "cat")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.fromarray(_pattern(10 * c + j)).save(folder / f"{j}.png")
    (root / "train" / "cat" / "readme.md").write_text("ignored")


def test_imagefolder_generic(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    bundle = load("imagefolder", tmp_path, image_size=64, eval_resize=72, mean=(0.5,) * 3)
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2
    assert (bundle.image_size, bundle.eval_resize) == (64, 72)
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.std == IMAGENET_STD
    assert bundle.train.labels.tolist() == [0, 0, 1, 1] and len(bundle.test) == 2
    assert [Path(f).name for f in bundle.train.files] == ["0.png", "1.png", "0.png", "1.png"]
    assert bundle.test.labels.tolist() == [0, 1]
    defaults = load("imagefolder", tmp_path)
    assert (defaults.image_size, defaults.eval_resize, defaults.mean) == (224, 256, IMAGENET_MEAN)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no train/ folder.*<root>/train/<class>"):
        load("imagefolder", tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(_pattern(0)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(DatasetError, match=r"no val/ \(or test/\) folder"):
        load("imagefolder", tmp_path)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(DatasetError, match="absent from train/: b"):
        load("imagefolder", tmp_path)
    (tmp_path / "val" / "b").rmdir()
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="without images.*empty"):
        load("imagefolder", tmp_path)
    with pytest.raises(DatasetError, match="image_size"):
        load("imagefolder", tmp_path, image_size=0)
    with pytest.raises(DatasetError, match="three per-channel floats"):
        load("imagefolder", tmp_path, std=(0.2, 0.2))


def test_decode_image(tmp_path: Path) -> None:
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 255
    rgba[1, 2] = (1, 2, 3, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(str(tmp_path / "a.png"))
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 4) and out.is_contiguous()
    assert out[:, 1, 2].tolist() == [1, 2, 3] and out[:, 0, 0].tolist() == [10, 0, 0]
    grey = decode_image(str(tmp_path / "a.png"), channels=1)
    assert grey.shape == (1, 3, 4)
    with pytest.raises(DatasetError, match="channels=2"):
        decode_image(str(tmp_path / "a.png"), channels=2)
    with pytest.raises(DatasetError, match="missing.png"):
        decode_image(str(tmp_path / "missing.png"))

"""Fashion-MNIST, MNIST and KMNIST: IDX files (tiny ones written here, and the real Fashion-MNIST
files of Debian's dataset-fashion-mnist package), their errors, the dataset check, the view recipe
and the per-dataset budgets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from datasets import DatasetError, check_dataset, list_datasets, load_dataset
from datasets import mnist as mnist_module
from datasets.views import MultiViewAugment, view_config
from engine.config import ConfigError, resolve_run_config, semantic_config, to_container
from tests.conftest import compose_config, run_cli

IDX_NAMES = ["fashion_mnist", "kmnist", "mnist"]
TV_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST"}
DEBIAN = Path(mnist_module.DEBIAN_FASHION_MNIST)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008<ndim>, the sizes, then the values."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _tiny_arrays(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }


def _write_idx_folder(
    folder: Path, arrays: dict[str, np.ndarray], gz: bool = False
) -> dict[str, Path]:
    return {
        key: _write(folder / mnist_module.FILES[key], _idx_bytes(arr), gz)
        for key, arr in arrays.items()
    }


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", IDX_NAMES)
@pytest.mark.parametrize("gz", [False, True])
def test_reads_torchvision_layout(name: str, gz: bool, tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    _write_idx_folder(tmp_path / TV_FOLDER[name] / "raw", arrays, gz=gz)
    bundle = load_dataset(name, tmp_path)
    assert (bundle.name, bundle.num_classes, bundle.channels, bundle.image_size) == (
        name, 10, 1, 28,
    )  # fmt: skip
    assert bundle.pretrain is bundle.train
    assert bundle.train.images.dtype == torch.uint8
    assert bundle.train.images.shape == (12, 1, 28, 28) and bundle.test.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(bundle.train.images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(bundle.test.images[:, 0].numpy(), arrays["test_images"])
    assert bundle.train.labels.dtype == torch.int64
    assert bundle.train.labels.tolist() == [i % 10 for i in range(12)]
    assert bundle.test.labels.tolist() == [4, 3, 2, 1, 0]
    pixels = arrays["train_images"].astype(np.float64) / 255.0
    assert bundle.mean[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert bundle.std[0] == pytest.approx(pixels.std(), abs=1e-12)
    assert len(bundle.class_names) == 10
    # The same folder through the parent of raw/ and through raw/ itself.
    for root in (tmp_path / TV_FOLDER[name], tmp_path / TV_FOLDER[name] / "raw"):
        assert torch.equal(load_dataset(name, root).train.images, bundle.train.images)
    check_dataset(name, tmp_path)


def test_reads_a_plain_folder_and_prefers_uncompressed(tmp_path: Path) -> None:
    arrays = _tiny_arrays()
    _write_idx_folder(tmp_path, arrays, gz=False)
    # A .gz copy with other pixels beside each file: the uncompressed file is the one read.
    _write_idx_folder(tmp_path, _tiny_arrays(seed=1), gz=True)
    bundle = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(bundle.train.images[:, 0].numpy(), arrays["train_images"])
    assert bundle.class_names == [str(d) for d in range(10)]
    assert load_dataset("kmnist", tmp_path).class_names[:3] == ["o", "ki", "su"]
    assert load_dataset("fashion_mnist", tmp_path).class_names[0] == "T-shirt/top"


def test_fashion_mnist_without_root_reads_the_debian_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = _tiny_arrays()
    _write_idx_folder(tmp_path / "fashion-mnist", arrays, gz=True)
    fmt = dataclasses.replace(
        mnist_module.FASHION_MNIST, default_roots=(str(tmp_path / "fashion-mnist"),)
    )
    monkeypatch.setattr(mnist_module, "FASHION_MNIST", fmt)
    bundle = load_dataset("fashion_mnist")
    np.testing.assert_array_equal(bundle.test.images[:, 0].numpy(), arrays["test_images"])
    check_dataset("fashion_mnist")
    # Not installed: the error says where it looked and how to get the files.
    fmt = dataclasses.replace(fmt, default_roots=(str(tmp_path / "absent"),))
    monkeypatch.setattr(mnist_module, "FASHION_MNIST", fmt)
    with pytest.raises(DatasetError, match=r"needs root.*absent.*FashionMNIST/raw"):
        load_dataset("fashion_mnist")
    with pytest.raises(DatasetError, match="needs root"):
        load_dataset("mnist")  # no system package for MNIST


def test_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    calls = []

    class FakeKMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            _write_idx_folder(Path(root) / "KMNIST" / "raw", _tiny_arrays(), gz=True)

    monkeypatch.setattr(tvd, "KMNIST", FakeKMNIST)
    with pytest.raises(DatasetError, match=r"no KMNIST/raw/ under .*dataset.download=true fetches"):
        load_dataset("kmnist", tmp_path)  # nothing there, and no download asked for
    assert calls == []
    bundle = load_dataset("kmnist", tmp_path, download=True)
    assert calls == [(str(tmp_path), False, True)] and len(bundle.train) == 12
    # root pointing at KMNIST/ itself downloads into its parent.
    load_dataset("kmnist", tmp_path / "KMNIST", download=True)
    assert calls[-1][0] == str(tmp_path)
    with pytest.raises(DatasetError,
                       match=r"download=true \(download=True in Python\) needs dataset\.root"):
        load_dataset("kmnist", None, download=True)


# ----------------------------------------------------------------------------- bad files


def _bad_folder(tmp_path: Path, gz: bool = False, **changes: np.ndarray | bytes) -> Path:
    arrays = _tiny_arrays()
    folder = tmp_path / ("gz" if gz else "raw")
    for key, arr in arrays.items():
        value = changes.get(key, arr)
        data = value if isinstance(value, bytes) else _idx_bytes(value)
        _write(folder / mnist_module.FILES[key], data, gz)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic_number(tmp_path: Path, gz: bool) -> None:
    # A labels file where the images file belongs.
    folder = _bad_folder(tmp_path, gz, train_images=_idx_bytes(np.zeros(12, np.uint8)))
    pattern = r"train-images-idx3-ubyte.* wrong magic number 0x00000801.*0x00000803"
    with pytest.raises(DatasetError, match=pattern):
        load_dataset("fashion_mnist", folder)
    with pytest.raises(DatasetError, match=pattern):
        check_dataset("fashion_mnist", folder)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path: Path, gz: bool) -> None:
    full = _idx_bytes(_tiny_arrays()["test_images"])
    folder = _bad_folder(tmp_path, gz, test_images=full[:-100])
    with pytest.raises(
        DatasetError, match=r"t10k-images-idx3-ubyte.*truncated.*\(5, 28, 28\).*3920 bytes.*3820"
    ):
        load_dataset("mnist", folder)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*3836 bytes.*declares 3936"):
        check_dataset("mnist", folder)
    # Cut inside the header.
    folder = _bad_folder(tmp_path / "header", gz, test_labels=full[:6])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.*wrong magic|too short"):
        load_dataset("mnist", folder)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz.*truncated or corrupt gzip"):
        load_dataset("kmnist", folder)


def test_trailing_bytes(tmp_path: Path) -> None:
    full = _idx_bytes(_tiny_arrays()["train_labels"])
    folder = _bad_folder(tmp_path, train_labels=full + b"\0\0\0")
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.* 3 bytes after the 12"):
        load_dataset("mnist", folder)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.*holds 23 bytes.*declares 20"):
        check_dataset("mnist", folder)


@pytest.mark.parametrize("gz", [False, True])
def test_image_and_label_counts_differ(tmp_path: Path, gz: bool) -> None:
    folder = _bad_folder(tmp_path, gz, train_labels=np.zeros(11, np.uint8))
    pattern = r"train-images-idx3-ubyte.* holds 12 images but .*train-labels-idx1-ubyte.* 11 labels"
    with pytest.raises(DatasetError, match=pattern):
        load_dataset("fashion_mnist", folder)
    with pytest.raises(DatasetError, match=pattern):
        check_dataset("fashion_mnist", folder)


def test_labels_out_of_range(tmp_path: Path) -> None:
    labels = np.zeros(5, np.uint8)
    labels[3] = 10
    folder = _bad_folder(tmp_path, test_labels=labels)
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte.* label 10 at index 3, outside 0\.\.9"
    ):
        load_dataset("kmnist", folder)


def test_wrong_image_size_and_missing_file(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path, train_images=np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.* 32x32 images, expected 28x28"):
        load_dataset("mnist", folder)
    folder = _bad_folder(tmp_path / "missing")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"missing .*t10k-labels-idx1-ubyte.*\(or .*\.gz\)"):
        load_dataset("mnist", folder)
    with pytest.raises(DatasetError, match=r"missing .*t10k-labels-idx1-ubyte"):
        check_dataset("mnist", folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no MNIST/raw/ under .*empty.*download=True"):
        load_dataset("mnist", tmp_path / "empty")


# ----------------------------------------------------------------------------- check_dataset

FILE_BACKED = [n for n in list_datasets() if n != "digits"]


@pytest.mark.parametrize("name", FILE_BACKED)
def test_check_dataset_missing_root(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{name} root .*nowhere.* is not a directory"):
        check_dataset(name, missing)
    # An existing but empty root names what it expected there.
    with pytest.raises(DatasetError, match=rf"^{name}"):
        check_dataset(name, tmp_path)


def test_check_dataset_names_and_options(tmp_path: Path) -> None:
    check_dataset("digits")
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'.*fashion_mnist.*mnist"):
        check_dataset("svhn")
    with pytest.raises(DatasetError, match=r"unknown option\(s\) cache; valid options: none"):
        check_dataset("mnist", tmp_path, cache=False)
    # With download, only the root it needs is checked.
    check_dataset("fashion_mnist", tmp_path / "not-yet", download=True)
    with pytest.raises(DatasetError,
                       match=r"download=true \(download=True in Python\) needs dataset\.root"):
        check_dataset("cifar10", None, download=True)


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("name", IDX_NAMES)
def test_view_recipe_runs_batched_on_grey_28px(name: str) -> None:
    shared = view_config(name, "shared", 28)
    assert (shared.size, shared.brightness, shared.contrast) == (28, 0.4, 0.4)
    assert (shared.saturation, shared.hue, shared.grayscale_p, shared.blur_p) == (0, 0, 0, 0)
    if name == "fashion_mnist":
        assert (shared.crop_scale, shared.flip_p) == ((0.2, 1.0), 0.5)
    else:  # handwritten glyphs take the digits row: no mirroring, at least half the frame
        assert (shared.crop_scale, shared.crop_ratio, shared.flip_p) == ((0.5, 1.0), (0.8, 1.25), 0)
    local = view_config(name, "local", 28)
    assert (local.size, local.crop_scale, local.blur_p) == (12, (0.2, 0.5), 0.0)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    kinds = ("shared", "weak", "global1", "global2", "local")
    augment = MultiViewAugment([view_config(name, k, 28) for k in kinds], (0.3,), (0.35,))
    views = augment(images, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(16, 1, 28, 28)] * 4 + [(16, 1, 12, 12)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


# ----------------------------------------------------------------------------- budgets


def test_gpu_budget_is_the_cifar_recipe() -> None:
    config = resolve_run_config(compose_config(["dataset=fashion_mnist"]))
    cifar = resolve_run_config(compose_config(["dataset=cifar10"]))
    for key in ("epochs", "batch_size"):
        assert config["trainer"][key] == cifar["trainer"][key]
    assert (config["trainer"]["epochs"], config["trainer"]["batch_size"]) == (200, 256)
    assert (config["backbone"]["name"], config["backbone"]["stem"]) == ("resnet18", "lowres")
    assert config["trainer"]["max_steps_per_epoch"] is None
    assert "budget" not in config


@pytest.mark.parametrize("name", IDX_NAMES)
def test_cpu_budget_values(name: str) -> None:
    config = resolve_run_config(compose_config([f"dataset={name}", "budget=cpu"]))
    trainer, backbone = config["trainer"], config["backbone"]
    assert config["budget"] == "cpu"
    assert (trainer["epochs"], trainer["max_steps_per_epoch"], trainer["batch_size"]) == (10, 20, 256)
    assert (backbone["name"], backbone["stem"]) == ("test_resnet", "lowres_pool")
    assert config["dataset"]["warmup_cap_epochs"] == 1
    assert (config["dataset"]["epochs"], config["dataset"]["backbone"]) == (10, "test_resnet")


def test_budget_is_part_of_the_run_hash() -> None:
    default = semantic_config(resolve_run_config(compose_config(["dataset=fashion_mnist"])))
    cpu = semantic_config(resolve_run_config(compose_config(["dataset=fashion_mnist", "budget=cpu"])))
    assert json.dumps(default, sort_keys=True) != json.dumps(cpu, sort_keys=True)
    # Explicit settings win over the budget's, and a budget value can be overridden in place.
    config = resolve_run_config(compose_config([
        "dataset=fashion_mnist", "budget=cpu", "trainer.max_steps_per_epoch=2", "trainer.epochs=1",
        "budget.datasets.fashion_mnist.stem=lowres",
    ]))  # fmt: skip
    assert (config["trainer"]["epochs"], config["trainer"]["max_steps_per_epoch"]) == (1, 2)
    assert config["backbone"]["stem"] == "lowres"


def test_default_budget_leaves_digits_config_unchanged() -> None:
    composed = compose_config([])
    with_node = resolve_run_config(composed)
    plain = to_container(compose_config([]))
    del plain["budget"]
    without_node = resolve_run_config(plain)
    assert with_node == without_node and "budget" not in with_node
    digits_cpu = resolve_run_config(compose_config(["budget=cpu"]))
    assert digits_cpu["trainer"]["epochs"] == with_node["trainer"]["epochs"] == 30


def test_budget_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"budget='cpu' is not defined for dataset='cifar10'.*fashion_mnist"
    ):
        resolve_run_config(compose_config(["dataset=cifar10", "budget=cpu"]))
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)budget/laptop.*cpu.*default"):
        compose_config(["budget=laptop"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) steps in budget 'cpu'.*valid keys"):
        resolve_run_config(
            compose_config(["dataset=mnist", "budget=cpu", "+budget.datasets.mnist.steps=3"])
        )


# ----------------------------------------------------------------------------- real files

needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {DEBIAN} (apt-get install dataset-fashion-mnist)",
)

# SHA-256 of the pixels (uint8, N x 28 x 28, C order) and of the labels (one byte each).
TRAIN_PIXELS_SHA256 = "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012"
TEST_PIXELS_SHA256 = "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a"
TRAIN_LABELS_SHA256 = "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7"
TEST_LABELS_SHA256 = "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9"


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@needs_debian
def test_real_fashion_mnist_files() -> None:
    check_dataset("fashion_mnist")
    bundle = load_dataset("fashion_mnist")
    assert (len(bundle.pretrain), len(bundle.train), len(bundle.test)) == (60000, 60000, 10000)
    assert bundle.train.images.shape == (60000, 1, 28, 28)
    assert bundle.train.labels.bincount().tolist() == [6000] * 10
    assert bundle.test.labels.bincount().tolist() == [1000] * 10
    assert _sha256(bundle.train.images) == TRAIN_PIXELS_SHA256
    assert _sha256(bundle.test.images) == TEST_PIXELS_SHA256
    assert _sha256(bundle.train.labels.to(torch.uint8)) == TRAIN_LABELS_SHA256
    assert _sha256(bundle.test.labels.to(torch.uint8)) == TEST_LABELS_SHA256
    assert bundle.mean[0] == pytest.approx(0.2860406, abs=1e-7)
    assert bundle.std[0] == pytest.approx(0.3530242, abs=1e-7)


@needs_debian
def test_real_fashion_mnist_run_through_the_cli(tmp_path: Path) -> None:
    result = run_cli([
        "eval.grid", "dataset=fashion_mnist", "budget=cpu", "method=simclr",
        "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.progress=false",
        "eval.linear=false", f"results_dir={tmp_path}",
    ], timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (record_path,) = (tmp_path / "runs" / "fashion_mnist").rglob("record.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "finished" and record["dataset"] == "fashion_mnist"
    assert record["config"]["budget"] == "cpu"
    assert record["config"]["backbone"]["name"] == "test_resnet"
    assert len(record["history"]) == 1
    # 10,000 test images scored: accuracy is a multiple of 1/10,000, far above chance (10 %).
    assert 0.3 < record["metrics"]["knn20_top1"] / 100 <= 1.0


def test_registry_lists_the_mnist_family() -> None:
    for name in IDX_NAMES:
        assert name in list_datasets()
        info = datasets.DATASET_INFO[name]
        assert (info["num_classes"], info["channels"], info["image_size"]) == (10, 1, 28)

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import fedwa.data.datasets as ds
from fedwa.data import DATASET_NAMES, check_available, load_dataset, read_idx
from fedwa.common.errors import ConfigError, DataNotFoundError, FedwaError

SQRT2 = 2 ** 0.5


def _assert_standardised(x):
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_digits_shapes_and_balanced_test_set():
    d = load_dataset("digits")
    assert d.x_train.shape == (1797 - 300, 1, 8, 8) and d.x_test.shape == (300, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and len(d.class_names) == 10
    assert torch.bincount(d.y_test).tolist() == [30] * 10
    # load_digits has 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 per class
    assert torch.bincount(d.y_train).tolist() == [148, 152, 147, 153, 151, 152, 151, 149, 144, 150]
    _assert_standardised(d.x_train)


def test_load_is_cached():
    assert load_dataset("digits") is load_dataset("digits")


def test_synthetic_is_balanced_and_linearly_separable_but_not_perfectly():
    from sklearn.linear_model import LogisticRegression

    d = load_dataset("synthetic")
    assert d.x_train.shape == (2000, 1, 8, 8) and d.x_test.shape == (500, 1, 8, 8)
    assert torch.bincount(d.y_train).tolist() == [200] * 10
    assert torch.bincount(d.y_test).tolist() == [50] * 10
    _assert_standardised(d.x_train)
    clf = LogisticRegression(max_iter=1000).fit(d.x_train.reshape(2000, -1).numpy(), d.y_train.numpy())
    acc = clf.score(d.x_test.reshape(500, -1).numpy(), d.y_test.numpy())
    assert 0.8 <= acc <= 0.95


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    _assert_standardised(d.x_train)
    check_available("fashion-mnist")


# --- IDX -------------------------------------------------------------------

def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


# Train image i has every pixel = 51 * i, i.e. 0, .2, .4, .6, .8 after /255:
# mean .4, std sqrt((.16 + .04 + 0 + .04 + .16) / 5) = sqrt(.08), so image i
# standardises to (.2 i - .4) / sqrt(.08) = (i - 2) / sqrt(2).
# Test pixels are 255 -> (1 - .4) / sqrt(.08) = 3 / sqrt(2).
IDX_TRAIN = np.repeat((51 * np.arange(5, dtype=np.uint8))[:, None, None], 12, axis=1).reshape(5, 4, 3)
IDX_TEST = np.full((3, 4, 3), 255, dtype=np.uint8)
IDX_ARRAYS = {
    "train-images-idx3-ubyte": IDX_TRAIN,
    "train-labels-idx1-ubyte": np.array([0, 1, 2, 3, 4], dtype=np.uint8),
    "t10k-images-idx3-ubyte": IDX_TEST,
    "t10k-labels-idx1-ubyte": np.array([4, 0, 9], dtype=np.uint8),
}


def _write_idx(folder: Path, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in IDX_ARRAYS.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (folder / name).write_bytes(_idx_bytes(array))


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    _write_idx(tmp_path, gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), IDX_TRAIN)
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}"), [4, 0, 9])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8)
    with pytest.raises(FedwaError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(IDX_TEST)[:-1])
    with pytest.raises(FedwaError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_torchvision_layout(tmp_path, monkeypatch, gz):
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    _write_idx(tmp_path / "FashionMNIST" / "raw", gz)
    check_available("fashion-mnist", str(tmp_path))
    d = load_dataset("fashion-mnist", str(tmp_path))
    assert d.x_train.shape == (5, 1, 4, 3) and d.input_shape == (1, 4, 3)
    assert d.y_train.tolist() == [0, 1, 2, 3, 4] and d.y_test.tolist() == [4, 0, 9]
    expected = ((torch.arange(5.0) - 2) / SQRT2).reshape(5, 1, 1, 1).expand(5, 1, 4, 3)
    assert torch.allclose(d.x_train, expected, atol=1e-5)
    assert torch.allclose(d.x_test, torch.full((3, 1, 4, 3), 3 / SQRT2), atol=1e-5)
    assert d.class_names[1] == "Trouser"


def test_mnist_files_directly_in_data_root(tmp_path):
    _write_idx(tmp_path, gz=False)
    d = load_dataset("mnist", str(tmp_path))
    assert d.x_test.shape == (3, 1, 4, 3) and d.class_names == tuple("0123456789")


# --- CIFAR -----------------------------------------------------------------

def _pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj))


def _standardise(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    t = train.astype(np.float64) / 255
    mean, std = t.mean(axis=(0, 2, 3), keepdims=True), t.std(axis=(0, 2, 3), keepdims=True)
    return (images.astype(np.float64) / 255 - mean) / std


def test_cifar10_reader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # [N, 3, 32, 32] flattened row-major is exactly CIFAR's R, G, B planes per row
    train = rng.integers(0, 256, size=(20, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    train_labels = [i % 10 for i in range(20)]
    for b in range(5):
        _pickle(folder / f"data_batch_{b + 1}", {b"data": train[4 * b:4 * b + 4].reshape(4, 3072),
                                                 b"labels": train_labels[4 * b:4 * b + 4]})
    _pickle(folder / "test_batch", {b"data": test.reshape(3, 3072), b"labels": [7, 8, 9]})
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(folder / "batches.meta", {b"label_names": names})

    check_available("cifar10", str(tmp_path))
    d = load_dataset("cifar10", str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.y_train.tolist() == train_labels and d.y_test.tolist() == [7, 8, 9]
    assert d.class_names == tuple(f"c{i}" for i in range(10))
    np.testing.assert_allclose(d.x_train.numpy(), _standardise(train, train), atol=1e-4)
    np.testing.assert_allclose(d.x_test.numpy(), _standardise(test, train), atol=1e-4)


def test_cifar10_without_meta_uses_standard_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072).astype(np.uint8)
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
        _pickle(folder / name, {b"data": data, b"labels": [0, 1, 2, 3]})
    d = load_dataset("cifar10", str(tmp_path))
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"


def test_cifar100_reader_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    _pickle(folder / "train", {b"data": train.reshape(6, 3072), b"fine_labels": [99, 0, 5, 5, 42, 1],
                               b"coarse_labels": [0] * 6})
    _pickle(folder / "test", {b"data": test.reshape(3, 3072), b"fine_labels": [3, 2, 1],
                              b"coarse_labels": [1] * 3})
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [b"x"] * 20})
    d = load_dataset("cifar100", str(tmp_path))
    assert d.num_classes == 100 and d.class_names[42] == "f42"
    assert d.y_train.tolist() == [99, 0, 5, 5, 42, 1] and d.y_test.tolist() == [3, 2, 1]
    np.testing.assert_allclose(d.x_test.numpy(), _standardise(test, train), atol=1e-4)


# --- availability and errors ----------------------------------------------

def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    missing = tmp_path / "no-debian"
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST_DIR", missing)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as err:
        check_available("fashion-mnist", str(root))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(root / "FashionMNIST" / "raw") in msg and str(missing) in msg
    assert "FashionMNIST/raw/" in msg and "download=true" in msg
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(root))
    # with download requested the files are expected to arrive at load time
    check_available("fashion-mnist", str(root), download=True)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_file_datasets_need_data_root(name):
    with pytest.raises(DataNotFoundError, match="data-root"):
        check_available(name, None)
    with pytest.raises(DataNotFoundError, match="data-root"):
        check_available(name, "", download=True)


def test_cifar_missing_lists_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar100", str(tmp_path))
    assert str(tmp_path / "cifar-100-python") in str(err.value)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_datasets_always_available(name):
    assert name in DATASET_NAMES
    check_available(name, None)


@pytest.mark.parametrize("fn", [check_available, load_dataset])
def test_unknown_name_raises_config_error(fn):
    with pytest.raises(ConfigError) as err:
        fn("imagenet")
    assert err.value.key == "dataset"
    assert "cifar100" in str(err.value) and "'imagenet'" in str(err.value)


class _Hostile:
    """Pickles as a call of ``open(path, "w")``: an unrestricted unpickler would create it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_cifar_batch_that_names_a_callable_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    planted = tmp_path / "planted"
    for b in range(5):
        _pickle(folder / f"data_batch_{b + 1}", {b"data": _Hostile(planted), b"labels": [0]})
    _pickle(folder / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(FedwaError, match="was refused and not loaded: it names .*open"):
        load_dataset("cifar10", str(tmp_path))
    assert not planted.exists()

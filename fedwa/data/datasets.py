"""Loading the supported image datasets into normalised in-memory tensors.

Besides the built-in names, ``dataset`` takes ``"npz"`` (a folder of ``train.npz`` and
``test.npz``, the files a SuperNode's ``data-dir`` holds) or an import path
``"module:function"`` naming the user's own loader (contract: :data:`LOADER_CONTRACT`,
:func:`load_dataset`). Their examples are used as given (not standardised), so a simulation and
a deployment reading the same files train on the same numbers.

Readers for IDX (MNIST, Fashion-MNIST) and the CIFAR python pickles are written
here rather than taken from torchvision: torchvision checks MD5 sums and fixed
file sizes, which rules out the Debian Fashion-MNIST package layout and the tiny
fixture files the tests write. torchvision is used only to download.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedwa.common.errors import ConfigError, DataNotFoundError, FedwaError
from fedwa.data.node import check_examples, read_npz
from fedwa.common.plugins import (accepts, has_parameter, is_import_path, load_callable,
                                  signature_text)

DATASET_NAMES = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic", "npz")

#: What a user's loader (``dataset = "module:function"``) must be; quoted in error messages.
LOADER_CONTRACT = ("an import path module:function naming a loader load() or load(data_root) "
                   "that returns (train, test, class_names), train and test each an (x, y) "
                   "pair of tensors or arrays or an in-memory torch Dataset of (x, y) items, "
                   "x floating point [n, C, H, W], y integer labels in 0..len(class_names)-1")
# The same, once the loader has been called: what its result must hold.
LOADER_SHORT = ("a loader returning (train, test, class_names) with x floating point "
                "[n, C, H, W] and y integer labels in 0..len(class_names)-1")
#: What ``dataset = "npz"`` needs in ``data-root``.
NPZ_CONTRACT = ("a folder holding train.npz and test.npz, each with arrays x (float32, "
                "[n, C, H, W]) and y (integer labels), for dataset = npz")

# Where the Debian/Ubuntu package `dataset-fashion-mnist` installs its files.
# A module-level constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGITS_TEST_PER_CLASS = 30
# Class means are N(0, 1) per pixel times this scale, noise is N(0, 1): with 64
# pixels a logistic regression reaches about 89% test accuracy (tuned by hand).
SYNTHETIC_MEAN_SCALE = 0.4


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory, already normalised.

    Instances returned by :func:`load_dataset` are shared through a cache:
    never modify their tensors in place (index them, which copies).

    Attributes
    ----------
    name : str
        One of :data:`DATASET_NAMES`, or the import path of a user's loader.
    x_train, x_test : torch.Tensor
        float32 images ``[N, C, H, W]``; for the built-in datasets each channel
        standardised with the training set's mean and standard deviation (``npz``
        and a user's loader: as given).
    y_train, y_test : torch.Tensor
        int64 labels ``[N]`` in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)``.
    class_names : tuple of str
        Human-readable name of each class, indexed by label.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an unsigned-byte IDX file (MNIST format), gzipped or not.

    Parameters
    ----------
    path : path-like
        The file; gzip compression is detected from its first bytes, not its name.

    Returns
    -------
    numpy.ndarray
        uint8 array shaped by the dimensions in the header.

    Raises
    ------
    FedwaError
        If the file is not a well-formed unsigned-byte IDX file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, then each dimension as a big-endian uint32.
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise FedwaError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise FedwaError(f"{path} is truncated or corrupt: header says {dims}, "
                         f"file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _standardised(name: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor,
                  y_test: np.ndarray, class_names: tuple[str, ...]) -> Dataset:
    """Standardise each channel (in place) with the training statistics; wrap in a Dataset."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    # A constant channel (only in toy fixtures) must not divide by zero.
    std = x_train.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-8)
    return Dataset(
        name=name,
        x_train=x_train.sub_(mean).div_(std),
        y_train=torch.as_tensor(np.asarray(y_train, dtype=np.int64)),
        x_test=x_test.sub_(mean).div_(std),
        y_test=torch.as_tensor(np.asarray(y_test, dtype=np.int64)),
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
        class_names=class_names,
    )


def _pixels(images: np.ndarray, shape: tuple[int, int, int], scale: float) -> torch.Tensor:
    # A fresh float32 copy: the source may be a read-only buffer, and the copy
    # is then safe to normalise in place (CIFAR-100 is 600 MB as float32).
    x = torch.from_numpy(np.array(images, dtype=np.float32).reshape(-1, *shape))
    return x.div_(scale)


def _digits_file() -> Path | None:
    """scikit-learn's copy of the UCI digits (``digits.csv.gz``), found without importing it.

    ``import sklearn.datasets`` costs 1.5-2.5 s here (scipy, pandas...): more than a small
    run's every round. ``find_spec`` of a top-level package only locates it.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as ``(images [n, 8, 8] float64 in 0..16, target [n] int64)``.

    The same arrays as ``sklearn.datasets.load_digits()``'s ``images`` and ``target``
    (tests/test_datasets_digits.py checks it), read from the file it reads: 65
    comma-separated numbers a row, the 64 pixels and the label.
    """
    path = _digits_file()
    if path is None:  # an unusual install: let scikit-learn find its own data
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _load_digits() -> Dataset:
    images, target = digits_arrays()
    # The test split uses its own fixed generator so it is the same in every run,
    # whatever the run seed: results across seeds are then comparable.
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(target == c))[:DIGITS_TEST_PER_CLASS] for c in range(10)
    ]))
    train = np.setdiff1d(np.arange(len(target)), test)
    return _standardised(
        "digits", _pixels(images[train], (1, 8, 8), 16.0), target[train],
        _pixels(images[test], (1, 8, 8), 16.0), target[test], tuple(str(c) for c in range(10)))


def _load_synthetic() -> Dataset:
    rng = np.random.default_rng(0)
    num_classes, dim = 10, 64
    means = rng.normal(size=(num_classes, dim)) * SYNTHETIC_MEAN_SCALE
    y_train = rng.permutation(np.repeat(np.arange(num_classes), 200))
    y_test = rng.permutation(np.repeat(np.arange(num_classes), 50))
    x_train = means[y_train] + rng.normal(size=(len(y_train), dim))
    x_test = means[y_test] + rng.normal(size=(len(y_test), dim))
    return _standardised(
        "synthetic", _pixels(x_train, (1, 8, 8), 1.0), y_train, _pixels(x_test, (1, 8, 8), 1.0),
        y_test, tuple(f"class_{c}" for c in range(num_classes)))


def _idx_dirs(name: str, root: Path | None) -> list[Path]:
    sub = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    if root is not None:
        # A data-root that is set is where the user says the files are: falling back to the
        # Debian copy would run on other files than the ones named, and say nothing.
        return [root / sub / "raw", root]
    return [DEBIAN_FASHION_MNIST_DIR] if name == "fashion-mnist" else []


def _find_idx_files(dirs: list[Path]) -> dict[str, Path] | None:
    """The first directory holding all four IDX files (each plain or .gz)."""
    for d in dirs:
        found = {}
        for base in IDX_FILES:
            hits = [p for p in (d / base, d / f"{base}.gz") if p.is_file()]
            if hits:
                found[base] = hits[0]
        if len(found) == len(IDX_FILES):
            return found
    return None


def _cifar_files(name: str, root: Path) -> list[Path]:
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        return [d / f"data_batch_{i}" for i in range(1, 6)] + [d / "test_batch"]
    d = root / "cifar-100-python"
    return [d / "train", d / "test"]


def _locate(name: str, root: Path | None) -> tuple[Any, list[Path]]:
    """Find a file-based dataset: (what was found or None, the paths tried)."""
    if name in ("fashion-mnist", "mnist"):
        dirs = _idx_dirs(name, root)
        return _find_idx_files(dirs), dirs
    if root is None:
        return None, []
    files = _cifar_files(name, root)
    return (files if all(p.is_file() for p in files) else None), [files[0].parent]


_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
           "cifar100": "CIFAR-100"}


def _not_found(name: str, root: Path | None, tried: list[Path]) -> DataNotFoundError:
    where = f" (looked in: {', '.join(str(p) for p in tried)})" if tried else ""
    head = f"{_PRETTY[name]} files not found{where}."
    unset = " data-root is not set: set it to the directory that holds the data." if root is None else ""
    download = " Or set download=true (with data-root set) where the network allows."
    if name == "fashion-mnist":
        how = (" Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the"
               f" four IDX files ({', '.join(IDX_FILES)}; .gz or not) in <data-root>/FashionMNIST/raw/.")
        if root is not None:
            # The fallback used to be silent; now it is refused, so say where it would be.
            have = ("is installed there" if _find_idx_files([DEBIAN_FASHION_MNIST_DIR])
                    else "is not installed")
            how = (f" The Debian package's copy in {DEBIAN_FASHION_MNIST_DIR} ({have}) is read "
                   "only when data-root is unset (data-root = '')." + how)
    elif name == "mnist":
        how = f" Put the four IDX files ({', '.join(IDX_FILES)}; .gz or not) in <data-root>/MNIST/raw/."
    else:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        how = (f" Extract the CIFAR python version ({folder}/, from "
               "https://www.cs.toronto.edu/~kriz/cifar.html) into <data-root>.")
    return DataNotFoundError(head + unset + how + download)


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST,
           "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    try:
        cls(str(root), train=True, download=True)
    except Exception as exc:  # network or checksum failure: the user has to act
        raise DataNotFoundError(f"downloading {_PRETTY[name]} into {root} failed: {exc}") from exc


def _load_idx(name: str, files: dict[str, Path]) -> Dataset:
    x_tr, y_tr, x_te, y_te = (read_idx(files[base]) for base in IDX_FILES)
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise FedwaError(f"{_PRETTY[name]} IDX files disagree: images {x.shape}, labels {y.shape}")
    shape = (1, *x_tr.shape[1:])
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple(str(c) for c in range(10))
    return _standardised(name, _pixels(x_tr, shape, 255.0), y_tr, _pixels(x_te, shape, 255.0),
                         y_te, names)


class _DataUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds: dicts, lists, bytes, numbers and numpy arrays.

    A pickle can name any callable and have it run; a file in someone's ``data-root`` is
    data, so every global but numpy's array reconstructors (the allow-list of
    :func:`fedwa.common.safe_load.legacy_numpy_names`) is refused before anything is built.
    """

    def find_class(self, module: str, name: str) -> Any:
        from fedwa.common.safe_load import legacy_numpy_names

        # Pickles written under numpy 1 name numpy.core; numpy 2 keeps it as an alias.
        canonical = f"{module.replace('numpy.core', 'numpy._core')}.{name}"
        allowed = {n.replace("numpy.core", "numpy._core") for n in legacy_numpy_names()}
        if canonical not in allowed and f"{module}.{name}" not in allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch "
                                         "holds (only numpy arrays and plain data)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise FedwaError(f"{path} was refused and not loaded: {err}; nothing in it ran") from None


def _load_cifar(name: str, files: list[Path]) -> Dataset:
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    batches = [_unpickle(p) for p in files]
    train, test = batches[:-1], batches[-1]
    # Rows are 3072 bytes: the R, G and B planes of a 32x32 image in turn.
    x_tr = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in train])
    y_tr = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in train])
    x_te = np.asarray(test[b"data"], dtype=np.uint8)
    y_te = np.asarray(test[label_key], dtype=np.int64)
    meta_file, meta_key = (("batches.meta", b"label_names") if name == "cifar10"
                           else ("meta", b"fine_label_names"))
    meta = files[0].parent / meta_file
    if meta.is_file():
        names = tuple(n.decode() for n in _unpickle(meta)[meta_key])
    elif name == "cifar10":
        names = CIFAR10_CLASSES
    else:
        names = tuple(str(c) for c in range(100))
    return _standardised(name, _pixels(x_tr, (3, 32, 32), 255.0), y_tr,
                         _pixels(x_te, (3, 32, 32), 255.0), y_te, names)


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES and not is_import_path(name):
        raise ConfigError("dataset", name, f"one of {', '.join(DATASET_NAMES)}, or " +
                          LOADER_CONTRACT)


# --- the user's own data: npz files or a loader function -------------------------------------


def _examples_of(part: Any, which: str) -> tuple[Any, Any]:
    """``(x, y)`` of a loader's train or test part: a pair, or an in-memory torch Dataset."""
    from torch.utils.data import Dataset as TorchDataset, TensorDataset

    if isinstance(part, (tuple, list)) and len(part) == 2:
        return part[0], part[1]
    if isinstance(part, TensorDataset) and len(part.tensors) == 2:
        return part.tensors
    if isinstance(part, TorchDataset) and hasattr(part, "__len__"):
        # A map-style dataset of (x, y) items (e.g. a torchvision dataset with ToTensor):
        # gathered once into tensors, since clients slice tensors held in memory.
        items = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
        if not items:
            raise FedwaError(f"the {which} Dataset is empty")
        first = items[0]
        if not (isinstance(first, (tuple, list)) and len(first) == 2
                and isinstance(first[0], (torch.Tensor, np.ndarray))):
            raise FedwaError(f"{which} items are {type(first).__name__}, expected "
                             "(x, y) pairs with x a tensor (add transform=ToTensor()?)")
        try:
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items])
        except (TypeError, ValueError, RuntimeError) as err:
            raise FedwaError(f"cannot stack the {which} items into tensors "
                             f"({' '.join(str(err).split())})") from None
        return x, y
    raise FedwaError(f"{which} is a {type(part).__name__}; expected an (x, y) pair "
                     "or an in-memory torch Dataset")


def _user_dataset(name: str, train: tuple[Any, Any], test: tuple[Any, Any],
                  class_names: Any, where: tuple[str, str]) -> Dataset:
    """Check a user's examples with the SuperNode rules and wrap them, as given, in a Dataset.

    ``where`` names the train and the test part in messages."""
    if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__len__"):
        raise FedwaError(f"class_names is a {type(class_names).__name__}; expected a "
                         "sequence of names, one per class")
    names = tuple(str(n) for n in class_names)
    if not names:
        raise FedwaError("class_names is empty")
    x_train, y_train = check_examples(*train, where[0], len(names))
    x_test, y_test = check_examples(*test, where[1], len(names), tuple(x_train.shape[1:]))
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=len(names),
                   input_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
                   class_names=names)


def _load_loader(name: str, data_root: str | None) -> Dataset:
    """Call the user's loader ``module:function`` and check what it returns."""
    fn, _ = load_callable("dataset", name, LOADER_CONTRACT)
    kwargs = {"data_root": data_root} if has_parameter(fn, "data_root") else {}
    if not accepts(fn, **kwargs):
        raise ConfigError("dataset", name, f"{LOADER_CONTRACT}; {signature_text(fn)} needs "
                          "other arguments")
    result = fn(**kwargs)
    try:
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise FedwaError(f"it returned a {type(result).__name__}"
                             + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
                             + ", not (train, test, class_names)")
        train, test, class_names = result
        return _user_dataset(name, _examples_of(train, "train"), _examples_of(test, "test"),
                             class_names, ("train", "test"))
    except FedwaError as err:
        raise ConfigError("dataset", name, f"{LOADER_SHORT}; here {err}") from None


def npz_files(data_root: str | None) -> tuple[Path, Path]:
    """``train.npz`` and ``test.npz`` of the ``npz`` dataset's folder, checked to exist.

    Raises
    ------
    ConfigError
        Key ``data-root``: unset, not a folder, or a file is missing.
    """
    root = _root(data_root)
    if root is None:
        raise ConfigError("data-root", "", NPZ_CONTRACT + "; data-root is not set")
    if not root.is_dir():
        raise ConfigError("data-root", str(data_root), f"{NPZ_CONTRACT}; {root} is not a folder")
    files = (root / "train.npz", root / "test.npz")
    for path in files:
        if not path.is_file():
            raise ConfigError("data-root", str(data_root), f"{NPZ_CONTRACT}; {root} has no "
                              f"{path.name}")
    return files


def _load_npz(data_root: str | None) -> Dataset:
    train_file, test_file = npz_files(data_root)
    try:
        train, test = read_npz(train_file), read_npz(test_file)
        if "class_names" in train:
            class_names: Any = [str(n) for n in np.asarray(train["class_names"]).ravel()]
        else:
            # Without names the labels define the classes: 0 .. the largest label seen.
            highest = max((int(np.max(a["y"], initial=0)) for a in (train, test)
                           if np.issubdtype(np.asarray(a["y"]).dtype, np.integer)), default=0)
            class_names = [str(c) for c in range(highest + 1)]
        return _user_dataset("npz", (train["x"], train["y"]), (test["x"], test["y"]),
                             class_names, (str(train_file), str(test_file)))
    except FedwaError as err:
        raise ConfigError("data-root", str(data_root), f"{NPZ_CONTRACT}; here {err}") from None


def data_stamp(name: str, data_root: str | None) -> float:
    """Newest mtime of the npz files (0 otherwise): rewritten files must not come from cache."""
    if name != "npz" or not data_root:
        return 0.0
    root = Path(os.path.expanduser(data_root))
    files = (root / "train.npz", root / "test.npz")
    return max((p.stat().st_mtime for p in files if p.is_file()), default=0.0)


def _root(data_root: str | None) -> Path | None:
    # An empty string is how an unset data-root arrives from a run config.
    return Path(os.path.expanduser(data_root)) if data_root else None


def check_available(name: str, data_root: str | None = None, download: bool = False) -> None:
    """Check, without loading anything, that a dataset can be loaded.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    data_root : str or None
        Directory holding the dataset files (see :func:`load_dataset`).
    download : bool
        If true and `data_root` is set, missing files count as available since
        :func:`load_dataset` will download them; the network is not checked.

    Raises
    ------
    ConfigError
        If `name` is not a known dataset (key ``dataset``).
    DataNotFoundError
        If the files are missing; the message lists where fedwa looked and how
        to get them.
    """
    _check_name(name)
    if name in ("digits", "synthetic") or is_import_path(name):
        return  # a loader can only be checked by calling it (load_dataset does)
    if name == "npz":
        npz_files(data_root)
        return
    root = _root(data_root)
    found, tried = _locate(name, root)
    if found is None and not (download and root is not None):
        raise _not_found(name, root, tried)


def load_dataset(name: str, data_root: str | None = None, download: bool = False) -> Dataset:
    """Load a dataset, normalised, into memory.

    Results are cached per process on ``(name, data_root, download)`` (and the npz files'
    modification times), so the returned tensors are shared: callers must not modify them
    in place.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`, or ``"module:function"``. ``digits``
        (scikit-learn) and ``synthetic`` need no files. ``fashion-mnist`` and
        ``mnist`` read IDX files from ``<data_root>/FashionMNIST/raw/``
        (``MNIST/raw/``) or `data_root` itself; Fashion-MNIST with `data_root` unset
        from :data:`DEBIAN_FASHION_MNIST_DIR` (only then: a `data_root` without the files
        is an error, not a silent switch to other files). ``cifar10`` and ``cifar100`` read
        ``<data_root>/cifar-10-batches-py/`` and ``<data_root>/cifar-100-python/``.

        ``npz`` reads ``<data_root>/train.npz`` and ``<data_root>/test.npz``: arrays
        ``x`` (floating point, ``[n, C, H, W]``) and ``y`` (integer labels), and
        optionally ``class_names`` (strings) in ``train.npz``; without it the classes are
        ``0 .. max(y)``. These are the files a SuperNode's ``data-dir`` holds
        (:mod:`fedwa.data.node`), checked by the same rules.

        ``module:function`` calls the user's loader: ``function()``, or
        ``function(data_root=...)`` when it takes a ``data_root`` parameter (the
        ``data-root`` key, ``None`` when unset). It returns ``(train, test,
        class_names)``: ``train`` and ``test`` each an ``(x, y)`` pair of torch tensors
        or numpy arrays, or an in-memory map-style torch ``Dataset`` whose items are
        ``(x, y)`` (a ``TensorDataset``, a torchvision dataset with ``ToTensor``);
        ``x`` floating point ``[n, C, H, W]`` and finite, ``y`` integer labels in
        ``0 .. len(class_names) - 1``; ``class_names`` a sequence of names, one per
        class. Examples are used as given: normalise them in the loader. The loader
        runs once per process (the result is cached), in every process that needs
        the data, so it must return the same examples every time (seed it).
    data_root : str or None
        Directory holding dataset files; ``None`` or ``""`` means unset.
    download : bool
        Download missing files into `data_root` with torchvision.

    Returns
    -------
    Dataset
        Pixels scaled to [0, 1] and then each channel standardised with the
        mean and standard deviation of the full training set.

    Raises
    ------
    ConfigError
        If `name` is unknown (key ``dataset``), a user's loader cannot be imported, called
        or returns examples that break the rules (key ``dataset``), or the npz files are
        missing or malformed (key ``data-root``).
    DataNotFoundError
        If the files are missing (and not downloaded).
    """
    _check_name(name)
    return _load_cached(name, data_root, download, data_stamp(name, data_root))


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, data_root: str | None, download: bool, stamp: float) -> Dataset:
    if is_import_path(name):
        return _load_loader(name, data_root or None)
    if name == "npz":
        return _load_npz(data_root)
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        return _load_synthetic()
    root = _root(data_root)
    found, tried = _locate(name, root)
    if found is None and download and root is not None:
        _download(name, root)
        found, tried = _locate(name, root)
    if found is None:
        raise _not_found(name, root, tried)
    return _load_idx(name, found) if name in ("fashion-mnist", "mnist") else _load_cifar(name, found)

# my_data.py
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset


def load():
    """scikit-learn's 8x8 digits: a fixed 300 for testing, the rest for training."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [n, 1, 8, 8]
    y = torch.tensor(digits.target)  # int64 labels 0..9
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    test, train = order[:300], order[300:]
    x = (x - x[train].mean()) / x[train].std()  # normalise with training statistics
    class_names = [str(c) for c in range(10)]
    return (x[train], y[train]), (x[test], y[test]), class_names


def load_datasets(data_root=None):
    """The same as in-memory torch Datasets; a loader may take the run's data-root."""
    (x_train, y_train), (x_test, y_test), class_names = load()
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), class_names

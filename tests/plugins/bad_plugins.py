"""Broken plug-ins: each breaks one rule of the model or dataset contract (tests only)."""

import numpy as np
import torch
from torch import nn

from my_data import load


# --- models ---

def returns_a_dict(input_shape, num_classes):
    return {"not": "a module"}


def takes_one_argument(input_shape):
    return nn.Linear(1, 1)


def wrong_number_of_outputs(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes + 1))


def wrong_input_size(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))


class Residual(nn.Module):
    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.conv1(x).relu()
        h = (h + self.conv2(h)).relu()  # a residual sum: no automatic spec
        return self.classifier(self.pool(h).flatten(1))


def residual(input_shape, num_classes):
    return Residual(input_shape[0], num_classes)


NOT_CALLABLE = 3


# --- datasets ---

def _split():
    (x, y), (xt, yt), names = load()
    return x, y, xt, yt, names


def uint8_images():
    x, y, xt, yt, names = _split()
    return (x.to(torch.uint8), y), (xt.to(torch.uint8), yt), names


def float_labels():
    x, y, xt, yt, names = _split()
    return (x, y.float()), (xt, yt.float()), names


def labels_out_of_range():
    x, y, xt, yt, names = _split()
    return (x, y), (xt, yt), names[:5]  # labels reach 9, but only 5 class names


def lengths_differ():
    x, y, xt, yt, names = _split()
    return (x, y[:-1]), (xt, yt), names


def two_things():
    x, y, xt, yt, names = _split()
    return (x, y), (xt, yt)


def needs_arguments(a, b):
    return load()


def flat_images():
    x, y, xt, yt, names = _split()
    return (x.flatten(1), y), (xt.flatten(1), yt), names


def write_int_npz(folder):
    (x, y), (xt, yt), _ = load()
    np.savez(folder / "train.npz", x=(x.numpy() * 10).astype(np.int64), y=y.numpy())
    np.savez(folder / "test.npz", x=(xt.numpy() * 10).astype(np.int64), y=yt.numpy())

"""The embedded digits are read without importing scikit-learn, and are its very arrays."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from fedwa.data.datasets import _digits_file, digits_arrays


def test_digits_arrays_are_sklearns() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = digits_arrays()
    assert _digits_file() is not None  # the fast path ran, not the fallback to sklearn
    assert images.dtype == bunch.images.dtype and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, bunch.images)
    assert target.dtype == np.int64
    np.testing.assert_array_equal(target, bunch.target)


def test_loading_digits_does_not_import_sklearn() -> None:
    # A fresh interpreter: this test process may have imported sklearn already.
    code = ("import sys; from fedwa.data.datasets import load_dataset; "
            "d = load_dataset('digits'); "
            "print(len(d.y_train) + len(d.y_test), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1797", "False"]

# write_npz.py
import sys
from pathlib import Path

import numpy as np

from my_data import load


def write_npz(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, y_test), class_names = load()
    np.savez(folder / "train.npz", x=x_train.numpy(), y=y_train.numpy(),
             class_names=np.array(class_names))  # class_names is optional
    np.savez(folder / "test.npz", x=x_test.numpy(), y=y_test.numpy())
    return folder


if __name__ == "__main__":
    write_npz(sys.argv[1] if len(sys.argv) > 1 else "my_npz")

"""Test-wide settings: Flower and Ray stay offline, quiet and inside a temporary folder."""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="fedwa-tests-")
for name, value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_HOME": os.path.join(_HOME, "flwr"),
    "RAY_TMPDIR": os.path.join(_HOME, "ray"),
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(name, value)
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

"""The README's ``flwr run . local`` command, verbatim, from a clean shell: nothing exported but
PATH and a fresh HOME and FLWR_HOME, on the flwr that pip installs (1.42). The run must finish
and write its results folder; the test then stops the local SuperLink by its PID."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_command() -> str:
    text = (REPO / "docs" / "usage.md").read_text()
    start = text.index("Flower's own entry point works on the same app")
    (command,) = re.findall(r"```bash\n(.*?)```", text[start:text.index("- **The variable.**",
                                                                          start)], re.S)
    return command


def superlink_pids(flwr_home: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"{flwr_home}/local-superlink"], capture_output=True,
                           text=True)
    return [int(p) for p in found.stdout.split()]


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to find the SuperLink")
def test_the_readmes_flwr_run_command_works_from_a_clean_shell(tmp_path: Path) -> None:
    command = readme_command()
    assert command.startswith("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local")
    app = tmp_path / "fedwa"  # the repository without its results, as a user's checkout
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(
        ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache"))
    home = tmp_path / "home"
    home.mkdir()
    flwr_home = home / ".flwr"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
           "HOME": str(home), "FLWR_HOME": str(flwr_home)}
    try:
        done = subprocess.run(["bash", "-c", command], cwd=app, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        (run_dir,) = (app / "runs").iterdir()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 10
        assert json.loads((run_dir / "config.json").read_text())["strategy"] == "fedprox"
    finally:
        for pid in superlink_pids(flwr_home):
            os.kill(pid, signal.SIGTERM)

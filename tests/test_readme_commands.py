"""README and docs commands of the plug-in paths, run verbatim in a shell: Flower's strategies by
import path (with strategy-args and a DP wrapper), and the custom-model example of
docs/plugins.md, whose code blocks are the modules under tests/plugins/ byte for byte."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
EXAMPLES = {"custom-model-example": "my_model.py", "custom-spec-example": "my_residual.py",
            "custom-dataset-example": "my_data.py", "npz-example": "write_npz.py"}


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start:end if end > 0 else None]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("index", [0, 1])
def test_the_readmes_flower_strategy_commands_run_verbatim(tmp_path: Path, index: int) -> None:
    readme = (REPO / "docs" / "strategies.md").read_text()
    blocks = bash_blocks(section(readme, "### Flower's strategies by import path"))
    assert len(blocks) == 2, "the section's two commands (QFedAvg, a DP wrapper) moved"
    done = run_shell(blocks[index], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final accuracy" in done.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoint.pt").is_file()


def test_the_docs_examples_are_the_tested_plugin_modules() -> None:
    docs = (REPO / "docs" / "plugins.md").read_text()
    for marker, module in EXAMPLES.items():
        match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", docs, re.S)
        assert match, f"docs/plugins.md lost its {marker}"
        assert match.group(1) == (PLUGINS / module).read_text(), module


def test_the_custom_model_command_runs_verbatim(tmp_path: Path) -> None:
    """The README's command, in a folder holding the docs' my_model.py (the module beside it
    is found through PYTHONPATH=., as the README says)."""
    readme = (REPO / "docs" / "usage.md").read_text()
    (command,) = bash_blocks(section(readme, "## Your own model and your own data"))
    (tmp_path / "my_model.py").write_text((PLUGINS / "my_model.py").read_text())
    done = run_shell(command, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final accuracy" in done.stdout

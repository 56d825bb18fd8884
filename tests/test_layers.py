"""The import graph of fedwa/ and strategies/ is a stack of layers: a module imports only its
own layer and the layers below it, no module imports, directly or through others, a module that
imports it back, and ``fedwa.core`` (the math) and ``fedwa.common`` import no Flower.

Every import counts, the ones inside functions too: a lazy import still ties the two modules
together for a reader and for a refactor.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedwa import LAYERS  # bottom to top; fedwa itself holds only this list and the aliases

REPO = Path(__file__).resolve().parents[1]
#: Usable, and tested, without Flower.
NO_FLOWER = ("fedwa.common", "fedwa.core", "fedwa.models")


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the layer a module belongs to."""
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS or move it into one")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("fedwa", "strategies"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> other top-level packages it imports)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps, other = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                mod = owner(target)
                if mod is not None:
                    deps.add(mod)
                elif target == targets[0]:
                    other.add(target.split(".")[0])
        deps.discard(name)
        graph[name], outside[name] = deps, other
    return graph, outside


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_cycle_finder_finds_a_cycle_and_only_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert cycle_through(graph, "d") is None


def test_no_module_imports_itself_back() -> None:
    graph, _ = import_graph()
    cycles = [" -> ".join(c) for c in (cycle_through(graph, m) for m in sorted(graph)) if c]
    assert not cycles, cycles


def test_layer_finder_places_modules_and_refuses_strays() -> None:
    assert layer_of("fedwa.core.averaging") == LAYERS.index("fedwa.core")
    assert layer_of("strategies.swa") == LAYERS.index("strategies")
    assert layer_of("fedwa.cli") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("fedwa.corex")


def test_every_module_imports_only_its_layer_and_those_below() -> None:
    graph, _ = import_graph()
    upward = [f"{module} ({LAYERS[layer_of(module)]}) imports {dep} ({LAYERS[layer_of(dep)]})"
              for module in sorted(graph) if module != "fedwa"
              for dep in sorted(graph[module])
              if dep != "fedwa" and layer_of(dep) > layer_of(module)]
    assert not upward, upward


def test_fedwa_itself_imports_nothing_of_its_own() -> None:
    graph, _ = import_graph()
    assert graph["fedwa"] == set()


@pytest.mark.parametrize("layer", NO_FLOWER)
def test_the_lower_layers_reach_no_flower(layer: str) -> None:
    graph, outside = import_graph()
    starts = [m for m in graph if m == layer or m.startswith(layer + ".")]
    assert starts
    for start in starts:
        reached, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)
        flower = sorted(m for m in reached if "flwr" in outside[m])
        assert not flower, f"{start} reaches Flower through {flower}"


def test_importing_the_core_loads_no_flower() -> None:
    """Beyond the static graph: a fresh interpreter that imports every core module has no
    ``flwr`` in ``sys.modules`` (torch and numpy do not pull it in either)."""
    core = sorted(p.stem for p in (REPO / "fedwa" / "core").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import fedwa.core.{name}\n" for name in core)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the old flat paths ---------------------------------------------------------------------------


def test_every_old_flat_path_is_the_moved_module_itself() -> None:
    import fedwa

    assert len(fedwa.MOVED) >= 30
    for old, new in fedwa.MOVED.items():
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), old
        assert importlib.import_module(old) is importlib.import_module(new), old


def test_old_paths_work_in_from_imports_and_attribute_patches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedwa.averaging import weighted_average  # noqa: F401 - the old path imports
    import fedwa.core.averaging as moved
    import fedwa.server_app

    assert fedwa.server_app.app is importlib.import_module("fedwa.apps.server_app").app
    monkeypatch.setattr("fedwa.averaging.weighted_average", "patched")
    assert moved.weighted_average == "patched"


def test_a_flower_component_on_an_old_path_loads(tmp_path: Path) -> None:
    """``fedwa.server_app:app`` in a user's pyproject, loaded the way Flower loads one."""
    from flwr.supercore.object_ref import load_app
    from flwr.serverapp import ServerApp

    from fedwa.apps.server_app import app

    assert load_app("fedwa.server_app:app", ValueError, str(REPO)) is app
    assert isinstance(app, ServerApp)


def test_python_m_runs_a_moved_module_under_its_old_name() -> None:
    out = subprocess.run([sys.executable, "-m", "fedwa.linkguard", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--seal-file" in out.stdout


def test_a_plug_in_written_against_the_flat_layout_still_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's residual model with its own permutation spec (tests/plugins/my_residual.py),
    as a user wrote it before the layers: ``from fedwa.alignment import SpecBuilder``. DIMAT's
    checks build the model and look its spec up; the spec must be the moved module's own
    class, or the lookup refuses it."""
    source = (REPO / "tests" / "plugins" / "my_residual.py").read_text()
    assert "from fedwa.core.alignment import SpecBuilder" in source
    (tmp_path / "flat_residual.py").write_text(
        source.replace("from fedwa.core.alignment import", "from fedwa.alignment import"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from fedwa.core.alignment import PermutationSpec, permutation_spec
    from fedwa.run.compose import compose
    from fedwa.run.config import resolve_config

    parts = compose(resolve_config({"dataset": "digits", "model": "flat_residual:make_net",
                                    "strategy": "dimat", "num-clients": 3,
                                    "output-dir": str(tmp_path)}))
    assert isinstance(permutation_spec(parts.model), PermutationSpec)
    assert type(parts.model).__module__ == "flat_residual"


def test_a_reimported_fedwa_keeps_one_alias_finder() -> None:
    """The ClientApp worker drops fedwa from sys.modules and imports an app bundle's copy."""
    code = ("import sys, importlib\n"
            "import fedwa\n"
            "for m in [m for m in sys.modules if m.split('.')[0] == 'fedwa']: del sys.modules[m]\n"
            "import fedwa\n"
            "finders = [f for f in sys.meta_path if type(f).__name__ == '_MovedModuleFinder']\n"
            "import fedwa.keys, fedwa.common.keys\n"
            "print(len(finders), type(finders[0]).find_spec.__globals__ is vars(fedwa),"
            " fedwa.keys is fedwa.common.keys, sys.meta_path[-1] is finders[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "True", "True"]

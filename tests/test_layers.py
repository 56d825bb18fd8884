"""The import graph of fedwa/ and strategies/ is a tree of layers: no module imports, directly
or through others, a module that imports it back, and the pure math imports no Flower.

Every import counts, the ones inside functions too: a lazy import still ties the two modules
together for a reader and for a refactor.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Math over tensors and state dicts: usable, and tested, without Flower.
PURE = ("fedwa.averaging", "fedwa.bn", "fedwa.twa", "fedwa.wsa", "fedwa.partial",
        "fedwa.late_phase", "fedwa.shadow", "fedwa.alignment", "fedwa.topology",
        "fedwa.metrics", "fedwa.training", "fedwa.batched", "fedwa.keys")


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


def test_the_pure_math_imports_no_flower() -> None:
    graph, outside = import_graph()
    for start in PURE:
        reached, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)
        flower = sorted(m for m in reached if "flwr" in outside[m])
        assert not flower, f"{start} reaches Flower through {flower}"

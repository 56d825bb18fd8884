"""Which calls of one `fedwa run` go up a layer, and which enter the ServerApp module (issue #19).

Runs a small ``fedwa run`` (digits, mlp, 3 clients, 2 rounds) under a profiler and records every
distinct call edge between two fedwa modules (caller function -> callee function). Module names
are mapped to today's layers (``tests/test_layers.py``), the flat names of the code from before
the layers through ``fedwa.MOVED``, so both layouts are counted alike. Prints one JSON line:
the edges, the ones that go to a higher layer, and the ones that enter the ServerApp module.

A call that goes up a layer is not an import that does: a function handed down and called
back (a strategy's hooks called by the round loop, ``evaluate_fn``) is one too.

    python -P simulations/trace_layers.py                  # this checkout
    PYTHONPATH=/tmp/old python -P simulations/trace_layers.py   # another checkout's code
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parents[1]
SERVER_APP = "fedwa.apps.server_app"


def layer_tables() -> tuple[tuple[str, ...], dict[str, str]]:
    """``fedwa.LAYERS`` and ``fedwa.MOVED`` of the code under test, else this checkout's (code
    from before the layers has neither)."""
    import fedwa

    if hasattr(fedwa, "MOVED"):
        return tuple(fedwa.LAYERS), dict(fedwa.MOVED)
    namespace: dict[str, Any] = {}
    source = (HERE / "fedwa" / "__init__.py").read_text()
    exec(source.split("class _MovedModuleLoader")[0], namespace)  # noqa: S102 - our own file
    return tuple(namespace["LAYERS"]), dict(namespace["MOVED"])


def main() -> None:
    layers, moved = layer_tables()

    def layer(module: str) -> int | None:
        module = moved.get(module, module)
        for index, name in enumerate(layers):
            if module == name or module.startswith(name + "."):
                return index
        return None

    edges: set[tuple[str, str, str, str]] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "")
        if callee != caller and layer(callee) is not None and layer(caller) is not None:
            edges.add((moved.get(caller, caller), frame.f_back.f_code.co_name,
                       moved.get(callee, callee), frame.f_code.co_name))

    from fedwa.cli import main as cli_main

    argv = ["run", "--quiet", "--set", "dataset=digits", "--set", "model=mlp",
            "--set", "num-clients=3", "--set", "num-server-rounds=2", "--set", "local-steps=2",
            "--set", f"output-dir={tempfile.mkdtemp(prefix='fedwa-trace-')}"]
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        code = cli_main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    upward = sorted(e for e in edges if layer(e[2]) > layer(e[0]))  # type: ignore[operator]
    into_server = sorted(e for e in edges if e[2] == SERVER_APP and e[0] != SERVER_APP)
    print(json.dumps({"exit_code": code, "edges": len(edges), "upward": len(upward),
                      "into_server_app": len(into_server),
                      "upward_edges": [f"{a}.{b} -> {c}.{d}" for a, b, c, d in upward],
                      "into_server_app_edges": [f"{a}.{b} -> {c}.{d}"
                                                for a, b, c, d in into_server]}))


if __name__ == "__main__":
    main()

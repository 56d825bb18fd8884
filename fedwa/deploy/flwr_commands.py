"""The ``flwr`` CLI against the deployment's SuperLink (its Control API).

:func:`write_connection` writes the one connection into a private ``FLWR_HOME``;
:func:`flwr_cli` runs ``flwr`` in its own session; :func:`register_supernode` and
:func:`online_supernodes` wrap ``flwr supernode register`` and ``flwr supernode list``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedwa.deploy.credentials import Credentials
from fedwa.deploy.processes import DeployError, _kill_group, _last_line, _strip_ansi

CONNECTION_NAME = "fedwa-deploy"


def write_connection(flwr_home: Path, address: str, credentials: Credentials | None,
                     name: str = CONNECTION_NAME) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, the default one.

    The flwr 1.41 format is ``[superlink] default = "<name>"`` and ``[superlink.<name>]`` with
    ``address`` (the SuperLink's Control API, here its single port) and either
    ``root-certificates`` (an absolute path) or ``insecure = true``.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if credentials is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{credentials.ca_cert}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 120.0,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI in its own session (so a timeout kills all of it)."""
    proc = subprocess.Popen(["flwr", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**env, "COLUMNS": "200"},
                            cwd=str(cwd) if cwd else None, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DeployError(f"`flwr {args[0]}` did not finish within {timeout:.0f}s") from None
    finally:
        _kill_group(proc.pid, signal.SIGKILL)  # nothing it started may outlive it
    return subprocess.CompletedProcess(proc.args, proc.returncode, _strip_ansi(out), "")


def _json_tail(text: str) -> Any:
    """The JSON object that ``flwr ... --format json`` prints (after any other output)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def register_supernode(public_key: Path, env: Mapping[str, str],
                       connection: str = CONNECTION_NAME) -> int:
    """Register a SuperNode public key with the SuperLink (Control API); return its node id."""
    res = flwr_cli(["supernode", "register", str(public_key), connection, "--format", "json"],
                   env)
    data = _json_tail(res.stdout)
    if res.returncode != 0 or not isinstance(data, dict) or not data.get("success"):
        raise DeployError(f"registering {public_key.name} failed: {_last_line(res.stdout)}")
    return int(data["node-id"])


def online_supernodes(env: Mapping[str, str], connection: str = CONNECTION_NAME) -> int:
    """Number of SuperNodes the SuperLink reports online (``flwr supernode list``)."""
    res = flwr_cli(["supernode", "list", connection, "--format", "json"], env, timeout=60)
    data = _json_tail(res.stdout)
    if not isinstance(data, dict):
        return 0
    nodes = data.get("nodes") or []
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

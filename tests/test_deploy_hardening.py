"""A deployment admits only the operator and the SuperNodes it registered, and leaves nothing.

The findings these reproduce (issue #17, sections 1 and 5): a process that reached the
SuperLink's one port could register its own SuperNode key through the Control API and be
averaged in; after ``kill -9`` of ``fedwa deploy run`` seven processes kept running with the
TLS port open; without ``--workdir`` the folder holding the private keys stayed behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedwa.deploy import (Deployment, DeployError, child_env, free_port,
                          make_credentials, online_supernodes, processes_with_env,
                          register_supernode, start_superlink, wait_for_port)
from fedwa.deploy.linkguard import OperatorOnly, is_local_peer

PROJECT = Path(__file__).resolve().parents[1]
MISSING = [exe for exe in ("flower-superlink", "flower-supernode", "flwr")
           if shutil.which(exe) is None]
deployment = pytest.mark.skipif(
    bool(MISSING), reason=f"Flower's deployment executables are not on PATH: {MISSING}")


# --- the guard, as an ASGI application ---------------------------------------------------------


def _call(guard: OperatorOnly, path: str, client: tuple[str, int] | None) -> int:
    """Status the guard answers for a POST to ``path`` from ``client`` (200: passed through)."""
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - the wrapped SuperLink
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    guard.app = app
    scope = {"type": "http", "method": "POST", "path": path, "client": client}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize(("path", "host", "status"), [
    ("/v1/control/register-node", "203.0.113.7", 403),  # the rogue registration
    ("/v1/control/list-runs", "203.0.113.7", 403),
    ("/v1/runtime/acquire-task", "203.0.113.7", 403),  # would hand it the ServerApp's task
    ("/openapi.json", "203.0.113.7", 403),
    ("/v1/something-new", "203.0.113.7", 403),  # an allow-list: unknown routes stay closed
    ("//v1/control/register-node", "203.0.113.7", 403),
    ("/health", "203.0.113.7", 200),
    ("/v1/fleet/activate-node", "203.0.113.7", 200),  # SuperNodes elsewhere keep working
    ("/v1/fleet/pull-messages", "203.0.113.7", 200),
    ("/v1/control/register-node", "127.0.0.1", 200),  # the operator, before the seal
    ("/v1/control/list-runs", "127.0.0.9", 200),  # all of 127/8 is loopback
    ("/v1/control/list-runs", "::1", 200),
    ("/v1/control/list-runs", "::ffff:127.0.0.1", 200),
    ("/v1/control/list-runs", "::ffff:203.0.113.7", 403),
    ("/v1/control/list-runs", "not-an-address", 403),
])
def test_the_control_and_runtime_apis_answer_this_machine_only(
        path: str, host: str, status: int) -> None:
    lines: list[str] = []
    guard = OperatorOnly(None, bound_host="0.0.0.0", log=lines.append)
    assert _call(guard, path, (host, 50000)) == status
    assert len(lines) == (status == 403)
    if lines:
        assert lines[0].startswith(f"fedwa.deploy.linkguard: refused: {path} answers this machine "
                                   f"only (the operator's): {host} is not")


def test_a_peer_without_an_address_is_refused() -> None:
    assert _call(OperatorOnly(None, log=lambda _: None), "/v1/control/list-runs", None) == 403


def test_the_bound_address_counts_as_this_machine_but_not_the_wildcard() -> None:
    assert is_local_peer("10.1.2.3", "10.1.2.3")
    assert not is_local_peer("10.1.2.4", "10.1.2.3")
    assert not is_local_peer("0.0.0.0", "0.0.0.0")
    assert not is_local_peer("10.1.2.3", "0.0.0.0")
    assert not is_local_peer("10.1.2.3", None)


def test_once_sealed_registration_is_refused_even_on_loopback(tmp_path: Path) -> None:
    seal = tmp_path / "registration.sealed"
    lines: list[str] = []
    guard = OperatorOnly(None, seal_file=seal, log=lines.append)
    assert _call(guard, "/v1/control/register-node", ("127.0.0.1", 1)) == 200
    seal.touch()
    assert _call(guard, "/v1/control/register-node", ("127.0.0.1", 1)) == 403
    assert _call(guard, "/v1/control/unregister-node", ("127.0.0.1", 1)) == 403
    assert _call(guard, "/v1/control/list-runs", ("127.0.0.1", 1)) == 200  # the rest stays
    assert "registration is closed" in lines[0]


# --- on a real SuperLink -----------------------------------------------------------------------


@deployment
def test_a_rogue_registration_on_loopback_is_refused(tmp_path: Path) -> None:
    with Deployment(tmp_path / "work", 1) as d:
        d.start(timeout=120)
        # The tester's attack: register a key of one's own through the Control API...
        rogue = make_credentials(tmp_path / "rogue", 1).supernode_keys[0]
        with pytest.raises(DeployError, match="registering supernode-0.pub failed"):
            register_supernode(rogue[1], d.env)
        # ...then join with it.
        node = d.start_supernode(0, private_key=rogue[0], name="rogue")
        deadline = time.monotonic() + 60
        while node.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not node.alive(), "the rogue SuperNode is still running after 60 s"
        assert "Failed to activate SuperNode" in node.log_text()
        assert online_supernodes(d.env) == 1  # only the registered one
        log = d.superlink.log_text()
    assert "fedwa.deploy.linkguard: refused: /v1/control/register-node: this deployment's " \
           "SuperNodes are registered and registration is closed" in log


def _own_address() -> str | None:
    """A non-loopback IPv4 address of this machine, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@deployment
def test_a_superlink_on_all_interfaces_refuses_the_control_api_to_other_hosts(
        tmp_path: Path) -> None:
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    creds = make_credentials(tmp_path / "creds", 1, hosts=[address])
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    link = start_superlink(port, tmp_path / "superlink.log", child_env(home), creds,
                           host="0.0.0.0")
    try:
        wait_for_port(port, proc=link)
        context = ssl.create_default_context(cafile=str(creds.ca_cert))

        def post(path: str, source: str) -> tuple[int, bytes]:
            # A connection from `address` to `address` is what another host's looks like,
            # as far as the peer address goes (the guard allows the bound address, not
            # the wildcard).
            conn = http.client.HTTPSConnection(address, port, context=context, timeout=10,
                                               source_address=(source, 0))
            try:
                conn.request("POST", path, body=b"", headers={
                    "content-type": "application/protobuf"})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        status, body = post("/v1/control/register-node", address)
        assert status == 403, body
        assert f"{address} is not" in json.loads(body)["detail"]
        assert post("/v1/runtime/acquire-task", address)[0] == 403
        assert post("/v1/fleet/get-run", address)[0] != 403  # Flower answers (its own error)
    finally:
        link.stop()
    assert f"refused: /v1/control/register-node answers this machine only (the operator's): " \
           f"{address} is not" in (tmp_path / "superlink.log").read_text()


# --- processes and files of `fedwa deploy run` -------------------------------------------------


def _deploy_run(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedwa.deploy", "run", "--supernodes", "1",
           "--output-dir", str(tmp_path / "runs"), *extra]
    return subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)


@deployment
def test_every_child_dies_with_a_killed_launcher(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _deploy_run(tmp_path, "--workdir", str(work), "--run-config",
                       "num-server-rounds=50 model='mlp' local-steps=5")
    home = str(work / "flwr_home")
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "deployment up" in line:
                break
        assert any("deployment up" in ln for ln in lines), "".join(lines)
        time.sleep(3)  # the run is submitted and a ServerApp is starting
        before = processes_with_env("FLWR_HOME", home)
        assert len(before) >= 3
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: no handler, no cleanup
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_with_env("FLWR_HOME", home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with_env("FLWR_HOME", home) == [], (
            f"{len(before)} processes before the kill; still running 30 s after it")
    finally:
        for pid in processes_with_env("FLWR_HOME", home):  # leave nothing behind on failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@deployment
@pytest.mark.e2e
def test_without_workdir_the_temporary_folder_and_its_keys_are_removed(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = _deploy_run(tmp_path, "--run-config", "num-server-rounds=1 model='mlp' local-steps=2",
                       env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "results: " in out
    assert list(tmp.glob("fedwa-deploy-*")) == [], out


# --- the README's multi-machine SuperLink, verbatim ---------------------------------------------


def _readme_deploy_blocks() -> list[str]:
    import re

    text = (PROJECT / "docs" / "deployment.md").read_text()
    start = text.index("## Deploy on real machines")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end if end > 0 else None], re.S)


@deployment
def test_the_readmes_superlink_commands_run_verbatim(tmp_path: Path) -> None:
    blocks = _readme_deploy_blocks()
    credentials = next(b for b in blocks if "fedwa deploy credentials" in b)
    superlink = next(b for b in blocks if "fedwa deploy superlink" in b)
    listing = next(b for b in blocks if "flwr supernode list" in b and "FLWR_HOME" in b)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(["bash", "-c", credentials], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    link = subprocess.Popen(["bash", "-c", f"exec {superlink.strip()}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert link.stdout is not None
        first = link.stdout.readline()
        assert "SuperLink up on 0.0.0.0:9093" in first and "3 SuperNode keys registered, " \
            "registration closed" in first, first + link.stdout.read()
        listed = subprocess.run(["bash", "-c", listing], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert listed.stdout.count("registered") >= 3, listed.stdout
        home = str(tmp_path / "slwork" / "flwr_home")
        assert processes_with_env("FLWR_HOME", home)
        link.send_signal(signal.SIGTERM)
        rest, _ = link.communicate(timeout=60)
        assert link.returncode == 130, rest
        assert processes_with_env("FLWR_HOME", home) == []
    finally:
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGKILL)
            link.wait()

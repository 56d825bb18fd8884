"""fedwa through Flower's Deployment Engine on 127.0.0.1: credentials, a real run, SuperNode auth.

The deployment tests start real ``flower-superlink`` / ``flower-supernode`` processes on free
loopback ports with TLS and SuperNode authentication on, and check that every process they
started is gone afterwards. They are skipped when Flower's executables are not on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedwa.deploy import (Credentials, Deployment, DeployError, format_run_config, main,
                          make_credentials, online_supernodes, parse_run_config_keys,
                          processes_with_env)
from fedwa.callbacks.results import read_rounds

PROJECT = Path(__file__).resolve().parents[1]
MISSING = [exe for exe in ("flower-superlink", "flower-supernode", "flwr")
           if shutil.which(exe) is None]
deployment = pytest.mark.skipif(
    bool(MISSING), reason=f"Flower's deployment executables are not on PATH: {MISSING}")

# Small and quick: a tiny model, few local steps. Accuracy still rises over 2 rounds.
RUN = {"strategy": "fedavg", "num-server-rounds": 2, "dataset": "digits", "num-clients": 2,
       "model": "mlp", "local-steps": 5}


# --- credentials -------------------------------------------------------------------------------


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_verifies_against_the_ca_with_loopback_sans(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path / "creds", 2, hosts=("10.0.0.5", "link.example"))
    ca, server = _load_cert(creds.ca_cert), _load_cert(creds.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                          "10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
def test_a_tls_client_trusting_the_ca_accepts_the_server(tmp_path: Path,
                                                         server_name: str) -> None:
    # A real handshake with hostname checking, as Flower's clients do against the SuperLink.
    creds = make_credentials(tmp_path / "creds", 0)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    client_ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
        thread.join(10)
    assert not errors


def test_private_key_files_are_0600_and_the_folder_0700(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path / "creds", 3)
    private = [creds.ca_key, creds.server_key] + [priv for priv, _ in creds.supernode_keys]
    assert len(private) == 5
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(creds.directory.stat().st_mode) == 0o700


def test_supernode_keys_are_in_the_format_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    creds = make_credentials(tmp_path / "creds", 2)
    seen = set()
    for priv, pub in creds.supernode_keys:
        # flower-supernode --auth-supernode-private-key: an OpenSSH EC private key
        key = load_ssh_private_key(priv.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp384r1"
        # flwr supernode register: Flower's own loader, which exits on a bad key
        assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(pub) == public_key_to_bytes(key.public_key())
        seen.add(pub.read_bytes())
    assert len(seen) == 2  # one distinct key pair per SuperNode


def test_credentials_command_and_reload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["credentials", str(tmp_path / "c"), "--supernodes", "2"]) == 0
    assert "supernode-1.pub" in capsys.readouterr().out
    assert len(Credentials.load(tmp_path / "c").supernode_keys) == 2
    # Fewer keys on a second call: the stale pair is removed, not silently reused.
    make_credentials(tmp_path / "c", 1)
    assert len(Credentials.load(tmp_path / "c").supernode_keys) == 1
    with pytest.raises(DeployError, match="lacks"):
        Credentials.load(tmp_path / "empty")


def test_run_config_round_trip() -> None:
    text = format_run_config({"strategy": "fedavg", "num-server-rounds": 2, "lr": 0.05,
                              "download": False, "output-dir": "/a b/runs"})
    assert text == ('strategy="fedavg" num-server-rounds=2 lr=0.05 download=false '
                    'output-dir="/a b/runs"')
    assert parse_run_config_keys(text)["output-dir"] == "/a b/runs"


def test_insecure_refuses_supernode_auth(tmp_path: Path) -> None:
    from fedwa.deploy import start_superlink

    with pytest.raises(DeployError, match="needs TLS"):
        start_superlink(1, tmp_path / "x.log", dict(os.environ), None, auth=True)


# --- real deployments --------------------------------------------------------------------------


def _assert_all_gone(d: Deployment, pids: list[int]) -> None:
    assert pids, "nothing was started"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the direct children were waited for, so not even zombies
    assert d.leftover_pids() == []


@deployment
@pytest.mark.e2e
@pytest.mark.parametrize("isolation", ["subprocess", "process"])
def test_fedavg_runs_on_a_tls_authenticated_loopback_deployment(tmp_path: Path,
                                                                isolation: str) -> None:
    with Deployment(tmp_path / "work", 2, isolation=isolation) as d:
        assert d.credentials is not None and d.auth  # TLS and SuperNode auth are the default
        d.start(timeout=120)
        pids = list(d.pids)
        # SuperLink, its ServerApp executor, 2 SuperNodes (and their 2 ClientApp workers)
        assert len(pids) == (6 if isolation == "process" else 4)
        seen: list[list[str]] = []
        stop = threading.Event()
        watcher = _when_round(tmp_path / "runs", 1, lambda _: seen.extend(
            _command_lines("flwr-serverapp")), stop)
        try:
            run_dir = d.run_app(RUN, project_dir=PROJECT, output_dir=tmp_path / "runs",
                                timeout=240)
        finally:
            stop.set()
            watcher.join()
        superlink_log = d.superlink.log_text()
    _assert_all_gone(d, pids)

    assert run_dir.parent == (tmp_path / "runs").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    rounds = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    assert rounds[2]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[2]["clients_ok"] == 2
    assert "running on https://127.0.0.1:" in superlink_log  # TLS, loopback only
    assert "Activated node_id" in superlink_log
    # The ServerApp ran with its run token in a 0600 file, not on its command line (which
    # every user can read in /proc); Flower's own launcher passes `--token <token>`.
    assert seen, "no flwr-serverapp process was running at round 1"
    for argv in seen:
        assert "--token" not in argv and "--token-file" in argv, argv


def _command_lines(program: str) -> list[list[str]]:
    """Command lines of the running processes whose program is ``program``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv]
        if any(Path(w).name == program for w in words[:2]):
            found.append(words)
    return found


def _wait_exit(proc, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not proc.alive()


@deployment
def test_unknown_supernodes_are_refused(tmp_path: Path) -> None:
    with Deployment(tmp_path / "work", 1) as d:
        d.start(timeout=120)
        # A SuperNode without a key makes one up and asks to be registered (Fleet API).
        keyless = d.start_supernode(1, name="keyless", with_key=False)
        # A SuperNode with a valid key that was never registered through the Control API.
        stranger_key = make_credentials(tmp_path / "stranger", 1).supernode_keys[0][0]
        stranger = d.start_supernode(1, private_key=stranger_key, name="stranger")
        for proc in (keyless, stranger):
            assert _wait_exit(proc, 60), f"{proc.name} is still running after 60 s"
            assert proc.popen.returncode != 0
        assert "must be registered" in keyless.log_text()
        assert "Failed to activate SuperNode" in stranger.log_text()
        assert "No SuperNode found with the given public key" in d.superlink.log_text()
        assert online_supernodes(d.env) == 1  # only the registered one
        pids = list(d.pids)
    _assert_all_gone(d, pids)


@deployment
def test_without_auth_the_keyless_supernode_joins(tmp_path: Path) -> None:
    # The control for the test above: the same SuperNode is accepted once auth is off.
    with Deployment(tmp_path / "work", 1, auth=False) as d:
        d.start(timeout=120)
        keyless = d.start_supernode(1, name="keyless", with_key=False)
        d.wait_online(2, timeout=60)
        assert keyless.alive()
        pids = list(d.pids)
    _assert_all_gone(d, pids)


@deployment
def test_the_launcher_stops_everything_on_sigterm(tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "fedwa.deploy", "run", "--supernodes", "2", "--workdir",
           str(work), "--output-dir", str(tmp_path / "runs"),
           "--run-config", "num-server-rounds=50 model='mlp' local-steps=5"]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "deployment up" in line or time.monotonic() > deadline:
                break
        assert any("deployment up" in ln for ln in lines), "".join(lines)
        time.sleep(3)  # the run is submitted and a ServerApp is starting
        home = str(work / "flwr_home")
        assert processes_with_env("FLWR_HOME", home)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, "".join(lines) + rest
        assert "every started process was stopped" in rest
        assert processes_with_env("FLWR_HOME", home) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- faults and resume on a real deployment ---------------------------------------------------


def _when_round(out: Path, server_round: int, action, stop: threading.Event) -> threading.Thread:
    """Run ``action`` once a run under ``out`` has recorded ``server_round``."""
    def watch() -> None:
        while not stop.is_set():
            for run_dir in out.glob("*"):
                if any(r.get("round", -1) >= server_round for r in read_rounds(run_dir)):
                    action(run_dir)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@deployment
@pytest.mark.e2e
def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    config = {**RUN, "num-clients": 3, "num-server-rounds": 4, "round-timeout": 30.0}
    stop = threading.Event()
    with Deployment(tmp_path / "work", 3, isolation="process") as d:
        d.start(timeout=120)
        killed = []
        watcher = _when_round(out, 1, lambda _: (d.supernodes[2].kill(), killed.append(1)),
                              stop)
        try:
            run_dir = d.run_app(config, project_dir=PROJECT, output_dir=out, timeout=400)
        finally:
            stop.set()
            watcher.join()
        pids = list(d.pids)
    _assert_all_gone(d, pids)
    assert killed == [1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 4
    rounds = read_rounds(run_dir)
    assert rounds[1]["clients_ok"] == 3
    # After the kill the dead node is either no longer listed or times out; the others go on.
    assert rounds[-1]["clients_ok"] == 2
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


@deployment
@pytest.mark.e2e
def test_a_deployment_stopped_mid_run_resumes_to_the_simulations_metrics(
        tmp_path: Path) -> None:
    from fedwa.cli import simulate
    from fedwa.run.config import resolve_config

    out = tmp_path / "runs"
    out.mkdir()
    config = {**RUN, "num-server-rounds": 4, "checkpoint-min-seconds": 0.0}
    stop = threading.Event()
    with Deployment(tmp_path / "work1", 2, isolation="process") as d:
        d.start(timeout=120)
        # Everything goes down once round 2 is recorded, the SuperLink and its ServerApp
        # first: a ServerApp that outlived its SuperNodes would finish round 3 without them
        # (as it should), and the run would then differ from the simulation.
        watcher = _when_round(out, 2, lambda _: (d.superlink.stop(), d.stop()), stop)
        with pytest.raises(DeployError):
            d.run_app(config, project_dir=PROJECT, output_dir=out, timeout=400)
        stop.set()
        watcher.join()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert not (run_dir / "summary.json").exists() or json.loads(
        (run_dir / "summary.json").read_text())["status"] == "failed"

    with Deployment(tmp_path / "work2", 2, isolation="process") as d:
        d.start(timeout=120)
        resumed = d.run_app({"resume": str(run_dir)}, project_dir=PROJECT, timeout=400)
        pids = list(d.pids)
    _assert_all_gone(d, pids)
    assert resumed == run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"][0]["after_round"] >= 2

    reference = tmp_path / "simulated"
    reference.mkdir()
    simulate(resolve_config({**config, "output-dir": str(tmp_path)}), reference,
             show_progress=False, plot=False)
    timing = {"seconds", "client_train"}
    got = [{k: v for k, v in r.items() if k not in timing} for r in read_rounds(run_dir)]
    want = [{k: v for k, v in r.items() if k not in timing} for r in read_rounds(reference)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        differing = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not differing, f"round {a['round']}: deployed vs simulated {differing}"


def test_fedwa_deploy_validates_the_config_before_starting_anything(
        capsys: pytest.CaptureFixture) -> None:
    from fedwa.cli import main as fedwa_main

    assert fedwa_main(["deploy", "run", "--supernodes", "2", "--set", "lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedwa.deploy: error: config key 'lr' = -1.0 is not allowed: a number > 0")
    assert fedwa_main(["deploy", "run", "--supernodes", "2", "--set", "num-clients=3"]) == 2
    assert "2, the number of SuperNodes" in capsys.readouterr().err
    assert fedwa_main(["deploy", "run", "--supernodes", "2", "--output-dir", "/tmp/x",
                       "--set", "output-dir=/tmp/y"]) == 2
    assert "--output-dir" in capsys.readouterr().err

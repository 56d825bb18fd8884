"""Run fedwa through Flower's Deployment Engine: one SuperLink and N SuperNodes on this machine.

``python -m fedwa.deploy credentials OUT_DIR --supernodes N`` writes a CA, a server certificate
for the SuperLink and one SuperNode authentication key pair per SuperNode.

``python -m fedwa.deploy run [--supernodes N] ...`` starts a ``flower-superlink`` and N
``flower-supernode`` processes on 127.0.0.1 (free ports, TLS and SuperNode authentication on
by default), submits the app with ``flwr run``, waits for fedwa's ``summary.json`` and stops
every process it started, by process group, whatever happens.

The same steps are exposed as functions (:func:`make_credentials`, :func:`start_superlink`,
:func:`start_supernode`, :func:`start_clientapp_worker`, :func:`free_port`, :class:`Deployment`)
for tests and for scripts that want to, e.g., kill one SuperNode in the middle of a run.

``--isolation process`` replaces the SuperNode's own per-message ``flwr-clientapp`` launcher
by :func:`clientapp_worker`: a long-lived process per SuperNode that imports torch and the
app's third-party dependencies once and forks a ready child for every message. Flower 1.41
has no long-lived ClientApp process of its own: every ``flwr-clientapp`` serves exactly one
task and exits (``flwr/supernode/runtime/run_clientapp.py``); its "warm executors" exist only
for the Kubernetes executor and the agent/model/connector task types.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedwa.common.errors import ConfigError, FedwaError
from fedwa.deploy.parent_death import die_with_parent

LOOPBACK = "127.0.0.1"
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
CONNECTION_NAME = "fedwa-deploy"
PROJECT_DIR = Path(__file__).resolve().parents[2]

# Quiet and offline for every child; FLWR_HOME is added per deployment so that nothing lands in
# the user's ~/.flwr (installed FABs, connections) and parallel deployments do not share state.
FLOWER_CHILD_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec polls its Runtime API for new tasks once a second by default; every message
    # waits for that poll on both the SuperLink (ServerApp) and the SuperNode side.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


class DeployError(RuntimeError):
    """A deployment step failed; the message is one line for the user."""


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Paths of the files written by :func:`make_credentials`.

    Attributes
    ----------
    directory : Path
        The folder holding every file.
    ca_cert, ca_key : Path
        The self-signed CA certificate (PEM) and its private key (PEM, mode 0600).
    server_cert, server_key : Path
        The SuperLink's certificate, signed by the CA, and its private key (mode 0600).
    supernode_keys : tuple of (Path, Path)
        Per SuperNode: the private key (OpenSSH format, mode 0600) given to
        ``flower-supernode --auth-supernode-private-key`` and the public key (OpenSSH
        ``ecdsa-sha2-nistp384 ...`` line) given to ``flwr supernode register``.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: tuple[tuple[Path, Path], ...]

    @classmethod
    def load(cls, directory: str | Path) -> Credentials:
        """Find the files of :func:`make_credentials` in ``directory``."""
        d = Path(directory).resolve()
        keys = []
        i = 0
        while (d / f"supernode-{i}.key").exists():
            keys.append((d / f"supernode-{i}.key", d / f"supernode-{i}.pub"))
            i += 1
        creds = cls(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key",
                    tuple(keys))
        missing = [p for p in (creds.ca_cert, creds.server_cert, creds.server_key)
                   if not p.exists()]
        if missing:
            raise DeployError(f"credentials folder {d} lacks {missing[0].name}; "
                              "create it with `python -m fedwa.deploy credentials DIR`")
        return creds


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start, so the key is never world-readable."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # umask cannot widen it, but an odd umask could narrow it oddly


def _san_entries(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    entries: list[Any] = []
    for host in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_credentials(out_dir: str | Path, num_supernodes: int,
                     hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 365) -> Credentials:
    """Write a CA, a SuperLink server certificate and SuperNode authentication key pairs.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created, mode 0700). Existing files of the same names are
        replaced.
    num_supernodes : int
        Number of SuperNode key pairs (``supernode-<i>.key`` / ``supernode-<i>.pub``).
    hosts : sequence of str
        Names and IP addresses the SuperLink is reached at; they become the server
        certificate's subject alternative names. 127.0.0.1 and localhost are always added,
        because SuperExec processes reach the SuperLink's and SuperNodes' Runtime API there.
    days : int
        Validity of the certificates.

    Returns
    -------
    Credentials
        The paths written.

    Notes
    -----
    Flower 1.41's SuperNode authentication uses elliptic-curve keys on a NIST curve
    (``flwr supernode register`` loads an OpenSSH public key and rejects other curves;
    ``flower-supernode`` loads an OpenSSH private key). We use P-384, the curve Flower's
    documentation names. TLS keys are P-256 ECDSA, which every TLS stack accepts.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if num_supernodes < 0:
        raise ValueError("num_supernodes must be >= 0")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)
    pem = serialization.Encoding.PEM

    def pkcs8(key: Any) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    # CA
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedwa deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # Server certificate for the SuperLink (and the SuperNodes' Runtime API)
    all_hosts = list(DEFAULT_HOSTS) + [h for h in hosts if h not in DEFAULT_HOSTS]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san_entries(all_hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _write_private(out / "ca.key", pkcs8(ca_key))
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    _write_private(out / "server.key", pkcs8(server_key))
    (out / "server.pem").write_bytes(server_cert.public_bytes(pem))

    keys = []
    for i in range(num_supernodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"supernode-{i}.key", out / f"supernode-{i}.pub"
        _write_private(priv, node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
        pub.write_bytes(node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        keys.append((priv, pub))
    # Drop key pairs left over from an earlier, larger call: Credentials.load counts them.
    i = num_supernodes
    while (out / f"supernode-{i}.key").exists():
        (out / f"supernode-{i}.key").unlink()
        with contextlib.suppress(FileNotFoundError):
            (out / f"supernode-{i}.pub").unlink()
        i += 1
    return Credentials(out, out / "ca.pem", out / "ca.key", out / "server.pem",
                       out / "server.key", tuple(keys))


# --- processes ---------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it).

    There is a short race until the caller binds it; :class:`Deployment` retries a start whose
    port was taken meanwhile.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for every child: ours, then a private FLWR_HOME, then ``extra``."""
    env = dict(os.environ)
    env.update(FLOWER_CHILD_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


@dataclass
class Managed:
    """One started process: its Popen object, its log file and a label for messages."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The child's PID, which is also its process-group id (it leads its own session)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the direct child still runs."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """The log so far (decoded leniently)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child and everything it started: SIGTERM, then SIGKILL after ``timeout``.

        Signals go to the child's process group and to the groups of its descendants. Both
        matter: a SuperNode's ``flower-superexec`` and ``flwr-clientapp`` processes stay in the
        SuperNode's group, but the SuperLink starts its ``flower-superexec`` in a new session
        (and so its ``flwr-serverapp`` too); killing only the SuperLink's group leaves a
        ServerApp running, re-parented to init, until its parent watchdog notices.
        """
        groups = self._groups(set())
        for pgid in groups:
            _kill_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            groups = self._groups(groups)  # a process may have started meanwhile
            if self.popen.poll() is not None and not any(map(_group_alive, groups)):
                break
            time.sleep(0.05)
        for pgid in self._groups(groups):
            _kill_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=2)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _groups(self, known: set[int]) -> set[int]:
        """Process groups to signal: the child's, the known ones, and those its descendants lead."""
        groups = {self.pid} | known
        table = process_table()
        for pid in descendants(self.pid, table):
            pgid = table[pid][1]
            if pgid == pid or pgid in groups:  # never signal a group we do not own
                groups.add(pgid)
        return groups

    def kill(self) -> None:
        """SIGKILL the whole group at once (to simulate a crash)."""
        _kill_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_table() -> dict[int, tuple[int, int, str]]:
    """``{pid: (ppid, pgid, state)}`` of every process, from /proc (empty elsewhere)."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int, table: Mapping[int, tuple[int, int, str]] | None = None) -> set[int]:
    """PIDs whose parent chain leads to ``root`` (orphans re-parented to init are lost)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group_members(pgid: int) -> list[int]:
    """PIDs currently in process group ``pgid`` (read from /proc; empty elsewhere); zombies
    are already dead."""
    return [pid for pid, (_, group, state) in process_table().items()
            if group == pgid and state != "Z"]


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs (not zombies) whose environment has ``name=value`` (from /proc; own user only)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        pids.append(int(entry.name))
    return pids


def spawn(name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str],
          cwd: str | Path | None = None) -> Managed:
    """Start ``argv`` in its own session (so its whole group can be signalled), logging to a file.

    Parameters
    ----------
    name : str
        Label used in messages.
    argv : sequence of str
        The command.
    log_path : Path
        stdout and stderr go here.
    env : mapping
        Full environment of the child.
    cwd : path, optional
        Working folder (default: the log's folder, so stray files land in the workdir).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - closed by Managed.stop
    popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=dict(env),
                             cwd=str(cwd or log_path.parent), start_new_session=True,
                             preexec_fn=die_with_parent(os.getpid()))
    return Managed(name, popen, log_path, log)




def wait_for_port(port: int, host: str = LOOPBACK, timeout: float = 60.0,
                  proc: Managed | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises
    ------
    DeployError
        If ``proc`` exits first or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise DeployError(f"{proc.name} exited with status {proc.popen.returncode} while "
                              f"starting; last log line: {_last_line(proc.log_text())}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise DeployError(f"nothing listened on {host}:{port} within {timeout:.0f}s")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in _strip_ansi(text).splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def start_superlink(port: int, log_path: Path, env: Mapping[str, str],
                    credentials: Credentials | None, *, auth: bool = True,
                    database: Path | None = None, host: str = LOOPBACK,
                    seal_file: Path | None = None,
                    superexec_secret: Path | None = None) -> Managed:
    """Start ``flower-superlink`` on ``host:port`` (Fleet, Control and Runtime APIs).

    It runs under :mod:`fedwa.deploy.linkguard`: the Control and Runtime APIs answer this machine
    only, and SuperNode registration closes once ``seal_file`` exists.

    Parameters
    ----------
    port : int
        The one HTTP port of Flower 1.42's SuperLink.
    log_path : Path
        Where its output goes.
    env : mapping
        Child environment (see :func:`child_env`).
    credentials : Credentials or None
        TLS material; None starts it with ``--insecure`` (loopback only).
    auth : bool
        ``--enable-supernode-auth`` (requires TLS): only registered public keys may join.
    database : Path, optional
        SQLite file for the SuperLink's state (default: in memory).
    host : str
        Address to listen on (default 127.0.0.1; ``0.0.0.0`` for SuperNodes on other machines).
    seal_file : Path, optional
        See :class:`fedwa.deploy.linkguard.OperatorOnly`.
    superexec_secret : Path, optional
        Start in ``process`` isolation, handing ServerApp tasks only to a launcher holding
        this shared secret: :func:`start_serverapp_executor`, which keeps the run token off
        ``flwr-serverapp``'s command line. None: Flower's own launcher (``subprocess``).
    """
    guard = [sys.executable, "-m", "fedwa.deploy.linkguard"]
    if seal_file is not None:
        guard += ["--seal-file", str(seal_file)]
    argv = [*guard, "--", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if credentials is None:
        if auth:
            raise DeployError("SuperNode authentication needs TLS; drop --insecure")
        argv.append("--insecure")
    else:
        argv += ["--ssl-certfile", str(credentials.server_cert),
                 "--ssl-keyfile", str(credentials.server_key),
                 "--ssl-ca-certfile", str(credentials.ca_cert)]
        if auth:
            argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    if superexec_secret is not None:
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    return spawn("superlink", argv, log_path, env)


def start_serverapp_executor(superlink_address: str, log_path: Path, env: Mapping[str, str],
                             credentials: Credentials | None, secret: Path,
                             token_dir: Path) -> Managed:
    """Start :mod:`fedwa.deploy.serverapp_executor` for a SuperLink started with ``superexec_secret``."""
    argv = [sys.executable, "-m", "fedwa.deploy.serverapp_executor", "--runtime-api-address",
            superlink_address, "--superexec-auth-secret-file", str(secret),
            "--token-dir", str(token_dir)]
    if credentials is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(credentials.ca_cert)]
    return spawn("serverapp-executor", argv, log_path, env, cwd=PROJECT_DIR)


def start_supernode(index: int, num_partitions: int, superlink_address: str, port: int,
                    log_path: Path, env: Mapping[str, str], credentials: Credentials | None,
                    *, private_key: Path | None = None, isolation: str = "subprocess",
                    extra_node_config: str = "") -> Managed:
    """Start ``flower-supernode`` number ``index`` with its partition in ``--node-config``.

    Parameters
    ----------
    index, num_partitions : int
        Become ``partition-id`` and ``num-partitions`` of the node config.
    superlink_address : str
        ``host:port`` of the SuperLink.
    port : int
        The SuperNode's own Runtime API port (ClientApp processes connect to it).
    log_path : Path
        Where its output goes.
    env : mapping
        Child environment.
    credentials : Credentials or None
        None: ``--insecure`` everywhere. Otherwise the SuperNode verifies the SuperLink with
        the CA and serves its own Runtime API over TLS with the same server certificate
        (its SANs cover 127.0.0.1).
    private_key : Path, optional
        SuperNode authentication key (``--auth-supernode-private-key``).
    isolation : {"subprocess", "process"}
        ``process``: the SuperNode launches no ClientApp itself; start
        :func:`start_clientapp_worker` (or ``flower-superexec``) against its Runtime API.
    extra_node_config : str
        More ``key=value`` pairs for ``--node-config``.
    """
    node_config = f"partition-id={index} num-partitions={num_partitions} {extra_node_config}"
    argv = ["flower-supernode", "--superlink", superlink_address, "--host", LOOPBACK,
            "--port", str(port), "--isolation", isolation,
            "--node-config", node_config.strip()]
    if credentials is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(credentials.ca_cert),
                 "--ssl-certfile", str(credentials.server_cert),
                 "--ssl-keyfile", str(credentials.server_key),
                 "--ssl-ca-certfile", str(credentials.ca_cert)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    return spawn(f"supernode-{index}", argv, log_path, env)


def start_clientapp_worker(runtime_address: str, log_path: Path, env: Mapping[str, str],
                           credentials: Credentials | None, name: str = "worker",
                           mode: str = "inprocess") -> Managed:
    """Start :func:`clientapp_worker` (a long-lived ClientApp process) for one SuperNode.

    ``runtime_address`` is the SuperNode's Runtime API (its ``--port``); ``mode`` is
    ``inprocess`` or ``fork`` (see :func:`clientapp_worker`).
    """
    argv = [sys.executable, "-m", "fedwa.deploy", "clientapp-worker",
            "--runtime-api-address", runtime_address, "--mode", mode]
    if credentials is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(credentials.ca_cert)]
    return spawn(name, argv, log_path, env, cwd=PROJECT_DIR)


# --- flwr CLI ----------------------------------------------------------------------------------


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


# --- deployment --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, stopped (by process group) on exit.

    Use as a context manager; ``start()`` brings everything up and waits until every SuperNode
    is online, ``stop()`` (also called by ``__exit__``) ends every process started.

    Parameters
    ----------
    workdir : Path
        Holds logs, ``flwr_home`` (a private FLWR_HOME) and generated credentials.
    num_supernodes : int
        SuperNodes to start, partition ids 0..N-1.
    credentials : Credentials or None
        TLS and SuperNode keys; None generates them into ``workdir/credentials`` unless
        ``insecure``.
    insecure : bool
        Plain HTTP and no SuperNode authentication (loopback only).
    auth : bool
        SuperNode authentication (ignored when insecure).
    isolation : {"subprocess", "process"}
        ``process`` starts one :func:`clientapp_worker` per SuperNode.
    worker_mode : {"inprocess", "fork"}
        How that worker runs tasks.
    """

    workdir: Path
    num_supernodes: int = 2
    credentials: Credentials | None = None
    insecure: bool = False
    auth: bool = True
    isolation: str = "subprocess"
    worker_mode: str = "inprocess"
    #: Where the SuperLink listens, and on which port (None: a free one on 127.0.0.1).
    host: str = LOOPBACK
    port: int | None = None
    processes: list[Managed] = field(default_factory=list)
    superlink: Managed | None = None
    supernodes: list[Managed] = field(default_factory=list)
    workers: list[Managed] = field(default_factory=list)
    superlink_address: str = ""
    startup_seconds: float = 0.0
    serverapp_executor: Managed | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr_home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.flwr_home, 0o700)
        self.logs = self.workdir / "logs"
        self.seal_file = self.flwr_home / "registration.sealed"
        self.seal_file.unlink(missing_ok=True)
        # The SuperLink hands ServerApp tasks only to the executor holding this (0600).
        self.superexec_secret = self.flwr_home / "superexec.secret"
        self.superexec_secret.unlink(missing_ok=True)
        from fedwa.deploy.serverapp_executor import write_private

        write_private(self.superexec_secret, secrets.token_hex(32))
        if self.isolation not in ("subprocess", "process"):
            raise DeployError(f"isolation must be subprocess or process, not {self.isolation!r}")
        if self.insecure:
            self.credentials, self.auth = None, False
        elif self.credentials is None:
            self.credentials = make_credentials(self.workdir / "credentials", self.num_supernodes)
        if (self.auth and self.credentials is not None
                and len(self.credentials.supernode_keys) < self.num_supernodes):
            raise DeployError(f"{self.credentials.directory} holds "
                              f"{len(self.credentials.supernode_keys)} SuperNode keys, "
                              f"{self.num_supernodes} needed")
        self.env = child_env(self.flwr_home)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """PIDs (= process groups) of every process started, in start order."""
        return [p.pid for p in self.processes]

    def _track(self, proc: Managed) -> Managed:
        self.processes.append(proc)
        return proc

    def start(self, timeout: float = 120.0) -> Deployment:
        """Start the SuperLink, register the keys, start the SuperNodes, wait until online."""
        t0 = time.monotonic()
        self.start_link()
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        self.wait_online(self.num_supernodes, timeout=timeout)
        self.startup_seconds = time.monotonic() - t0
        return self

    def start_link(self) -> Managed:
        """Start the SuperLink, register the first ``num_supernodes`` keys, close registration."""
        proc = self.start_superlink()
        if self.auth and self.credentials is not None:
            for _, pub in self.credentials.supernode_keys[: self.num_supernodes]:
                register_supernode(pub, self.env)
            # Only the keys above may ever join: registration closes, loopback included.
            self.seal_file.touch(mode=0o600)
        return proc

    def start_superlink(self, attempts: int = 3) -> Managed:
        """Start the SuperLink on ``port`` or a free one (retrying if another process took it).

        The ``flwr`` connection and the ServerApp executor dial 127.0.0.1 (the Control and
        Runtime APIs answer this machine only), or the bound address if it is a specific one.
        """
        local = LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host
        for attempt in range(1 if self.port else attempts):
            port = self.port or free_port()
            proc = self._track(start_superlink(port, self.logs / "superlink.log", self.env,
                                               self.credentials, auth=self.auth,
                                               host=self.host, seal_file=self.seal_file,
                                               superexec_secret=self.superexec_secret))
            try:
                wait_for_port(port, host=local, proc=proc)
            except DeployError:
                proc.stop()
                if attempt == attempts - 1 or self.port:
                    raise
                continue
            self.superlink, self.superlink_address = proc, f"{local}:{port}"
            write_connection(self.flwr_home, self.superlink_address, self.credentials)
            self.serverapp_executor = self._track(start_serverapp_executor(
                self.superlink_address, self.logs / "serverapp-executor.log", self.env,
                self.credentials, self.superexec_secret, self.flwr_home / "tokens"))
            return proc
        raise AssertionError("unreachable")

    def start_supernode(self, index: int, private_key: Path | None = None,
                        name: str | None = None, with_key: bool = True) -> Managed:
        """Start SuperNode ``index`` (and its ClientApp worker in process isolation).

        ``private_key`` overrides the key of ``credentials`` (e.g. an unregistered one);
        ``with_key=False`` starts it without any key: Flower's SuperNode then makes up a key
        pair and asks the SuperLink to register it, which only a SuperLink without
        ``--enable-supernode-auth`` accepts.
        """
        if not with_key:
            private_key = None
        elif private_key is None and self.auth and self.credentials is not None:
            private_key = self.credentials.supernode_keys[index][0]
        port = free_port()
        label = name or f"supernode-{index}"
        proc = self._track(start_supernode(
            index, self.num_supernodes, self.superlink_address, port,
            self.logs / f"{label}.log", self.env, self.credentials,
            private_key=private_key, isolation=self.isolation))
        proc.name = label
        self.supernodes.append(proc)
        if self.isolation == "process":
            wait_for_port(port, proc=proc)
            self.workers.append(self._track(start_clientapp_worker(
                f"{LOOPBACK}:{port}", self.logs / f"{label}-worker.log", self.env,
                self.credentials, name=f"{label}-worker", mode=self.worker_mode)))
        return proc

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        """Wait until the SuperLink reports ``count`` SuperNodes online."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.processes:
                if not proc.alive() and proc in self.supernodes + [self.superlink]:
                    raise DeployError(f"{proc.name} exited (status {proc.popen.returncode}): "
                                      f"{_last_line(proc.log_text())}")
            if online_supernodes(self.env) >= count:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"fewer than {count} SuperNodes came online within "
                                  f"{timeout:.0f}s; logs in {self.logs}")
            time.sleep(0.5)

    def submit(self, project_dir: str | Path, run_config: str) -> int:
        """``flwr run PROJECT CONNECTION --run-config ...``; return the run id."""
        args = ["run", str(project_dir), CONNECTION_NAME, "--format", "json"]
        if run_config.strip():
            args += ["--run-config", run_config]
        res = flwr_cli(args, self.env, timeout=300, cwd=self.workdir)
        data = _json_tail(res.stdout)
        if res.returncode != 0 or not isinstance(data, dict) or not data.get("success", True) \
                or "run-id" not in data:
            raise DeployError(f"`flwr run` failed: {_last_line(res.stdout)}")
        return int(data["run-id"])

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``running``, ``finished:failed``)."""
        res = flwr_cli(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"],
                       self.env, timeout=60)
        data = _json_tail(res.stdout)
        with contextlib.suppress(KeyError, IndexError, TypeError):
            return str(data["runs"][0]["status"])
        return "unknown"

    def run_error(self, run_id: int) -> str:
        """The last error line of the run's log (``flwr log --show``), saved to the logs folder."""
        res = flwr_cli(["log", str(run_id), CONNECTION_NAME, "--show"], self.env, timeout=60)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"run-{run_id}.log").write_text(res.stdout)
        errors = [ln.strip() for ln in res.stdout.splitlines()
                  if re.search(r"Error|Exception|error:", ln) and "Traceback" not in ln]
        return errors[-1] if errors else f"see `flwr log {run_id} --show`"

    def run_app(self, run_config: Mapping[str, Any] | str = "", *,
                project_dir: str | Path = PROJECT_DIR, output_dir: str | Path | None = None,
                timeout: float = 900.0) -> Path:
        """Submit fedwa, wait for its ``summary.json``, return the run folder.

        ``output-dir`` (absolute: the ServerApp runs in Flower's own folder) and
        ``num-clients`` (= number of SuperNodes) are added unless given.

        Raises
        ------
        DeployError
            If the run failed (the summary's error, or Flower's run status) or timed out.
        """
        text = format_run_config(run_config) if not isinstance(run_config, str) else run_config
        given = parse_run_config_keys(text)
        if given.get("resume"):
            # A resumed run writes into its own folder: wait for a new summary there.
            run_dir = Path(given["resume"])
            if not run_dir.is_absolute():
                raise DeployError(f"resume must be an absolute path, not {run_dir}")
            from fedwa.callbacks.checkpoint import check_not_finished
            from fedwa.callbacks.runlock import RunLock

            # Before the summary goes: a finished run is refused, and a folder another
            # process is running is left alone (the ServerApp checks both again, locked).
            check_not_finished(run_dir)
            RunLock(run_dir).acquire().release()
            (run_dir / "summary.json").unlink(missing_ok=True)  # the ServerApp rewrites it
            run_id = self.submit(project_dir, text.strip())
            return self.wait_run(run_id, run_dir.parent, set(), timeout, run_dir=run_dir)
        if "output-dir" in given:
            if output_dir is not None:
                raise DeployError("output-dir is given twice (run config and argument)")
            out = Path(given["output-dir"])
            if not out.is_absolute():
                raise DeployError(f"output-dir must be an absolute path, not {out}: the "
                                  "ServerApp runs in Flower's own working folder")
        else:
            out = Path(output_dir).resolve() if output_dir else self.workdir / "runs"
            text += f" output-dir={json.dumps(str(out))}"
        if "num-clients" not in given:
            text += f" num-clients={self.num_supernodes}"
        before = set(out.glob("*/summary.json")) | set(out.glob("*/config.json"))
        run_id = self.submit(project_dir, text.strip())
        return self.wait_run(run_id, out, before, timeout)

    def wait_run(self, run_id: int, out: Path, before: set[Path], timeout: float,
                 run_dir: Path | None = None) -> Path:
        """Poll the results folder (and, less often, Flower's run status) until done; the
        run's folder is the first new one under ``out`` unless ``run_dir`` is given."""
        deadline = time.monotonic() + timeout
        next_status = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.superlink is not None and not self.superlink.alive():
                raise DeployError(f"the SuperLink exited during run {run_id}: "
                                  f"{_last_line(self.superlink.log_text())}")
            if run_dir is None:
                new = [p.parent for p in out.glob("*/config.json") if p not in before]
                run_dir = new[0] if new else None
            if run_dir is not None and (run_dir / "summary.json").exists():
                summary = _read_json(run_dir / "summary.json")
                if summary is not None:
                    if summary.get("status") == "completed":
                        return run_dir
                    raise DeployError(f"run {run_id} failed: "
                                      f"{summary.get('error', 'unknown error')} ({run_dir})")
            if time.monotonic() > next_status:
                status = self.run_status(run_id)
                next_status = time.monotonic() + 5
                if status.startswith("finished") and not (
                        run_dir is not None and (run_dir / "summary.json").exists()):
                    time.sleep(1)  # the summary may be written just after the status changes
                    if run_dir is None or not (run_dir / "summary.json").exists():
                        raise DeployError(f"run {run_id} ended ({status}) without a summary: "
                                          f"{self.run_error(run_id)} (logs in {self.logs})")
            time.sleep(0.2)
        raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop every process started (SuperNode workers and SuperNodes first, SuperLink last).

        SIGINT/SIGTERM are held off meanwhile, so that a second Ctrl-C cannot cut the cleanup
        short and leave processes behind.
        """
        held = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: cannot hold signals
                held[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            for proc in reversed(self.processes):
                proc.stop()
            self._sweep()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _sweep(self, timeout: float = 5.0) -> None:
        """Last resort: end any process still carrying this deployment's private FLWR_HOME.

        Every process we start (and everything Flower starts from them) inherits it, and the
        folder is unique to this deployment, so the marker names only our processes, including
        one that left its process group and lost its parent.
        """
        strays = [p for p in processes_with_env("FLWR_HOME", str(self.flwr_home))
                  if p != os.getpid()]
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while strays and time.monotonic() < deadline:
            time.sleep(0.05)
            strays = [p for p in strays if _pid_alive(p)]
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """PIDs still alive that this deployment started (should be empty after ``stop``).

        Two views: the members of every process group started, and every process whose
        environment names this deployment's private FLWR_HOME (which catches a descendant
        that left its group).
        """
        found = {pid for pgid in self.pids for pid in group_members(pgid)}
        found |= set(processes_with_env("FLWR_HOME", str(self.flwr_home)))
        found.discard(os.getpid())
        return sorted(found)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # being written
    return data if isinstance(data, dict) else None


def format_run_config(config: Mapping[str, Any]) -> str:
    """A ``--run-config`` string: ``{"num-server-rounds": 2, "strategy": "fedavg"}`` gives
    ``num-server-rounds=2 strategy="fedavg"`` (strings as TOML basic strings)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a TOML basic string
        parts.append(f"{key}={text}")
    return " ".join(parts)


def parse_run_config_keys(text: str) -> dict[str, str]:
    """Keys and raw values of a ``k=v k2=v2`` run-config string (quotes removed)."""
    found = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if sep:
            found[key.strip()] = value
    return found


# --- the warm ClientApp worker -------------------------------------------------------------


class _InProcessClientApps:
    """Runs ClientApp tasks in this process, keeping the loaded app (and its caches) warm.

    The steps are those of Flower's ``flwr-clientapp`` (pull the task input, install the FAB,
    load the ClientApp, call it, push the reply and the task output), minus the process exit
    at the end. The FAB is installed and the app imported once per FAB hash; a new FAB (a new
    version of the app) first forgets the previous app's modules.
    """

    def __init__(self, runtime_api_address: str, insecure: bool,
                 certificates: bytes | None) -> None:
        self.address, self.insecure, self.certificates = (runtime_api_address, insecure,
                                                          certificates)
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app: Any = None
        self.last_timing = ""  # "pull a, app b, push c" seconds of the last task, for the log

    def _load(self, run: Any, fab: Any) -> Any:
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str == self.fab_hash:
            return self.app
        app_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).resolve()
        if not (app_dir / "pyproject.toml").exists():
            install_from_fab(fab.content, skip_prompt=True)
        # Forget the modules of the previous app and any copy imported from elsewhere, so
        # the FAB's own code is imported (from app_dir, which Flower puts first on sys.path).
        tops = {p.name for p in app_dir.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
        tops |= {p.stem for p in app_dir.glob("*.py")}
        for name in [m for m in sys.modules if m.split(".")[0] in tops]:
            del sys.modules[name]
        if self.app_dir is not None and str(self.app_dir) in sys.path:
            sys.path.remove(str(self.app_dir))
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        return self.app

    def serve(self, token: str) -> str:
        """Run the task behind ``token``; return its status (``completed``/``failed``)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                                 RuntimeVersionHttpInterceptor)
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                          push_task_output)

        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker())
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()  # the SuperNode expires tasks whose process stops sending these
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        t = [time.monotonic()]
        try:
            message, context, run, fab = pull_task_input(client)
            t.append(time.monotonic())
            reply = self._load(run, fab)(message=message, context=context)
            t.append(time.monotonic())
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            # As flwr-clientapp does: the server gets an Error reply, the worker lives on.
            import traceback

            traceback.print_exc()
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=status,
                                 details=details)
            finally:
                heartbeat.stop()
                client.close()
                t.append(time.monotonic())
                if len(t) == 4:
                    self.last_timing = (f"pull {t[1] - t[0]:.2f}s, app {t[2] - t[1]:.2f}s, "
                                        f"push {t[3] - t[2]:.2f}s")
        return str(status)


def clientapp_worker(runtime_api_address: str, insecure: bool,
                     root_certificates: str | None, mode: str = "inprocess",
                     poll_interval: float = 0.05) -> None:
    """Serve one SuperNode's ClientApp tasks from one long-lived process.

    Flower's own launcher (``flower-superexec``, started by a SuperNode in ``subprocess``
    isolation) starts a new ``flwr-clientapp`` program for every message; it imports torch,
    installs the FAB and builds the app's data again each time. This worker, started next to
    a SuperNode running with ``--isolation process``, polls the SuperNode's Runtime API for
    ClientApp tasks (as ``flower-superexec`` does) and

    - ``mode="inprocess"``: runs every task in this process (:class:`_InProcessClientApps`):
      the app module, and whatever it caches at module level, stay loaded across messages;
    - ``mode="fork"``: forks a child per task that runs Flower's own ``run_clientapp``: a
      fresh process per message as in Flower, but with torch and the app's dependencies
      already imported (the app itself is imported by each child, from the FAB).

    Tasks run one at a time in ``inprocess`` mode; a SuperNode hands out one message at a
    time anyway.
    """
    import importlib

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    t0 = time.monotonic()
    # Import the heavy dependencies (torch, numpy, scipy, sklearn, ...) now, through the app;
    # then forget the app's own modules so that the FAB's copy is the one used.
    importlib.import_module("fedwa.apps.client_app")
    for name in [m for m in sys.modules if m.split(".")[0] in ("fedwa", "strategies")]:
        if name != __name__:
            del sys.modules[name]
    print(f"clientapp-worker ({mode}): dependencies imported in {time.monotonic() - t0:.1f}s; "
          f"serving {runtime_api_address}", flush=True)

    certificates = None if insecure else (
        Path(root_certificates).read_bytes() if root_certificates else None)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    apps = _InProcessClientApps(runtime_api_address, insecure, certificates)
    children: dict[int, float] = {}  # pid -> start time, to log each task's duration
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if mode == "inprocess":
            raise KeyboardInterrupt  # leave a running task; the SuperNode expires it

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        while not stopping:
            res = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                started = time.monotonic()
                if mode == "inprocess":
                    status = apps.serve(res.token)
                    print(f"clientapp-worker: task {res.task.task_id} {status} in "
                          f"{time.monotonic() - started:.2f}s ({apps.last_timing})", flush=True)
                    continue
                pid = os.fork()
                if pid == 0:  # the child: run exactly one task, never return into this loop
                    code = 1
                    try:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        run_clientapp(runtime_api_address=runtime_api_address,
                                      token=res.token, insecure=insecure,
                                      certificates=certificates, parent_pid=os.getppid(),
                                      runtime_dependency_install=False)
                        code = 0
                    except SystemExit as exc:  # flwr_exit ends with sys.exit(code)
                        code = exc.code if isinstance(exc.code, int) else 1
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                children[pid] = started
                print(f"clientapp-worker: task {res.task.task_id} -> pid {pid}", flush=True)
                continue  # more tasks may be pending
            for pid, started in list(children.items()):
                with contextlib.suppress(ChildProcessError):
                    done, status_code = os.waitpid(pid, os.WNOHANG)
                    if done == pid:
                        del children[pid]
                        print(f"clientapp-worker: pid {pid} exited "
                              f"({os.waitstatus_to_exitcode(status_code)}) after "
                              f"{time.monotonic() - started:.2f}s", flush=True)
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


# --- command line ------------------------------------------------------------------------------


def _install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that ``finally`` blocks stop the children."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


def cmd_credentials(args: argparse.Namespace) -> int:
    """``credentials OUT_DIR --supernodes N [--host H ...]``."""
    creds = make_credentials(args.out_dir, args.supernodes,
                             hosts=list(DEFAULT_HOSTS) + list(args.host or []))
    print(f"CA certificate:      {creds.ca_cert}")
    print(f"SuperLink cert/key:  {creds.server_cert} {creds.server_key}")
    for priv, pub in creds.supernode_keys:
        print(f"SuperNode key pair:  {priv} {pub}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start the deployment, run the app, print the results folder, stop everything."""
    if args.insecure:
        print("fedwa.deploy: --insecure: plain HTTP and no SuperNode authentication; "
              "every process listens on 127.0.0.1 only. Never use it across machines.",
              file=sys.stderr)
    try:
        args.run_config = run_config_text(args)
    except FedwaError as err:  # one line naming the key, before anything starts
        print(f"fedwa.deploy: error: {err}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedwa-deploy-")).resolve()
    _install_signal_handlers()
    t0 = time.monotonic()
    ok = False
    try:
        creds = Credentials.load(args.credentials) if args.credentials else None
        deployment = Deployment(workdir, args.supernodes, credentials=creds,
                                insecure=args.insecure, auth=not args.no_auth,
                                isolation=args.isolation, worker_mode=args.worker_mode)
        with deployment:
            deployment.start()
            print(f"deployment up in {deployment.startup_seconds:.1f}s: SuperLink "
                  f"{deployment.superlink_address}, SuperNodes: {args.supernodes} "
                  f"({'insecure' if args.insecure else 'TLS'}"
                  f"{', SuperNode auth' if deployment.auth else ''}, isolation "
                  f"{args.isolation}); logs in {deployment.logs}", flush=True)
            run_dir = deployment.run_app(args.run_config,
                                         project_dir=args.project_dir, timeout=args.timeout)
        summary = _read_json(run_dir / "summary.json") or {}
        final = summary.get("final", {})
        if "accuracy" in final:
            print(f"final accuracy {final['accuracy']:.4f} after {summary.get('rounds')} rounds "
                  f"({time.monotonic() - t0:.1f}s in all)")
        print(f"results: {run_dir}")
        ok = True
        return 0
    except DeployError as err:
        print(f"fedwa.deploy: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedwa.deploy: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.workdir:
            _remove_temporary_workdir(workdir, keep_logs=not ok)


def _remove_temporary_workdir(workdir: Path, keep_logs: bool) -> None:
    """Remove the launcher's own temporary folder: its private keys and FLWR_HOME always, the
    logs too unless the run failed (then they are what the user reads next)."""
    import shutil

    for part in ("credentials", "flwr_home"):
        shutil.rmtree(workdir / part, ignore_errors=True)
    if keep_logs and any((workdir / "logs").glob("*")):
        print(f"fedwa.deploy: logs kept in {workdir / 'logs'} (keys removed)", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def cmd_superlink(args: argparse.Namespace) -> int:
    """Serve a SuperLink for SuperNodes on other machines until Ctrl-C or SIGTERM."""
    creds = Credentials.load(args.credentials)
    count = args.supernodes or len(creds.supernode_keys)
    workdir = Path(args.workdir).resolve()
    _install_signal_handlers()
    try:
        with Deployment(workdir, count, credentials=creds, host=args.host,
                        port=args.port) as deployment:
            deployment.start_link()
            print(f"SuperLink up on {args.host}:{args.port} (TLS, SuperNode auth, "
                  f"{count} SuperNode keys registered, registration closed); the Control API "
                  f"answers this machine only. Connect `flwr` with address = "
                  f"\"{deployment.superlink_address}\" and root-certificates = "
                  f"\"{creds.ca_cert}\" (also written to {deployment.flwr_home}/config.toml);"
                  f" logs in {deployment.logs}", flush=True)
            while deployment.superlink is not None and deployment.superlink.alive():
                time.sleep(1.0)
            assert deployment.superlink is not None
            print(f"fedwa.deploy: the SuperLink exited: "
                  f"{_last_line(deployment.superlink.log_text())}", file=sys.stderr)
            return 1
    except DeployError as err:
        print(f"fedwa.deploy: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedwa.deploy: stopped; every started process was stopped", file=sys.stderr)
        return 130


def run_config_text(args: argparse.Namespace) -> str:
    """The ``--run-config`` string of ``run``: a TOML config file, ``--set`` pairs on top, then
    ``--run-config``; with ``--resume``, the run folder's own config. Validated here, with the
    number of clients set to the number of SuperNodes unless given."""
    from fedwa.callbacks.checkpoint import resume_config
    from fedwa.run.config import load_toml, parse_set, resolve_config
    from fedwa.callbacks.results import check_output_dir

    # `--run-config "k=v k2='text'"`: shell-style words, each a `--set` pair.
    try:
        words = shlex.split(args.run_config)
    except ValueError as err:  # an unclosed quote: shlex says "No closing quotation"
        raise ConfigError("--run-config", args.run_config, "space-separated key=value words "
                          f"with every quote closed, e.g. \"lr=0.1 model='mlp'\" "
                          f"({str(err).lower()})") from None
    pairs = parse_set(words)
    if args.resume:
        if args.config:
            raise ConfigError("CONFIG", args.config, "no config file with --resume: a resumed "
                              "run keeps the config saved in its folder")
        overrides = {**parse_set(args.set), **pairs}
        config = resolve_config(resume_config(args.resume, overrides))
        if config["num-clients"] != args.supernodes:
            raise ConfigError("--supernodes", args.supernodes, f"{config['num-clients']}, the "
                              "resumed run's num-clients")
        return format_run_config({"resume": config["resume"], **overrides})
    overrides = {**(load_toml(args.config) if args.config else {}), **parse_set(args.set),
                 **pairs}
    overrides.setdefault("num-clients", args.supernodes)
    config = resolve_config(overrides)
    if args.output_dir and "output-dir" in overrides:
        raise ConfigError("--output-dir", args.output_dir, "given once: the config sets "
                          f"output-dir = {overrides['output-dir']!r} too")
    # As `fedwa run`: results under this folder's output-dir (default runs/), made absolute
    # here because Flower runs the ServerApp in a folder of its own.
    overrides["output-dir"] = str(Path(args.output_dir or config["output-dir"]).resolve())
    # Before the SuperLink starts: a read-only or full output-dir would otherwise fail in the
    # ServerApp, after the whole deployment came up.
    check_output_dir(overrides["output-dir"], "--output-dir" if args.output_dir else "output-dir")
    if config["num-clients"] != args.supernodes:
        raise ConfigError("num-clients", config["num-clients"],
                          f"{args.supernodes}, the number of SuperNodes (--supernodes)")
    return format_run_config(overrides)


def cmd_worker(args: argparse.Namespace) -> int:
    """``clientapp-worker``: see :func:`clientapp_worker`."""
    clientapp_worker(args.runtime_api_address, args.insecure, args.root_certificates,
                     mode=args.mode)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fedwa.deploy`` parser."""
    parser = argparse.ArgumentParser(prog="fedwa deploy", description=__doc__.split(
        "\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("credentials", help="write a CA, a SuperLink certificate and "
                                           "SuperNode key pairs")
    p.add_argument("out_dir")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--host", action="append",
                   help="extra SAN for the SuperLink certificate (repeatable)")
    p.set_defaults(func=cmd_credentials)

    p = sub.add_parser("run", help="start SuperLink + SuperNodes on 127.0.0.1, run fedwa, stop")
    p.add_argument("--supernodes", type=int, default=2,
                   help="SuperNodes to start (num-clients is set to this unless given)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no SuperNode auth (loopback only)")
    p.add_argument("--no-auth", action="store_true", help="TLS but no SuperNode authentication")
    p.add_argument("--credentials", help="folder written by the `credentials` command "
                                         "(default: generate into the workdir)")
    p.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                   help="process: one long-lived ClientApp worker per SuperNode")
    p.add_argument("--worker-mode", choices=("inprocess", "fork"), default="inprocess",
                   help="with --isolation process: run tasks inside the worker (default) or "
                        "in a child forked from it per message")
    p.add_argument("config", nargs="?", help="TOML file with run-config keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue that run from its checkpoint")
    p.add_argument("--run-config", default="", help='e.g. "num-server-rounds=3 model=\'mlp\'"')
    p.add_argument("--output-dir", help="results folder (default: the config's output-dir, "
                                        "runs/ under this folder)")
    p.add_argument("--project-dir", default=str(PROJECT_DIR),
                   help="the Flower app to run (default: this checkout)")
    p.add_argument("--workdir", help="logs, FLWR_HOME, credentials (default: a new tmp folder)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("superlink", help="serve a SuperLink for SuperNodes on other machines: "
                                         "TLS, their keys registered, registration closed, "
                                         "the Control API for this machine only")
    p.add_argument("--credentials", required=True,
                   help="folder written by the `credentials` command")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--supernodes", type=int, default=0,
                   help="register the first N keys (default: every key in --credentials)")
    p.add_argument("--workdir", required=True, help="logs and the flwr connection")
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("clientapp-worker", help="serve a SuperNode's ClientApp tasks from one "
                                                "long-lived process (--isolation process)")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates")
    p.add_argument("--mode", choices=("inprocess", "fork"), default="inprocess")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fedwa.deploy``."""
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.supernodes < 1:
        print("fedwa.deploy: error: --supernodes must be >= 1", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

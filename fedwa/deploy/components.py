"""Start Flower's processes: the SuperLink, its ServerApp executor, SuperNodes, ClientApp workers.

Each ``start_*`` function turns its arguments and the
:class:`~fedwa.deploy.credentials.Credentials` into one command line and returns the
:class:`~fedwa.deploy.processes.Managed` process that :func:`~fedwa.deploy.processes.spawn`
started; :class:`~fedwa.deploy.launcher.Deployment` waits for them and stops them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from fedwa.deploy.credentials import Credentials
from fedwa.deploy.processes import LOOPBACK, PROJECT_DIR, DeployError, Managed, spawn


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
        Child environment (see :func:`~fedwa.deploy.processes.child_env`).
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
    """Start :mod:`fedwa.deploy.serverapp_executor` for a SuperLink started with
    ``superexec_secret``."""
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
    """Start :func:`~fedwa.deploy.worker.clientapp_worker` (a long-lived ClientApp process) for
    one SuperNode.

    ``runtime_address`` is the SuperNode's Runtime API (its ``--port``); ``mode`` is
    ``inprocess`` or ``fork`` (see :func:`~fedwa.deploy.worker.clientapp_worker`).
    """
    argv = [sys.executable, "-m", "fedwa.deploy", "clientapp-worker",
            "--runtime-api-address", runtime_address, "--mode", mode]
    if credentials is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(credentials.ca_cert)]
    return spawn(name, argv, log_path, env, cwd=PROJECT_DIR)

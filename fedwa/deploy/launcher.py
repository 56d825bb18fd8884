"""The loopback deployment: a SuperLink and N SuperNodes on this machine, running fedwa.

:class:`Deployment` starts the processes (:mod:`fedwa.deploy.components`), registers the
SuperNodes' keys and submits the app through the ``flwr`` CLI
(:mod:`fedwa.deploy.flwr_commands`), waits for fedwa's ``summary.json`` and stops every process
it started, by process group, whatever happens. :func:`format_run_config` and
:func:`parse_run_config_keys` write and read the ``--run-config`` string.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedwa.deploy.components import (start_clientapp_worker, start_serverapp_executor,
                                     start_superlink, start_supernode)
from fedwa.deploy.credentials import Credentials, make_credentials
from fedwa.deploy.flwr_commands import (CONNECTION_NAME, _json_tail, flwr_cli, online_supernodes,
                                        register_supernode, write_connection)
from fedwa.deploy.processes import (LOOPBACK, PROJECT_DIR, DeployError, Managed, _last_line,
                                    _pid_alive, child_env, free_port, group_members,
                                    processes_with_env, wait_for_port)


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
        ``process`` starts one :func:`~fedwa.deploy.worker.clientapp_worker` per SuperNode.
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

"""The deployment's processes: started each in a session of its own, stopped group by group.

:func:`spawn` starts a command in its own session (its PID is its process-group id) that ends
with the launcher (:func:`~fedwa.deploy.parent_death.die_with_parent`), logging to a file;
:meth:`Managed.stop` ends it and every process group its descendants lead. The ``/proc``
helpers (:func:`process_table`, :func:`descendants`, :func:`group_members`,
:func:`processes_with_env`) find what is left. :func:`child_env` is the environment of every
child, :func:`free_port` and :func:`wait_for_port` the ports they listen on, and
:class:`DeployError` the error of every deployment step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedwa.deploy.parent_death import die_with_parent

LOOPBACK = "127.0.0.1"
#: The repository root: the app ``flwr run`` submits by default, and the working folder of the
#: Python children (``python -m fedwa.deploy...``).
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


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it).

    There is a short race until the caller binds it; :class:`~fedwa.deploy.launcher.Deployment`
    retries a start whose port was taken meanwhile.
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

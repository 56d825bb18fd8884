"""Start the SuperLink's ServerApp processes without their run token on the command line.

A SuperLink in ``subprocess`` isolation starts ``flower-superexec``, and that starts every
ServerApp as ``flwr-serverapp --token <token>``: the token that lets a process act as the
run's ServerApp (pull every reply, push instructions) is in ``/proc/<pid>/cmdline``, which
every user of the machine can read. ``flwr-serverapp`` also accepts ``--token-file``, but
Flower's launcher has no option to use it (flwr 1.42).

:func:`serverapp_executor` is the launcher fedwa uses instead, next to a SuperLink started
with ``--isolation process``: it asks the SuperLink's Runtime API for ServerApp tasks (as
``flower-superexec`` does), writes each task's token to a file only its owner can read
(mode 0600 in a 0700 folder), starts ``flwr-serverapp --token-file`` and removes the file
when that process ends. With a shared secret (``--superexec-auth-secret-file`` on both
sides) the SuperLink hands tasks only to this launcher, so no other local process can take a
run's ServerApp task first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fedwa.deploy.parent_death import die_with_parent

#: The Runtime API call the shared secret protects (as Flower's own SuperExec signs it).
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a new file that only its owner can read or write (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def serverapp_command(runtime_api_address: str, token_file: Path, *, insecure: bool,
                      root_certificates: str | None, parent_pid: int) -> list[str]:
    """The ``flwr-serverapp`` command of one task: the token by file, never by value."""
    argv = ["flwr-serverapp", "--runtime-api-address", runtime_api_address,
            "--token-file", str(token_file), "--parent-pid", str(parent_pid)]
    if insecure:
        argv.append("--insecure")
    elif root_certificates:
        argv += ["--root-certificates", root_certificates]
    return argv


def serverapp_executor(runtime_api_address: str, *, insecure: bool,
                       root_certificates: str | None, secret_file: str | None,
                       token_dir: Path, poll_interval: float = 0.2) -> None:
    """Serve the SuperLink's ServerApp tasks until SIGTERM/SIGINT (see the module docstring).

    Parameters
    ----------
    runtime_api_address : str
        ``host:port`` of the SuperLink (its Runtime API shares the one port).
    insecure, root_certificates
        TLS to the SuperLink: none, or verified with this CA file.
    secret_file : str, optional
        The SuperExec shared secret the SuperLink was started with.
    token_dir : Path
        Where the tokens' files live while their ServerApp runs (made 0700).
    poll_interval : float
        Seconds between task requests when none is pending.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient


    token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(token_dir, 0o700)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret_file:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=Path(secret_file).read_bytes(), protected_methods={ACQUIRE_TASK}))
    certificates = None if insecure else (
        Path(root_certificates).read_bytes() if root_certificates else None)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())
    children: dict[subprocess.Popen[bytes], Path] = {}
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"serverapp-executor: serving {runtime_api_address}", flush=True)
    try:
        while not stopping:
            res = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.SERVER_APP]))
            if res.HasField("task") and res.token:
                token_file = write_private(token_dir / f"task-{res.task.task_id}.token",
                                           res.token)
                child = subprocess.Popen(  # pylint: disable=consider-using-with
                    serverapp_command(runtime_api_address, token_file, insecure=insecure,
                                      root_certificates=root_certificates,
                                      parent_pid=os.getpid()),
                    stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(os.getpid()))
                children[child] = token_file
                print(f"serverapp-executor: task {res.task.task_id} -> pid {child.pid}",
                      flush=True)
                continue
            for child, token_file in list(children.items()):
                if child.poll() is not None:
                    token_file.unlink(missing_ok=True)
                    del children[child]
                    print(f"serverapp-executor: pid {child.pid} exited ({child.returncode})",
                          flush=True)
            time.sleep(poll_interval)
    finally:
        client.close()
        for child, token_file in children.items():
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            token_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedwa.deploy.serverapp_executor --runtime-api-address ADDR ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedwa.deploy.serverapp_executor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--superexec-auth-secret-file")
    parser.add_argument("--token-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    serverapp_executor(args.runtime_api_address, insecure=args.insecure,
                       root_certificates=args.root_certificates,
                       secret_file=args.superexec_auth_secret_file, token_dir=args.token_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

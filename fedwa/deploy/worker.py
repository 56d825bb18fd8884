"""The warm ClientApp worker: one long-lived process serving a SuperNode's ClientApp tasks.

``--isolation process`` replaces the SuperNode's own per-message ``flwr-clientapp`` launcher
by :func:`clientapp_worker` (``python -m fedwa.deploy clientapp-worker``, started by
:func:`~fedwa.deploy.components.start_clientapp_worker`): it imports torch and the app's
third-party dependencies once and then runs every task in this process
(:class:`_InProcessClientApps`) or in a child forked from it per task.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


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

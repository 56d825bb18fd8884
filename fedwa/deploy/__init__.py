"""Run fedwa through Flower's Deployment Engine: one SuperLink and N SuperNodes on this machine.

``python -m fedwa.deploy credentials OUT_DIR --supernodes N`` writes a CA, a server certificate
for the SuperLink and one SuperNode authentication key pair per SuperNode.

``python -m fedwa.deploy run [--supernodes N] ...`` starts a ``flower-superlink`` and N
``flower-supernode`` processes on 127.0.0.1 (free ports, TLS and SuperNode authentication on
by default), submits the app with ``flwr run``, waits for fedwa's ``summary.json`` and stops
every process it started, by process group, whatever happens.

The same steps are exposed as functions (:func:`make_credentials`, :func:`start_superlink`,
:func:`start_supernode`, :func:`start_clientapp_worker`, :func:`free_port`, :class:`Deployment`)
for tests and for scripts that want to, e.g., kill one SuperNode in the middle of a run; this
package re-exports them from the modules below.

``--isolation process`` replaces the SuperNode's own per-message ``flwr-clientapp`` launcher
by :func:`clientapp_worker`: a long-lived process per SuperNode that imports torch and the
app's third-party dependencies once and then runs every message itself (or, with
``--worker-mode fork``, forks a ready child for every message). Flower 1.41 has no long-lived
ClientApp process of its own: every ``flwr-clientapp`` serves exactly one task and exits
(``flwr/supernode/runtime/run_clientapp.py``); its "warm executors" exist only for the
Kubernetes executor and the agent/model/connector task types.

Modules, each importing only modules listed before it:

- :mod:`fedwa.deploy.parent_death`: children that end with the launcher (PR_SET_PDEATHSIG);
- :mod:`fedwa.deploy.linkguard` (a program): the SuperLink's Control and Runtime APIs for this
  machine only, sealed SuperNode registration;
- :mod:`fedwa.deploy.serverapp_executor` (a program): ServerApp processes with their run token
  in a 0600 file;
- :mod:`fedwa.deploy.processes`: starting, stopping and finding processes, ports, the child
  environment, :class:`DeployError`;
- :mod:`fedwa.deploy.credentials`: the CA, the SuperLink certificate, the SuperNode keys;
- :mod:`fedwa.deploy.components`: the command lines of the SuperLink, its ServerApp executor,
  the SuperNodes and the ClientApp worker;
- :mod:`fedwa.deploy.flwr_commands`: the ``flwr`` CLI (connection, SuperNode registration);
- :mod:`fedwa.deploy.launcher`: :class:`Deployment`, the run-config string;
- :mod:`fedwa.deploy.worker`: the long-lived ClientApp worker;
- :mod:`fedwa.deploy.cli`: the ``python -m fedwa.deploy`` command line.
"""

from fedwa.deploy.cli import build_parser, main
from fedwa.deploy.components import (start_clientapp_worker, start_serverapp_executor,
                                     start_superlink, start_supernode)
from fedwa.deploy.credentials import DEFAULT_HOSTS, Credentials, make_credentials
from fedwa.deploy.flwr_commands import (CONNECTION_NAME, flwr_cli, online_supernodes,
                                        register_supernode, write_connection)
from fedwa.deploy.launcher import Deployment, format_run_config, parse_run_config_keys
from fedwa.deploy.processes import (FLOWER_CHILD_ENV, LOOPBACK, PROJECT_DIR, DeployError, Managed,
                                    child_env, descendants, free_port, group_members,
                                    process_table, processes_with_env, spawn, wait_for_port)
from fedwa.deploy.worker import clientapp_worker

__all__ = [
    # processes
    "LOOPBACK", "PROJECT_DIR", "FLOWER_CHILD_ENV", "DeployError", "Managed", "child_env",
    "free_port", "spawn", "wait_for_port", "process_table", "descendants", "group_members",
    "processes_with_env",
    # credentials
    "DEFAULT_HOSTS", "Credentials", "make_credentials",
    # components
    "start_superlink", "start_serverapp_executor", "start_supernode", "start_clientapp_worker",
    # flwr_commands
    "CONNECTION_NAME", "write_connection", "flwr_cli", "register_supernode",
    "online_supernodes",
    # launcher
    "Deployment", "format_run_config", "parse_run_config_keys",
    # worker
    "clientapp_worker",
    # cli
    "build_parser", "main",
]

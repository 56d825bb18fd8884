"""Run fedwa through Flower's Deployment Engine: one SuperLink and N SuperNodes on this machine.

The command line of ``python -m fedwa.deploy`` (and ``fedwa deploy``): ``credentials``,
``run``, ``superlink`` and ``clientapp-worker``, each a ``cmd_*`` function over the library
modules of :mod:`fedwa.deploy`. The first paragraph above is the parser's description.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedwa.common.errors import ConfigError, FedwaError
from fedwa.deploy.credentials import DEFAULT_HOSTS, Credentials, make_credentials
from fedwa.deploy.launcher import Deployment, _read_json, format_run_config
from fedwa.deploy.processes import PROJECT_DIR, DeployError, _last_line
from fedwa.deploy.worker import clientapp_worker


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
    """``clientapp-worker``: see :func:`~fedwa.deploy.worker.clientapp_worker`."""
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

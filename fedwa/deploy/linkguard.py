"""Flower's SuperLink with its Control and Runtime APIs closed to everyone but the operator.

In flwr 1.42 one HTTP port serves the SuperLink's three APIs: the Fleet API that SuperNodes
call (``/v1/fleet/...``), the Control API that the ``flwr`` CLI calls (``/v1/control/...``:
start, list and stop runs, register SuperNode keys) and the Runtime API that the ServerApp's
process calls (``/v1/runtime/...``). Flower checks no identity on the Control API unless its
account authentication is configured, and that comes only with Flower's enterprise package
(``flwr.ee``); the separate Control API address of older releases is gone
(``--control-api-address`` is deprecated and ignored). So on a SuperLink bound to a public
address, anyone who reaches the port could register a SuperNode key of their own and join.

:class:`OperatorOnly` wraps the SuperLink's ASGI application:

- Everything but the Fleet API and the health check (so the Control and Runtime APIs, the
  OpenAPI pages and any route a later Flower adds) answers only connections from this
  machine: loopback addresses, and the address the SuperLink was bound to (a connection from
  this machine to its own public address comes from that address). Anyone else gets
  ``403`` and the SuperLink's log a line naming the peer and the path. The operator runs
  ``flwr`` on the SuperLink machine, or through an SSH tunnel to it.
- Once ``seal_file`` exists, SuperNode registration is closed to everyone, loopback included:
  ``fedwa deploy`` registers the keys it expects and then writes the seal, so a process on
  this machine cannot add a node either.
- The Fleet API is untouched; with ``--enable-supernode-auth`` Flower itself admits only the
  registered keys there.

Run it as ``python -m fedwa.deploy.linkguard [--seal-file PATH] -- <flower-superlink arguments>``:
it starts Flower's own ``flower-superlink`` entry point with the wrapper around the app that
Flower builds (the rest of the SuperLink is Flower's, unchanged).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: What another machine may call: the Fleet API (SuperNodes) and the health check. Everything
#: else (Control and Runtime APIs, the OpenAPI pages, any route a later Flower adds) answers
#: this machine only: an allow-list, so a new route is closed until it is known to be safe.
FLEET_PREFIX = "/v1/fleet/"
OPEN_PATHS = frozenset({"/health"})
#: Control API calls refused to everyone once the deployment is sealed.
REGISTRATION_PATHS = frozenset({"/v1/control/register-node", "/v1/control/unregister-node"})


def is_local_peer(host: str | None, bound_host: str | None = None) -> bool:
    """Whether a connection from ``host`` comes from this machine.

    Loopback addresses (IPv4-mapped ones too) and ``bound_host``, the specific address the
    SuperLink listens on, count; a missing or unparsable peer address does not.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if address.is_loopback:
        return True
    if bound_host:
        try:
            bound = ipaddress.ip_address(bound_host.strip("[]"))
        except ValueError:
            return False
        return not bound.is_unspecified and bound == address
    return False


class OperatorOnly:
    """ASGI wrapper: the Control and Runtime APIs for this machine only, registration sealable.

    Parameters
    ----------
    app : ASGI application
        The SuperLink's FastAPI application.
    bound_host : str, optional
        The address the SuperLink was bound to (``--host``).
    seal_file : Path, optional
        Once this file exists, ``register-node`` and ``unregister-node`` are refused.
    log : callable, optional
        Where refusals are reported (default: standard error, which is the SuperLink's log).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 bound_host: str | None = None, seal_file: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.app, self.bound_host, self.seal_file = app, bound_host, seal_file
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.refused = 0

    def refusal(self, path: str, client: Sequence[Any] | None) -> str | None:
        """Why a request for ``path`` from ``client`` (``(host, port)``) is refused, or None."""
        if path.startswith(FLEET_PREFIX) or path in OPEN_PATHS:
            return None
        host = str(client[0]) if client else None
        if not is_local_peer(host, self.bound_host):
            return (f"{path} answers this machine only (the operator's): "
                    f"{host or 'an unknown peer'} is not")
        if path in REGISTRATION_PATHS and self.seal_file is not None and self.seal_file.exists():
            return (f"{path}: this deployment's SuperNodes are registered and registration "
                    f"is closed ({self.seal_file} exists)")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http":
            reason = self.refusal(str(scope.get("path", "")), scope.get("client"))
            if reason is not None:
                self.refused += 1
                self.log(f"fedwa.deploy.linkguard: refused: {reason}")
                detail = f"refused by fedwa.deploy.linkguard: {reason}"
                body = json.dumps({"detail": detail}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _bound_host(argv: Sequence[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host")
    known, _ = parser.parse_known_args(list(argv))
    return known.host


def main(argv: Sequence[str] | None = None) -> None:
    """Start ``flower-superlink`` with :class:`OperatorOnly` around its application."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m fedwa.deploy.linkguard",
        description="flower-superlink with the Control and Runtime APIs for this machine only")
    parser.add_argument("--seal-file", type=Path,
                        help="refuse SuperNode (un)registration once this file exists")
    split = args.index("--") if "--" in args else len(args)
    own = parser.parse_args(args[:split])
    superlink_argv = args[split + 1:]

    try:
        import flwr.superlink.main as link_main
        from flwr.superlink.cli.flower_superlink import flower_superlink
        build = link_main.create_app
    except (ImportError, AttributeError) as err:  # another Flower layout: refuse, never run open
        sys.exit(f"fedwa.deploy.linkguard: this flwr has no flwr.superlink.main.create_app "
                 f"({err}); fedwa's SuperLink guard supports flwr 1.42")

    bound_host = _bound_host(superlink_argv)

    def guarded_create_app(*a: Any, **kw: Any) -> OperatorOnly:
        return OperatorOnly(build(*a, **kw), bound_host=bound_host, seal_file=own.seal_file)

    link_main.create_app = guarded_create_app  # flower_superlink imports it at call time
    sys.argv = ["flower-superlink", *superlink_argv]
    flower_superlink()


if __name__ == "__main__":
    main()

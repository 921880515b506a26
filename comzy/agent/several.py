"""``comzy 3000 8080`` and ``comzy start web api``: several tunnels served on one connection.

What ``comzy 3000`` does for one tunnel (comzy/agent/cli.py), for each of ``plans``
(comzy/agent/tunnels.py): a local forwarder per tunnel, one agent, one session (HELLO
``tunnels``), every public URL on a line of its own with its local address, and the request lines
naming their tunnel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

import anyio

from comzy.agent import account, inspector
from comzy.agent.capture import Capture
from comzy.agent.client import Agent, AgentConfig, TunnelSpec
from comzy.agent.forward import LocalForwarder, Served
from comzy.agent.output import Output, make_output
from comzy.agent.tunnels import TunnelPlan
from comzy.core.control import Welcome
from comzy.core.eventloop import backend_options
from comzy.core.memory import tune_gc, tune_malloc


class SeveralReporter:
    """The agent's events go to the output, and each tunnel's public URL to the inspector's API."""

    def __init__(self, printer: Output, tunnels: dict[str, inspector.TunnelInfo]) -> None:
        self.printer = printer
        self.tunnels = tunnels

    def connected(self, welcome: Welcome, first: bool) -> None:
        """The tunnels are up: ``GET /api/tunnels`` lists them from now on."""
        for tunnel in welcome.tunnels:
            info = self.tunnels.get(tunnel.name)
            if info is not None:
                info.public_url = tunnel.url
        self.printer.connected(welcome, first)

    def reconnecting(self, reason: str, delay: float) -> None:
        """As the output's."""
        self.printer.reconnecting(reason, delay)

    def notice(self, level: str, message: str) -> None:
        """As the output's."""
        self.printer.notice(level, message)


def _served_by(printer: Output, name: str) -> Callable[[Served], None]:
    """An ``on_served`` that names the tunnel on the request line."""
    def served(record: Served) -> None:
        printer.served(dataclasses.replace(record, tunnel=name))
    return served


def run(args: argparse.Namespace, plans: list[TunnelPlan], servers: list[str], token: str | None,
        held_back: str | None) -> int:
    """Serve ``plans`` until stopped; the exit status."""
    from comzy.agent.cli import _run, local_service_answers, open_inspector

    printer = make_output(plans[0].target, log=args.log, quiet=args.quiet, tunnels=plans)
    try:
        loop_options = backend_options(os.environ.get("COMZY_EVENT_LOOP") or "auto")
    except ValueError as exc:
        printer.error(f"COMZY_EVENT_LOOP {exc}")
        return 2
    if os.environ.get("COMZY_ANONYMOUS_TIMEOUT"):
        # As for one tunnel (cli.main): the seed's agents read it; here the server decides.
        printer.notice("warning", "COMZY_ANONYMOUS_TIMEOUT has no effect on the agent: the server's setting decides "
                                  "when anonymous tunnels expire (shown once connected).")
    if held_back:
        printer.notice("warning", f"{held_back[0].upper()}{held_back[1:]}; connecting anonymously. "
                                  f"Run `comzy login --server {servers[0]}` to log in there.")
    sock = open_inspector(args, printer)
    capture = Capture(args.inspect_max_requests, args.inspect_max_body) if sock is not None else None
    forwarders = {plan.name: LocalForwarder(plan.host, plan.port, rewrite_host=plan.rewrite_host,
                                            on_served=_served_by(printer, plan.name),
                                            capture=capture, name=plan.name)
                  for plan in plans}
    first = forwarders[plans[0].name]
    infos = {plan.name: inspector.TunnelInfo(plan.target, name=plan.name) for plan in plans}
    head, *rest = infos.values()
    head.more = rest
    api = None
    if sock is not None and capture is not None:
        # A replay goes to the local service of the tunnel its request came through (or the one named).
        api = (inspector.InspectorAPI(capture, head, lambda name: forwarders[name].local,
                                      check_host=inspector.is_loopback(sock.getsockname()[0])), sock)
        printer.inspector = inspector.url_of(sock)
    specs = [TunnelSpec(plan.name, plan.port, plan.subdomain, plan.policies.plugin_data,
                        list(plan.policies.plugin_data)) for plan in plans]
    config = AgentConfig(servers=servers, port=plans[0].port, token=token, cacert=args.cacert, tunnels=specs)
    try:
        agent = Agent(config, first, SeveralReporter(printer, infos), forwarders)
    except ValueError as exc:  # --cacert cannot be read
        printer.error(str(exc))
        return 2
    for plan in plans:
        if not local_service_answers(plan.host, plan.port):
            printer.notice("warning", f"Nothing is listening on {plan.target} yet (tunnel {plan.name}); visitors get "
                                      "a 502 until it starts.")

    async def serve() -> int:
        try:
            return await _run(agent, first, printer, api)
        finally:
            for forwarder in forwarders.values():
                if forwarder is not first:
                    await forwarder.aclose()

    try:
        tune_malloc()
        tune_gc()
        return anyio.run(serve, backend_options=loop_options)
    except KeyboardInterrupt:
        return 0


def main(args: argparse.Namespace, plans: list[TunnelPlan], server: str | None) -> None:
    """``comzy``'s entry for several tunnels: ``server`` is the config file's (after --server and
    COMZY_WS_SERVER, before the saved login's)."""
    from comzy.agent.cli import server_list

    saved = account.load_credentials()
    option = args.server or (None if os.environ.get("COMZY_WS_SERVER") else server)
    servers = server_list(option, saved.server if saved else None)
    token, held_back = account.token_for(servers, saved)
    sys.exit(run(args, plans, servers, token, held_back))

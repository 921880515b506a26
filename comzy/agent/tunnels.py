"""Which tunnels one agent serves: ``comzy 3000 8080`` (one tunnel per port) or a config file's
``tunnels:`` section (``comzy start web api``, ngrok's model), all on one connection.

The config file is YAML (read with ``yaml.safe_load``: no tags, no objects), at most 256 KiB::

    version: 1                              # optional; this agent reads version 1
    server: wss://tunnel.example.com:8191   # optional, as --server (a string or a list)
    tunnels:
      web:
        addr: 3000                          # a port, host:port or http://host:port
        subdomain: myapp
        host_header: rewrite                # as --host-header (preserve, the default, or rewrite)
        basic_auth: ["ana:a-long-password"] # each policy key is its flag in snake_case
      api:
        addr: 8080
        cidr_allow: [203.0.113.0/24]

Each policy key is read by the same function as its flag (``POLICY_OPTIONS``), so the file and the
command line accept the same values and say the same things about wrong ones; errors name the
file, the tunnel and the key. The file is looked for at ``--config FILE``, else ./comzy.yml, else
~/.comzy/comzy.yml.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comzy.agent.policies import (
    BASIC_AUTH,
    HEADERS,
    IP_FILTER,
    RATE_LIMIT,
    BasicAuth,
    HeaderRules,
    IpFilter,
    RateLimit,
)
from comzy.core.control import MAX_SESSION_TUNNELS, TUNNEL_NAME
from comzy.core.logs import printable

#: Where ``comzy start`` looks for its config file when ``--config`` is not given, in order.
CONFIG_FILE_NAME = "comzy.yml"
#: A config file larger than this is refused (a tunnels list is a few hundred bytes).
MAX_CONFIG_BYTES = 256 * 1024
#: The config file versions this agent reads.
CONFIG_VERSIONS = (1,)
#: Keys of a tunnel's map besides the policies.
TUNNEL_KEYS = ("addr", "subdomain", "host_header")
TOP_KEYS = ("version", "server", "tunnels")


class ConfigError(ValueError):
    """A config file (or a ``comzy start`` command line) that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class PolicyOption:
    """One policy as the command line and a config file give it.

    ``keys`` maps each key (an argparse ``dest``, which is the flag's name in snake_case, and the
    config file's key) to its kind: ``list`` (a repeatable flag), ``bool`` (a switch) or ``str``.
    ``build`` takes every key's value and returns the policy (an object with ``plugin_data()``
    and ``describe()``), None when unset, or raises ValueError saying what is wrong.
    """

    plugin: str
    keys: dict[str, type]
    build: Callable[[Mapping[str, Any]], Any]


def _basic_auth(values: Mapping[str, Any]) -> BasicAuth | None:
    if values["basic_auth_forward"] and not values["basic_auth"]:
        raise ValueError("--basic-auth-forward goes with --basic-auth USER:PASSWORD")
    policy = BasicAuth.parse(values["basic_auth"], values["basic_auth_forward"])
    return policy if policy.credentials else None


def _rate_limit(values: Mapping[str, Any]) -> RateLimit | None:
    value = values["rate_limit"]
    # The command line's parse_args has read it already (a RateLimit); a config file gives the text.
    return value if value is None or isinstance(value, RateLimit) else RateLimit.parse(value)


#: Every policy flag of the agent, in the order the agent shows them under the URL.
POLICY_OPTIONS: tuple[PolicyOption, ...] = (
    PolicyOption(BASIC_AUTH, {"basic_auth": list, "basic_auth_forward": bool}, _basic_auth),
    PolicyOption(RATE_LIMIT, {"rate_limit": str}, _rate_limit),
    PolicyOption(IP_FILTER, {"cidr_allow": list, "cidr_deny": list},
                 lambda v: IpFilter.parse(v["cidr_allow"], v["cidr_deny"]) or None),
    PolicyOption(HEADERS, {"request_header_add": list, "request_header_remove": list, "response_header_add": list,
                           "response_header_remove": list},
                 lambda v: HeaderRules.parse(v["request_header_add"], v["request_header_remove"],
                                             v["response_header_add"], v["response_header_remove"]) or None),
)


def policy_keys() -> dict[str, type]:
    """Every policy key (flag in snake_case) and its kind."""
    return {key: kind for option in POLICY_OPTIONS for key, kind in option.keys.items()}


@dataclass
class Policies:
    """A tunnel's policies: HELLO ``plugins`` data (every plugin named is also required) and the
    line each shows under the URL once the server confirmed it."""

    plugin_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    described: dict[str, str] = field(default_factory=dict)


def build_policies(values: Mapping[str, Any], where: str = "") -> Policies:
    """The policies ``values`` (policy key -> value; absent keys unset) ask for. Passwords are
    hashed here, once: every reconnect sends the same data. ValueError says what is wrong,
    prefixed with ``where`` and the key."""
    kinds = policy_keys()
    full = {key: values.get(key, [] if kind is list else False if kind is bool else None)
            for key, kind in kinds.items()}
    policies = Policies()
    for option in POLICY_OPTIONS:
        try:
            policy = option.build(full)
        except ValueError as exc:
            given = [key for key in option.keys if key in values]
            raise ValueError(f"{where}{'/'.join(given) or option.plugin}: {exc}") from None
        if policy is not None:
            policies.plugin_data[option.plugin] = policy.plugin_data()
            policies.described[option.plugin] = policy.describe()
    return policies


@dataclass
class TunnelPlan:
    """One tunnel the agent is to serve: its name (REQUEST ``tn``), local service and policies."""

    name: str
    host: str
    port: int
    subdomain: str | None = None
    rewrite_host: bool = False
    policies: Policies = field(default_factory=Policies)

    @property
    def target(self) -> str:
        """``host:port`` of the local service."""
        return f"{self.host}:{self.port}"


@dataclass
class ConfigFile:
    """A config file, checked: its ``server`` (None when absent) and its tunnels' raw maps."""

    path: Path
    server: str | None
    tunnels: dict[str, dict[str, Any]]


def find_config(explicit: str | None, cwd: Path | None = None, home: Path | None = None) -> Path:
    """The config file to read: ``explicit`` (``--config``), else ./comzy.yml, else ~/.comzy/comzy.yml."""
    if explicit:
        return Path(explicit)
    candidates = [(cwd or Path.cwd()) / CONFIG_FILE_NAME, (home or Path.home()) / ".comzy" / CONFIG_FILE_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"no config file: looked for {candidates[0]} and {candidates[1]}; write one (docs/agent.md, "
                      "\"Several tunnels\") or give it with --config FILE")


def load_config(path: Path) -> ConfigFile:
    """Read and check a config file; ConfigError names the file, the tunnel and the key at fault."""
    import yaml  # only `comzy start` pays for it

    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; is this the config file?")
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "it is not valid YAML"
        raise ConfigError(f"{path}: not valid YAML{at}: {printable(str(problem))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a map with a 'tunnels:' section (see docs/agent.md)")
    _unknown(path, "", document, TOP_KEYS)
    version = document.get("version", 1)
    if isinstance(version, str) and version.strip().isdigit():
        version = int(version)
    if version not in CONFIG_VERSIONS or isinstance(version, bool):
        raise ConfigError(f"{path}: version: this agent reads version 1 files, not {printable(repr(version))}")
    server = document.get("server")
    if isinstance(server, list) and server and all(isinstance(url, str) for url in server):
        server = ",".join(server)
    if server is not None and not isinstance(server, str):
        raise ConfigError(f"{path}: server: expected a ws:// or wss:// URL, or a list of them")
    tunnels = document.get("tunnels")
    if not isinstance(tunnels, dict) or not tunnels:
        raise ConfigError(f"{path}: tunnels: expected a map of tunnel names to their settings, e.g.\n"
                          "tunnels:\n  web:\n    addr: 3000")
    if len(tunnels) > MAX_SESSION_TUNNELS:
        raise ConfigError(f"{path}: tunnels: at most {MAX_SESSION_TUNNELS} tunnels on one agent (the file has "
                          f"{len(tunnels)})")
    checked: dict[str, dict[str, Any]] = {}
    for name, settings in tunnels.items():
        label = printable(str(name))
        if not isinstance(name, (str, int)) or isinstance(name, bool) or not TUNNEL_NAME.fullmatch(str(name)):
            raise ConfigError(f"{path}: tunnel '{label}': a tunnel's name is 1 to 64 letters, digits, '_', '.' or '-'")
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: tunnel '{label}': expected its settings as a map (at least 'addr: PORT')")
        checked[str(name)] = settings
    return ConfigFile(path, server, checked)


def _unknown(path: Path, where: str, settings: dict[Any, Any], known: tuple[str, ...] | list[str]) -> None:
    """Refuse a key that is not in ``known``, suggesting the nearest one (a typo must not silently
    leave a tunnel without its policy)."""
    for key in settings:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{path}: {where}unknown key '{printable(str(key))}'{hint}")


_ADDR = re.compile(r"(?:https?://)?(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?(?P<port>\d{1,5})/?")


def parse_addr(value: Any) -> tuple[str, int]:
    """A tunnel's ``addr``: a port, ``host:port`` or ``http://host:port``; ValueError says what is wrong."""
    match = _ADDR.fullmatch(str(value).strip()) if isinstance(value, (int, str)) and not isinstance(value, bool) \
        else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"expected a port (1-65535), host:port or http://host:port, not {printable(repr(value))}")
    return (match["host"] or "localhost").strip("[]"), int(match["port"])


def plans_from_config(config: ConfigFile, names: list[str], everything: bool) -> list[TunnelPlan]:
    """The tunnels ``comzy start NAMES`` (or ``--all``) serves from ``config``; ConfigError saying what is wrong."""
    from comzy.agent.cli import subdomain_problem  # the one check --subdomain has, and its wording

    declared = list(config.tunnels)
    path = config.path
    if everything and names:
        raise ConfigError("give tunnel names or --all, not both")
    if not everything and not names:
        raise ConfigError(f"name the tunnels to start (comzy start {' '.join(declared[:2])}) or start them all with "
                          f"--all; {path} declares {', '.join(declared)}")
    chosen = declared if everything else list(dict.fromkeys(names))
    for name in chosen:
        if name not in config.tunnels:
            guess = difflib.get_close_matches(name, declared, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            raise ConfigError(f"no tunnel '{printable(name)}' in {path}: {hint}it declares {', '.join(declared)}")
    kinds = policy_keys()
    plans = []
    for name in chosen:
        settings = config.tunnels[name]
        where = f"tunnel '{name}': "
        _unknown(path, where, settings, [*TUNNEL_KEYS, *kinds])
        if "addr" not in settings:
            raise ConfigError(f"{path}: {where}addr: missing; give the local port (addr: 3000) or host:port")
        try:
            host, port = parse_addr(settings["addr"])
        except ValueError as exc:
            raise ConfigError(f"{path}: {where}addr: {exc}") from None
        subdomain = settings.get("subdomain")
        if subdomain is not None:
            problem = subdomain_problem(subdomain) if isinstance(subdomain, str) else "expected a name such as myapp"
            if problem:
                raise ConfigError(f"{path}: {where}subdomain: {problem}")
            subdomain = subdomain.lower()
        host_header = settings.get("host_header", "preserve")
        if host_header not in ("preserve", "rewrite"):
            raise ConfigError(f"{path}: {where}host_header: expected preserve or rewrite, not "
                              f"{printable(repr(host_header))}")
        values = {}
        for key, kind in kinds.items():
            if key in settings:
                values[key] = _policy_value(path, where, key, kind, settings[key])
        try:
            policies = build_policies(values)
        except ValueError as exc:
            raise ConfigError(f"{path}: {where}{exc}") from None
        plans.append(TunnelPlan(name, host, port, subdomain, host_header == "rewrite", policies))
    return plans


def _policy_value(path: Path, where: str, key: str, kind: type, value: Any) -> Any:
    """A policy key's value as its flag would give it: a list of strings for a repeatable flag (one
    string is a list of one), a bool for a switch, a string otherwise (a number is written as one)."""
    if kind is list:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in items):
            raise ConfigError(f"{path}: {where}{key}: expected a list of strings")
        return [str(item) for item in items]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {where}{key}: expected true or false")
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"{path}: {where}{key}: expected a string")
    return str(value)


#: Options that apply to the agent as a whole, not to one tunnel: they go with several tunnels too.
SESSION_OPTIONS = frozenset({"port", "server", "cacert", "quiet", "log", "inspect", "inspect_max_requests",
                             "inspect_max_body", "config", "all"})
#: Options of one tunnel that ``comzy 3000 8080`` applies to each (the policies, from POLICY_OPTIONS, too).
EACH_TUNNEL_OPTIONS = frozenset({"host_header", "local_host"})


def read_words(args: Any, defaults: Callable[[str], Any], port: Callable[[str], int]) -> str | None:
    """Read ``comzy``'s positional words into ``args.ports`` (``comzy 3000 8080``; [3000] when none)
    or ``args.start`` (``comzy start web api``: the names; None otherwise), and ``args.port`` (the
    first port). Returns what is wrong with the command line, or None.

    ``defaults(dest)`` is the parser's default of an option, ``port`` its port parser. An option
    given that this mode cannot apply is refused, never dropped: a policy flag that no tunnel got
    would leave a tunnel open that its owner meant to protect.
    """
    words: list[str] = args.port
    args.start = None
    args.ports = []
    if words and words[0] == "start":
        args.start = words[1:]
    else:
        try:
            args.ports = [port(word) for word in words] or [3000]
        except Exception as exc:  # argparse.ArgumentTypeError, worded for the user
            return f"argument port: {exc}"
    args.port = args.ports[0] if args.ports else 3000
    given = sorted(dest for dest, value in vars(args).items()
                   if dest not in SESSION_OPTIONS and dest not in ("start", "ports") and value != defaults(dest))
    flags = ", ".join("--" + dest.replace("_", "-") for dest in given)
    if args.start is not None:
        if given:
            return (f"{flags} cannot go with `comzy start`: set {'it' if len(given) == 1 else 'them'} in the config "
                    "file, under each tunnel")
        return None
    if args.config or args.all:
        return "--config and --all go with `comzy start NAME...` (e.g. comzy --config FILE start web api)"
    if len(args.ports) == 1:
        return None
    if len(args.ports) > MAX_SESSION_TUNNELS:
        return f"at most {MAX_SESSION_TUNNELS} ports (tunnels) on one agent"
    repeated = sorted({p for p in args.ports if args.ports.count(p) > 1})
    if repeated:
        return f"port {repeated[0]} is given twice; each port is one tunnel"
    if "subdomain" in given:
        return ("--subdomain names one tunnel; with several ports, name each tunnel's subdomain in a config file "
                "and run `comzy start` (docs/agent.md, \"Several tunnels\")")
    unsupported = [dest for dest in given if dest not in EACH_TUNNEL_OPTIONS and dest not in policy_keys()]
    if unsupported:
        names = ", ".join("--" + dest.replace("_", "-") for dest in unsupported)
        return f"{names} cannot go with several ports yet: run one agent per port, or use a config file"
    return None


def plans_from_ports(args: Any) -> list[TunnelPlan]:
    """``comzy 3000 8080 [options]``: one tunnel per port, named after it, each with every policy
    flag given (hashed once: the tunnels share the data)."""
    policies = build_policies({key: value for key, value in vars(args).items() if key in policy_keys()})
    return [TunnelPlan(str(port), args.local_host, port, None, args.host_header == "rewrite", policies)
            for port in args.ports]

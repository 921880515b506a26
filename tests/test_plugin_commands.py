"""Plugin commands of ``comzy-server`` (the ``register_commands`` hook) and ``comzy-server plugins``.

Third-party plugins here are real installed packages as far as ``importlib.metadata`` can tell: a
module and a ``*.dist-info`` directory in a temporary directory on PYTHONPATH (what pip writes),
and ``comzy-server`` runs as a real subprocess.
"""

from __future__ import annotations

import ast
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from comzy import __version__
from tests.conftest import PYTHON, ROOT, cli_env
from tests.helpers import install_metadata
from tests.test_cli import SERVER, run_cli, server_env, wait_banner

pytestmark = pytest.mark.anyio

#: A third-party package: a command using its own settings, one asking other plugins through a
#: hook, and a plugin that answers that hook once started.
GREETER = '''
import argparse

from pydantic_settings import BaseSettings, SettingsConfigDict

from comzy import CommandContext, Commands, PluginError, hookimpl


class GreeterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMZY_GREETER_")
    greeting: str = "hello"
    times: int = 1


class Greeter:
    def __init__(self) -> None:
        self.settings = GreeterSettings()

    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        greet = commands.add("greet", self.greet, help="greet someone",
                             description="Greet NAME as often as COMZY_GREETER_TIMES says.")
        greet.add_argument("name", metavar="NAME")
        greet.add_argument("--fail", action="store_true", help="fail with a PluginError")
        commands.add("owner-of", self.owner_of, help="who owns an alias").add_argument("alias")

    def greet(self, args: argparse.Namespace, context: CommandContext) -> int:
        if args.fail:
            raise PluginError("greeter: asked to fail; leave out --fail")
        for _ in range(self.settings.times):
            print(f"{self.settings.greeting} {args.name}")
        return 3 if args.name == "nobody" else 0

    async def owner_of(self, args: argparse.Namespace, context: CommandContext) -> None:
        print("plugin", context.plugin, "enabled", ",".join(context.plugin_names),
              "answering", ",".join(context.implementers("alias_owner")) or "-")
        async with context.start_plugins("alias_owner") as server:
            print("started", ",".join(server.plugin_names))
            print("owner", server.hooks.alias_owner(args.alias, server))


class Owners:
    def __init__(self) -> None:
        self.owners: dict[str, str] = {}

    @hookimpl
    def on_startup(self) -> None:
        self.owners = {"ana-app": "ana"}  # known only once started, as a database would be

    @hookimpl
    def alias_owner(self, alias: str) -> str | None:
        return self.owners.get(alias)

    @hookimpl
    def on_shutdown(self) -> None:
        print("owners stopped")


class Clashing:
    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        commands.add("greet", lambda args, context: 0, help="greets too").add_argument("--loud")


class TakesDb:
    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        commands.add("db", lambda args, context: 0, help="mine")


class AsyncRegister:
    @hookimpl
    async def register_commands(self, commands: Commands) -> None:
        commands.add("later", lambda args, context: 0, help="never")
'''


def greeter_site(tmp_path: Path) -> Path:
    """A directory with the greeter package (plugins greeter and owners) installed in it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "comzy_greeter.py").write_text(textwrap.dedent(GREETER))
    install_metadata(site, "comzy-greeter", {"greeter": "comzy_greeter:Greeter", "owners": "comzy_greeter:Owners"},
                     version="1.2.3")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The greeter package, installed in a directory ``comzy_server`` puts on the path."""
    return greeter_site(tmp_path)


def comzy_server(tmp_path: Path, site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``comzy-server ARGS`` in a subprocess with ``site`` on the path and its own data dir."""
    environment = cli_env(PYTHONPATH=str(site), COMZY_DATA_DIR=str(tmp_path / "data"), **env)
    return subprocess.run([PYTHON, "-m", SERVER, *args], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=60, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused command printed (no traceback, nothing else)."""
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- commands -----------------------------------------------------------------------------------
def test_help_lists_the_commands_of_every_installed_plugin(tmp_path: Path, site: Path) -> None:
    # Nothing enabled: the commands are still known, so a person finds them.
    listed = comzy_server(tmp_path, site, "--help", COMZY_PLUGINS="none")
    assert listed.returncode == 0, listed.stderr
    assert "greet someone (plugin greeter)" in listed.stdout
    assert "users and their tokens (plugin auth_token)" in listed.stdout
    assert "custom domains served by an alias (plugin custom_domains)" in listed.stdout
    helped = comzy_server(tmp_path, site, "greet", "--help", COMZY_PLUGINS="none")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: comzy-server greet [-h] [--fail] NAME")
    assert "Greet NAME as often as COMZY_GREETER_TIMES says." in helped.stdout
    assert comzy_server(tmp_path, site, "users", "create", "--help", COMZY_PLUGINS="none").returncode == 0


def test_a_command_runs_only_while_its_plugin_is_enabled(tmp_path: Path, site: Path) -> None:
    refused = comzy_server(tmp_path, site, "greet", "ana", COMZY_PLUGINS="auth_token")
    assert refused.returncode == 2
    assert one_line(refused) == ("comzy-server: `greet` belongs to the plugin greeter, which is not enabled: "
                                 "add it to COMZY_PLUGINS (now: auth_token)")
    # Unset enables the built-ins only: a third-party plugin must be named.
    unset = comzy_server(tmp_path, site, "greet", "ana")
    assert unset.returncode == 2
    assert one_line(unset).endswith("add it to COMZY_PLUGINS (now: unset, which enables the built-in plugins)")
    users = comzy_server(tmp_path, site, "users", "list", COMZY_PLUGINS="none")
    assert users.returncode == 2
    assert one_line(users) == ("comzy-server: `users` belongs to the plugin auth_token, which is not enabled: "
                               "add it to COMZY_PLUGINS (now: none)")
    assert not (tmp_path / "data").exists()  # refused before anything was touched

    greeted = comzy_server(tmp_path, site, "greet", "ana", COMZY_PLUGINS="greeter", COMZY_GREETER_TIMES="2")
    assert (greeted.returncode, greeted.stdout) == (0, "hello ana\nhello ana\n"), greeted.stderr
    assert comzy_server(tmp_path, site, "greet", "nobody", COMZY_PLUGINS="greeter").returncode == 3
    failed = comzy_server(tmp_path, site, "greet", "ana", "--fail", COMZY_PLUGINS="greeter")
    assert failed.returncode == 2
    assert one_line(failed) == "comzy-server: greeter: asked to fail; leave out --fail"
    bad_args = comzy_server(tmp_path, site, "greet", COMZY_PLUGINS="greeter")
    assert bad_args.returncode == 2 and "the following arguments are required: NAME" in bad_args.stderr


def test_an_async_command_asks_the_enabled_plugins_started(tmp_path: Path, site: Path) -> None:
    asked = comzy_server(tmp_path, site, "owner-of", "ana-app", COMZY_PLUGINS="greeter,owners")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.splitlines() == ["plugin greeter enabled greeter,owners answering owners",
                                         "started owners", "owner ana", "owners stopped"]
    alone = comzy_server(tmp_path, site, "owner-of", "ana-app", COMZY_PLUGINS="greeter")
    assert alone.stdout.splitlines() == ["plugin greeter enabled greeter answering -", "started ", "owner None"]


def test_a_disabled_plugin_with_bad_settings_stops_nothing(tmp_path: Path, site: Path) -> None:
    # greeter cannot be built (COMZY_GREETER_TIMES is no number): only its own commands are gone.
    env = {"COMZY_GREETER_TIMES": "often"}
    asked = comzy_server(tmp_path, site, "owner-of", "x", COMZY_PLUGINS="owners", **env)
    assert asked.returncode == 2 and "invalid choice: 'owner-of'" in asked.stderr  # greeter's own command
    listed = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="owners", **env)
    assert listed.returncode == 0, listed.stderr
    assert "COMZY_GREETER_TIMES='often'" in listed.stdout
    assert comzy_server(tmp_path, site, "users", "--help", COMZY_PLUGINS="owners", **env).returncode == 0
    # Enabled, the same bad setting is the usual one line, by its variable, whatever the command.
    for args in (("greet", "ana"), ("owner-of", "x")):
        refused = comzy_server(tmp_path, site, *args, COMZY_PLUGINS="greeter,owners", **env)
        assert refused.returncode == 2
        assert one_line(refused).startswith("comzy-server: plugin 'greeter' failed to load: invalid setting: "
                                            "COMZY_GREETER_TIMES='often': ")


def test_a_command_name_two_plugins_add_runs_neither(tmp_path: Path, site: Path) -> None:
    install_metadata(site, "comzy-clashing", {"clashing": "comzy_greeter:Clashing"})
    for args in (("greet", "ana"), ("greet", "--loud", "x")):
        refused = comzy_server(tmp_path, site, *args, COMZY_PLUGINS="greeter,clashing")
        assert refused.returncode == 2
        line = one_line(refused)
        assert "'clashing'" in line and "'greeter'" in line and "'greet'" in line, line
        assert "uninstall all but one of them" in line
    assert "added by two plugins (clashing, greeter): cannot run" in comzy_server(tmp_path, site, "--help").stdout
    # The other commands of both are untouched.
    assert comzy_server(tmp_path, site, "owner-of", "x", COMZY_PLUGINS="greeter,owners").returncode == 0
    listed = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="greeter")
    assert "comzy-server: the command 'greet' is added by plugins clashing, greeter: it cannot run" in listed.stderr


def test_a_plugin_cannot_take_a_core_command_or_register_asynchronously(tmp_path: Path, site: Path) -> None:
    install_metadata(site, "comzy-bad", {"takes-db": "comzy_greeter:TakesDb",
                                         "async-register": "comzy_greeter:AsyncRegister"})
    listed = comzy_server(tmp_path, site, "plugins", "--json")
    errors = {row["name"]: row["error"] for row in json.loads(listed.stdout)}
    assert errors["takes-db"] == "plugin 'takes-db': the command 'db' is comzy-server's own; choose another name"
    assert errors["async-register"].startswith("plugin 'async-register': register_commands must be a plain function")
    assert "later" not in comzy_server(tmp_path, site, "--help").stdout
    # Disabled, neither stops the core's own commands.
    assert comzy_server(tmp_path, site, "db", "--help").returncode == 0


# -- comzy-server plugins --------------------------------------------------------------------------
def test_plugins_lists_the_installed_plugins(tmp_path: Path, site: Path) -> None:
    listed = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="auth_token,greeter")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["NAME", "ENABLED", "DISTRIBUTION", "VERSION", "COMMANDS", "HOOKS"]
    starts = [header.index(title) for title in header.split()]
    rows = {cells[0]: cells for line in lines
            if (cells := [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)])}
    assert rows["greeter"] == ["greeter", "yes", "comzy-greeter", "1.2.3", "greet, owner-of", "register_commands"]
    assert rows["owners"][:5] == ["owners", "no", "comzy-greeter", "1.2.3", "-"]
    assert rows["owners"][5] == "alias_owner, on_shutdown, on_startup"
    assert rows["auth_token"][:5] == ["auth_token", "yes", "comzy", __version__, "users"]
    assert rows["custom_domains"][:5] == ["custom_domains", "no", "comzy", __version__, "domains"]

    as_json = comzy_server(tmp_path, site, "plugins", "--json", COMZY_PLUGINS="owners")
    assert as_json.returncode == 0, as_json.stderr
    plugins = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert plugins["owners"] == {"name": "owners", "enabled": True, "distribution": "comzy-greeter",
                                 "version": "1.2.3", "hooks": ["alias_owner", "on_shutdown", "on_startup"],
                                 "commands": [], "error": None}
    assert plugins["auth_token"]["enabled"] is False
    assert "register_commands" in plugins["auth_token"]["hooks"] and plugins["auth_token"]["commands"] == ["users"]
    # Unset: the built-ins are enabled, a third-party plugin is not.
    unset_json = comzy_server(tmp_path, site, "plugins", "--json").stdout
    unset = {row["name"]: row["enabled"] for row in json.loads(unset_json)}
    assert unset["auth_token"] and unset["metrics"] and not unset["greeter"]


def test_plugins_exits_1_when_the_server_could_not_start(tmp_path: Path, site: Path) -> None:
    missing = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="greeter,nosuch")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "comzy-server: COMZY_PLUGINS names 'nosuch', which is not installed"
    broken = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="greeter", COMZY_GREETER_TIMES="x")
    assert broken.returncode == 1
    assert "comzy-server: plugin 'greeter' is enabled but cannot run: plugin 'greeter' failed to load: invalid " \
           "setting: COMZY_GREETER_TIMES='x'" in broken.stderr
    twice = comzy_server(tmp_path, site, "plugins", COMZY_PLUGINS="greeter,owners,greeter")
    assert twice.returncode == 1  # the server refuses a plugin enabled twice
    assert twice.stderr.strip() == "comzy-server: COMZY_PLUGINS names 'greeter' more than once: the server refuses that"


# -- what the server run does not do ------------------------------------------------------------
async def test_running_the_server_builds_no_disabled_plugin(tmp_path: Path, site: Path) -> None:
    # A disabled plugin's code never runs with the server: only commands and --help collect commands.
    (site / "comzy_noisy.py").write_text("from pathlib import Path\nPath('imported').write_text('yes')\n"
                                         "class Noisy:\n    pass\n")
    install_metadata(site, "comzy-noisy", {"noisy": "comzy_noisy:Noisy"})
    env = server_env(tmp_path / "data", PYTHONPATH=str(site))
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        await wait_banner(cli)
    assert not (tmp_path / "imported").exists()
    comzy_server(tmp_path, site, "plugins")
    assert (tmp_path / "imported").exists()  # the probe works


def test_the_core_cli_and_custom_domains_reach_no_internals() -> None:
    """cli.py names no plugin; custom_domains asks alias_owner through the public CommandContext."""
    def imported(path: Path) -> set[str]:
        return {node.module for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module}

    assert not {m for m in imported(ROOT / "comzy" / "core" / "cli.py") if m.startswith("comzy.plugins")}
    domains_cli = imported(ROOT / "comzy" / "plugins" / "custom_domains" / "cli.py")
    assert not domains_cli & {"comzy.core.hooks", "comzy.core.server"}, domains_cli

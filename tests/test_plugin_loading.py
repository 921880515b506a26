"""Finding, enabling and checking plugins: entry points, COMZY_PLUGINS, start-up errors.

Entry points are real: each test writes a small ``*.dist-info`` directory (what pip writes
for an installed package) to a temporary directory on the path, so ``importlib.metadata``
discovers them exactly as it discovers installed plugins, without a slow ``pip install``.
"""

from __future__ import annotations

import os
import re
import signal
from importlib.metadata import EntryPoint
from pathlib import Path

import httpx
import pytest

from comzy import Reject, hookimpl
from comzy.core import hooks
from comzy.core.hooks import PluginError, available_plugins, build_manager, load_plugins, select_plugins
from comzy.core.server import Ports
from tests.conftest import ROOT, start_agent
from tests.helpers import install_metadata
from tests.test_cli import SERVER, run_cli, server_env, wait_banner
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

EXAMPLE_SRC = ROOT / "examples" / "comzy-plugin-example" / "src"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path with the example plugin "installed" and a fake built-in."""
    site = tmp_path / "site"
    install_metadata(site, "comzy-plugin-example", {"example": "comzy_plugin_example:ExamplePlugin"})
    install_metadata(site, "comzy-fake-builtin", {"fake-builtin": "comzy.plugins.fake:Plugin"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    return site


# -- COMZY_PLUGINS -------------------------------------------------------------------------
def test_select_plugins_parses_the_setting(site: Path) -> None:
    assert select_plugins("none") == []
    assert select_plugins(" none ") == []
    assert select_plugins("") == []
    assert select_plugins("example") == ["example"]
    assert select_plugins(" a, b ,,c ") == ["a", "b", "c"]


def test_unset_enables_only_builtins(site: Path) -> None:
    """Installing a third-party package never changes what a server runs: it must be named, even
    when its entry point names a module inside comzy.plugins. Built-ins are comzy's own entry points."""
    assert {"example", "fake-builtin"} <= set(available_plugins())
    assert "fake-builtin" not in select_plugins(None)
    assert "example" not in select_plugins(None)
    assert {"auth_token", "custom_domains", "dashboard", "metrics"} <= set(select_plugins(None))


def test_unknown_plugin_lists_the_available_ones(site: Path) -> None:
    with pytest.raises(PluginError) as info:
        load_plugins(["example", "doesnotexist"])
    message = str(info.value)
    assert "'doesnotexist'" in message
    assert "COMZY_PLUGINS" in message
    available = message.split("available:", 1)[1]
    assert "example" in available and "fake-builtin" in available


def test_none_loads_nothing_and_the_core_still_routes(site: Path) -> None:
    assert load_plugins(select_plugins("none")) == []
    pm = build_manager("localhost", [])
    assert [name for name, _ in pm.list_name_plugin()] == ["core-routing"]
    assert pm.hook.resolve_host(host="abc.localhost", server=None) == "abc"


def test_a_real_entry_point_loads_the_example_plugin(site: Path) -> None:
    ((name, plugin),) = load_plugins(["example"])
    from comzy_plugin_example import ExamplePlugin

    assert name == "example"
    assert isinstance(plugin, ExamplePlugin)  # a class is instantiated with no arguments
    assert plugin.settings.blocked_prefix == "/private"
    pm = build_manager("localhost", [(name, plugin)])
    assert [impl.plugin_name for impl in pm.hook.before_forward.get_hookimpls()] == ["example"]


def test_plugin_settings_come_from_its_own_prefix(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_EXAMPLE_BLOCKED_PREFIX", "/secret/")
    ((_, plugin),) = load_plugins(["example"])
    assert plugin.settings.blocked_prefix == "/secret"  # type: ignore[attr-defined]
    monkeypatch.setenv("COMZY_EXAMPLE_BLOCKED_PREFIX", "no-slash")
    # Named by its variable, as a core setting is (not by pydantic's field name and a traceback).
    with pytest.raises(PluginError) as info:
        load_plugins(["example"])
    message = str(info.value)
    assert message.startswith("plugin 'example' failed to load: invalid setting: "
                              "COMZY_EXAMPLE_BLOCKED_PREFIX='no-slash': "), message
    assert "\n" not in message


# -- entry points built in the test (monkeypatched discovery) --------------------------------
class ModuleLevelPlugin:
    """A plugin object (not a class) an entry point can name directly."""

    @hookimpl
    def before_forward(self) -> None:
        raise Reject("module-level plugin says no")


INSTANCE = ModuleLevelPlugin()


def _patch_available(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    points = {name: EntryPoint(name, value, hooks.ENTRY_POINT_GROUP) for name, value in targets.items()}
    monkeypatch.setattr(hooks, "available_plugins", lambda: points)


def test_an_entry_point_may_name_an_object(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_available(monkeypatch, obj=f"{__name__}:INSTANCE", cls=f"{__name__}:ModuleLevelPlugin")
    loaded = dict(load_plugins(["obj", "cls"]))
    assert loaded["obj"] is INSTANCE  # used as is
    assert isinstance(loaded["cls"], ModuleLevelPlugin) and loaded["cls"] is not INSTANCE


def test_a_plugin_that_fails_to_import_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_available(monkeypatch, broken="comzy_no_such_module_xyz:Plugin")
    with pytest.raises(PluginError, match=r"plugin 'broken' failed to load: No module named 'comzy_no_such_mod"):
        load_plugins(["broken"])


# -- plugins that pluggy or Comzy refuse at start-up ---------------------------------------------
class Misspelt:
    @hookimpl
    def on_regster(self) -> None:
        """A typo: no such hook."""


class UnknownArgument:
    @hookimpl
    def on_register(self, registraton: object) -> None:
        """A typo in an argument name."""


class Wrapper:
    @hookimpl(wrapper=True)
    def on_register(self) -> object:
        """Wrappers cannot work: Comzy awaits each impl itself."""
        return (yield)


@pytest.mark.parametrize(("plugin", "expected"), [
    (Misspelt(), r"on_regster"),
    (UnknownArgument(), r"registraton"),
    (Wrapper(), r"on_register cannot be a \(hook\)wrapper"),
])
def test_a_broken_plugin_fails_start_up(plugin: object, expected: str) -> None:
    with pytest.raises(PluginError, match=expected):
        build_manager("localhost", [("broken", plugin)])


def test_two_plugins_with_one_name_fail_start_up() -> None:
    with pytest.raises(PluginError) as info:
        build_manager("localhost", [("twice", ModuleLevelPlugin()), ("twice", ModuleLevelPlugin())])
    # One line that says what to do, not pluggy's dump of every registered object.
    assert str(info.value) == "plugin 'twice' is enabled twice: name it once in COMZY_PLUGINS"


# -- the real comzy-server -----------------------------------------------------------------------
def _env_with_site(site: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    env = server_env(data_dir, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(EXAMPLE_SRC), str(ROOT),
                                                      env.get("PYTHONPATH", "")]))
    return env


async def test_server_refuses_an_unknown_plugin(tmp_path: Path, site: Path) -> None:
    env = _env_with_site(site, tmp_path / "data", COMZY_PLUGINS="example,doesnotexist")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code != 0, cli.describe()
    assert "doesnotexist" in cli.stderr
    assert re.search(r"available: .*\bexample\b", cli.stderr), cli.describe()
    assert "Traceback" not in cli.stderr
    assert "ready" not in cli.stderr


async def test_server_runs_a_plugin_named_in_comzy_plugins(tmp_path: Path, site: Path, upstream: Upstream) -> None:
    """The example, found through its entry point by the real comzy-server, acts on traffic."""
    env = _env_with_site(site, tmp_path / "data", COMZY_PLUGINS="example",
                         COMZY_EXAMPLE_HEADER_VALUE="from-env", COMZY_EXAMPLE_BLOCKED_PREFIX="/hidden")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        banner = await wait_banner(cli)
        assert re.search(r"\bplugins\s+example$", "\n".join(banner.lines), re.M), cli.describe()
        remote = _RemoteServer(Ports(banner.http, banner.ws, banner.admin))
        async with start_agent(remote, upstream.port) as agent:  # type: ignore[arg-type]
            host = {"host": f"{agent.alias}.localhost"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{banner.http}", timeout=5) as client:
                stamped = await client.get("/open", headers=host)
                blocked = await client.get("/hidden/file", headers=host)
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0, cli.describe()
    assert stamped.status_code == 200
    assert ["x-comzy-example", "from-env"] in stamped.json()["headers"]
    assert blocked.status_code == 403
    assert [r["path"] for r in upstream.requests] == ["/open"]


class _RemoteServer:
    """Just enough of a ServerContext for ``start_agent`` to reach a server in another process."""

    def __init__(self, ports: Ports) -> None:
        self.ports = ports


FAILING_PLUGIN = '''
from comzy import PluginError, hookimpl


class Failing:
    @hookimpl
    async def on_startup(self):
        raise PluginError("failing: cannot reach the database; check COMZY_FAILING_URL")
'''


async def test_server_reports_a_plugin_that_fails_on_startup(tmp_path: Path, site: Path) -> None:
    """A PluginError from on_startup is one clear line and exit 2, not a traceback."""
    (site / "comzy_failing_plugin.py").write_text(FAILING_PLUGIN)
    install_metadata(site, "comzy-failing-plugin", {"failing": "comzy_failing_plugin:Failing"})
    env = _env_with_site(site, tmp_path / "data", COMZY_PLUGINS="failing")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code == 2, cli.describe()
    assert "comzy-server: failing: cannot reach the database; check COMZY_FAILING_URL" in cli.lines["stderr"]
    assert "Traceback" not in cli.stderr
    assert "ready" not in cli.stderr


def test_a_built_in_plugins_bad_setting_stops_the_server_naming_its_variable(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import PYTHON, cli_env

    environment = cli_env(COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0", COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0",
                          COMZY_DATA_DIR=str(tmp_path / "data"), COMZY_PLUGINS="auth_token",
                          COMZY_AUTH_MAX_FAILURES_PER_MINUTE="five")
    result = subprocess.run([PYTHON, "-m", "comzy.core.cli"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "comzy-server: plugin 'auth_token' failed to load: invalid setting: "
        "COMZY_AUTH_MAX_FAILURES_PER_MINUTE='five': Input should be a valid integer, unable to parse string "
        "as an integer")

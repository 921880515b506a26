"""The rule behind the plugin architecture: the core and the agent know no plugin.

Nothing under comzy/core or comzy/agent imports comzy.plugins, and the whole tunnel (server,
agent, a request through it) runs from a copy of the package whose comzy/plugins folder was
deleted, with COMZY_PLUGINS=none: a plugin's folder is all it takes to remove one.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_env
from tests.test_large_transfers import popen, read_until
from tests.upstream import serve_upstream

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "comzy"
PLUGINS = "comzy.plugins"


def plugin_imports(path: Path) -> list[str]:
    """Every ``comzy.plugins`` module that ``path`` imports (statically or by name), as ``line: name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and _called(node) in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]  # importlib.import_module("comzy.plugins...")
        found += [f"{node.lineno}: {name}" for name in names
                  if name == PLUGINS or name.startswith(PLUGINS + ".")]
    return found


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_the_rule_catches_an_import(tmp_path: Path) -> None:
    """The checker itself: each way of importing a plugin is seen."""
    sample = tmp_path / "sample.py"
    sample.write_text("import comzy.plugins.auth_token\n"
                      "from comzy.plugins.custom_domains.cli import run\n"
                      "from comzy import plugins\n"
                      "import importlib\nimportlib.import_module('comzy.plugins.metrics')\n"
                      "from comzy.core import db\n")
    assert plugin_imports(sample) == [
        "1: comzy.plugins.auth_token",
        "2: comzy.plugins.custom_domains.cli", "2: comzy.plugins.custom_domains.cli.run",
        "3: comzy.plugins",
        "5: comzy.plugins.metrics",
    ]


@pytest.mark.parametrize("part", ["core", "agent"])
def test_core_and_agent_import_no_plugin(part: str) -> None:
    offenders = {str(path.relative_to(ROOT)): found for path in sorted((PACKAGE / part).rglob("*.py"))
                 if (found := plugin_imports(path))}
    assert offenders == {}, f"comzy/{part} must reach plugins only through hooks and entry points"


def test_package_root_imports_no_plugin() -> None:
    assert plugin_imports(PACKAGE / "__init__.py") == []


# Runs a module as ``python -m`` would, without the development install's import hook: that hook
# (pip install -e) finds comzy/plugins in the checkout, which an installed wheel would not have.
LAUNCHER = """\
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.fixture
def without_plugins(tmp_path: Path) -> list[str]:
    """The command prefix that runs a module from a copy of comzy without comzy/plugins."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "comzy", ignore=shutil.ignore_patterns("plugins", "__pycache__"))
    (site / "launch.py").write_text(LAUNCHER)
    (site / "probe.py").write_text("import importlib.util, comzy\n"
                                   "print(comzy.__file__)\nprint(importlib.util.find_spec('comzy.plugins'))\n")
    prefix = [sys.executable, str(site / "launch.py")]
    seen = subprocess.run([*prefix, "probe"], env=cli_env(PYTHONPATH=str(site)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert seen == [str(site / "comzy" / "__init__.py"), "None"]
    return prefix


@pytest.mark.anyio
async def test_tunnel_runs_with_the_plugins_folder_deleted(without_plugins: list[str], tmp_path: Path) -> None:
    site = str(tmp_path / "site")
    env = cli_env(PYTHONPATH=site, COMZY_HOST="127.0.0.1", COMZY_HTTP_PORT="0",
                  COMZY_WS_PORT="0", COMZY_ADMIN_PORT="0", COMZY_DATA_DIR=str(tmp_path / "data"), COMZY_PLUGINS="none")
    async with serve_upstream() as upstream:
        with popen([*without_plugins, "comzy.core.cli"], env) as server:
            http_port = int((await read_until(server, r"public\s+http://[\d.]+:(\d+)"))[1])
            ws_port = int((await read_until(server, r"agents\s+ws://[\d.]+:(\d+)"))[1])
            await read_until(server, r"plugins\s+none")
            agent_cmd = [*without_plugins, "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1",
                         "--server", f"ws://127.0.0.1:{ws_port}"]
            with popen(agent_cmd, cli_env(PYTHONPATH=site)) as agent:
                alias = (await read_until(agent, r"Public URL: http://([a-z0-9-]+)\."))[1]
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30,
                                             headers={"host": f"{alias}.localhost"}) as client:
                    response = await client.get("/through/the/core?alone=1")
                assert response.status_code == 200
                assert response.json()["raw_path"] == "/through/the/core"
                agent.terminate()
            server.terminate()


#: What a plugin may import from Comzy: the documented public modules (docs/plugin_hooks.md).
PUBLIC_MODULES = {"comzy", "comzy.db", "comzy.aliases", "comzy.account_api", "comzy.migrations", "comzy.assets"}


def comzy_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``comzy...`` module ``path`` imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "comzy"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "comzy":
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("plugin", sorted(p.name for p in (PACKAGE / "plugins").iterdir()
                                          if (p / "__init__.py").exists()))
def test_builtin_plugins_use_only_the_public_api(plugin: str) -> None:
    """A built-in plugin is an ordinary plugin: it imports the public modules and its own package,
    never the core's internals or another plugin, so a third-party plugin can do all it does."""
    own = f"comzy.plugins.{plugin}"
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in sorted((PACKAGE / "plugins" / plugin).rglob("*.py"))
                 for line, module in comzy_imports(path)
                 if module not in PUBLIC_MODULES and module != own and not module.startswith(own + ".")]
    assert offenders == []


def test_the_public_modules_exist_and_say_what_they_export() -> None:
    import importlib

    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        assert module.__doc__, name
        assert all(hasattr(module, export) for export in module.__all__), name

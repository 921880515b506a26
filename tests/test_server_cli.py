"""``comzy-server`` explains itself: settings given as options, ports in use, the start-up lines,
``comzy-server settings``, ``comzy-server check`` and ``--help`` (completion: tests/test_completion.py).

Every test runs the real ``comzy-server`` in a subprocess; a server that must start is waited for
by its ``ready`` lines, never by a sleep.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import URL

from comzy.core.cluster.settings import ClusterSettings
from comzy.core.inventory import model_variables
from comzy.core.server import ListenError
from comzy.core.settings import ServerSettings
from tests.conftest import PYTHON, cli_env, start_server
from tests.helpers import scratch_database
from tests.test_cli import SERVER, dead_port, run_cli, self_signed_certificate, server_env, wait_banner

pytestmark = pytest.mark.anyio


def comzy_server(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``comzy-server ARGS`` to its end."""
    return subprocess.run([PYTHON, "-m", SERVER, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@contextmanager
def held_port() -> Iterator[int]:
    """A loopback port something else listens on, for the test's duration."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def check_lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``comzy-server check``'s lines by check name: ``{"public port": "FAILED  public port: ..."}``."""
    lines = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(ok|FAILED)\s+([^:]+): ", line)
        if match:
            lines[match.group(2)] = line
    return lines


# -- Settings given as options ----------------------------------------------------------------
@pytest.mark.parametrize(("args", "told"), [
    (["--port", "9000"], "COMZY_HTTP_PORT=9000"),
    (["--port=9000"], "COMZY_HTTP_PORT=9000"),
    (["9000"], "COMZY_HTTP_PORT=9000"),
    (["--admin-port", "9100"], "COMZY_ADMIN_PORT=9100"),
    (["--ws-port", "9101"], "COMZY_WS_PORT=9101"),
    (["--domain", "tunnel.example.com"], "COMZY_BASE_DOMAIN=tunnel.example.com"),
    (["--host", "127.0.0.1"], "COMZY_HOST=127.0.0.1"),
    (["--data-dir", "/srv/comzy"], "COMZY_DATA_DIR=/srv/comzy"),
    (["--require-token"], "COMZY_REQUIRE_TOKEN=true"),  # a plugin's setting
    (["--nats-url", "nats://ana:s3cret@nats.example.com:4222"], "COMZY_NATS_URL=nats://ana:***@nats.example.com"),
])
def test_a_setting_given_as_an_option_names_its_variable(tmp_path: Path, args: list[str], told: str) -> None:
    result = comzy_server(tmp_path, *args, env=server_env(tmp_path / "data"))
    assert result.returncode == 2, result
    assert told in result.stderr, result.stderr
    assert "environment variables" in result.stderr and "comzy-server settings" in result.stderr
    assert "invalid choice" not in result.stderr and "s3cret" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "data").exists()


def test_an_unknown_option_says_where_settings_are(tmp_path: Path) -> None:
    result = comzy_server(tmp_path, "--frobnicate", "yes", env=server_env(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.startswith("comzy-server: --frobnicate is not an option"), result.stderr
    assert "COMZY_*" in result.stderr and "comzy-server settings" in result.stderr


def test_a_mistyped_command_gets_a_suggestion(tmp_path: Path) -> None:
    result = comzy_server(tmp_path, "chek", env=server_env(tmp_path / "data"))
    assert result.returncode == 2
    assert "did you mean 'check'?" in result.stderr, result.stderr


# -- Ports in use ----------------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["COMZY_HTTP_PORT", "COMZY_WS_PORT", "COMZY_ADMIN_PORT", "HTTP_PORT"])
async def test_a_port_in_use_names_its_variable(tmp_path: Path, variable: str) -> None:
    with held_port() as port:
        env = server_env(tmp_path / "data")
        if variable == "HTTP_PORT":  # the seed's name, as the user set it, is the one named
            del env["COMZY_HTTP_PORT"]
        env[variable] = str(port)
        async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
            code = await cli.wait_exit(within=20)
        checked = comzy_server(tmp_path, "check", env=env)
    assert code == 1, cli.describe()
    errors = [line for line in cli.lines["stderr"] if line.strip()]
    assert len(errors) == 1, cli.describe()
    assert errors[0].startswith(f"comzy-server: cannot listen on 127.0.0.1:{port}"), cli.describe()
    assert f"{variable}={port}" in errors[0] and "in use" in errors[0]
    assert f"set {variable} to a free port" in errors[0]
    if variable == "HTTP_PORT":
        assert "COMZY_HTTP_PORT" not in errors[0]
    assert "ready" not in cli.stderr and "Traceback" not in cli.stderr
    # `check` says the same, on the line of that port, and fails.
    assert checked.returncode == 1, checked
    failed = [line for line in check_lines(checked).values() if line.startswith("FAILED")]
    assert len(failed) == 1 and f"{variable}={port}" in failed[0] and "in use" in failed[0], checked.stdout


async def test_the_ports_a_failed_start_had_bound_are_released(tmp_path: Path) -> None:
    # The admin port is bound after the public one: its failure must not leave the public one taken
    # (in a process that goes on, such as one running servers in its tests).
    with dead_port() as public:
        pass  # a port nothing holds
    with held_port() as admin, pytest.raises(ListenError) as failure:
        async with start_server(tmp_path / "data", http_port=public, admin_port=admin):
            pass
    assert f"COMZY_ADMIN_PORT={admin}" in str(failure.value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", public))  # while the failure (and its traceback) is still held


# -- What the server says at start-up --------------------------------------------------------
async def test_start_up_names_the_database_and_where_the_admin_token_lives(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = server_env(data, COMZY_PLUGINS="auth_token,metrics")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        banner = await wait_banner(cli)
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0, cli.describe()
    text = "\n".join(banner.lines)
    database = data / "comzy.db"
    assert re.search(rf"\bdatabase sqlite\+aiosqlite:///{re.escape(str(database))}  \(for auth_token\)$", text,
                     re.M), text
    assert re.search(rf"\badmin\s+http://127\.0\.0\.1:{banner.admin}\s+\(token: {re.escape(str(data))}/admin_token\)",
                     text), text
    assert (data / "admin_token").read_text().strip() not in text
    assert re.search(r"\bplugins\s+auth_token, metrics$", text, re.M), text


async def test_start_up_says_when_no_database_is_used(tmp_path: Path) -> None:
    async with run_cli(SERVER, env=server_env(tmp_path / "data"), cwd=tmp_path) as cli:
        banner = await wait_banner(cli)
    assert re.search(r"\bdatabase none \(no enabled plugin keeps data\)$", "\n".join(banner.lines), re.M)


# -- comzy-server settings -------------------------------------------------------------------
def test_settings_lists_every_variable_with_secrets_masked(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", COMZY_PLUGINS="auth_token,metrics", COMZY_ADMIN_TOKEN="tok-s3cret",
                     COMZY_DATABASE_URL="postgresql://ana:pw-s3cret@db.example.com/comzy",
                     COMZY_REQUIRE_TOKEN="true", COMZY_NATS_PASSWORD="nats-s3cret")
    result = comzy_server(tmp_path, "settings", env=env)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if line and not line.startswith("#"))
    assert values["COMZY_HTTP_PORT"] == "0"
    assert values["COMZY_WS_PORT"] == "0"
    assert values["COMZY_ADMIN_TOKEN"] == "***"
    assert values["COMZY_DATABASE_URL"] == "postgresql://ana:***@db.example.com/comzy"
    assert values["COMZY_NATS_PASSWORD"] == "***"
    assert values["COMZY_REQUIRE_TOKEN"] == "true"  # the enabled plugin's
    assert values["COMZY_BASE_DOMAIN"] == "localhost"  # a default
    assert "# COMZY_PUBLIC_URL=" in result.stdout.splitlines()  # unset: commented out
    assert not any(name.startswith("COMZY_DASHBOARD_") for name in values)  # not enabled
    assert "Plugins without settings: metrics." in result.stdout
    # Every variable of the core's and the cluster's models, whatever the text says about them.
    for model in (ServerSettings, ClusterSettings):
        for name, info in model.model_fields.items():
            variable = model_variables(model, name, info)[0]
            assert variable in values or f"# {variable}=" in result.stdout, variable
    assert "# Public HTTP listener port (visitors)." in result.stdout
    assert "docs/" not in result.stdout  # a pip user has no docs/ folder to look in


def test_settings_as_json_say_where_each_value_came_from(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("COMZY_BASE_DOMAIN=from-dotenv.example.com\n")
    env = server_env(tmp_path / "data", COMZY_PLUGINS="dashboard", COMZY_DASHBOARD_FEED_QUEUE="50")
    result = comzy_server(tmp_path, "settings", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["variable"]: row for row in json.loads(result.stdout)}
    assert rows["COMZY_HTTP_PORT"] | {"description": ""} == {
        "section": "core", "variable": "COMZY_HTTP_PORT", "aliases": ["HTTP_PORT"], "value": "0", "default": "8190",
        "source": "environment", "secret": False, "description": ""}
    assert rows["COMZY_BASE_DOMAIN"]["value"] == "from-dotenv.example.com"
    assert rows["COMZY_BASE_DOMAIN"]["source"] == ".env"
    assert rows["COMZY_SHUTDOWN_GRACE"]["source"] == "default"
    assert rows["COMZY_DASHBOARD_FEED_QUEUE"]["section"] == "plugin dashboard"
    assert rows["COMZY_DASHBOARD_FEED_QUEUE"]["value"] == "50"
    assert rows["COMZY_ADMIN_TOKEN"]["secret"] is True and rows["COMZY_ADMIN_TOKEN"]["value"] is None
    assert rows["COMZY_NATS_URL"]["section"] == "cluster"


def test_the_settings_listing_is_a_dotenv_file_that_reads_back(tmp_path: Path) -> None:
    data = tmp_path / "a dir with spaces" / "data"
    env = server_env(data, COMZY_PLUGINS="custom_domains", COMZY_PUBLIC_URL="https://{alias}.example.com",
                     COMZY_CUSTOM_DOMAINS_MAPPINGS="shop.example.com:ana-shop", COMZY_TRUSTED_PROXIES="10.0.0.0/8")
    first = comzy_server(tmp_path, "settings", "--json", env=env)
    listing = comzy_server(tmp_path, "settings", env=env)
    assert first.returncode == 0 and listing.returncode == 0, first.stderr + listing.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text(listing.stdout)
    # Nothing in the environment this time (COMZY_NATS_URL aside, which the test harness sets).
    again = comzy_server(elsewhere, "settings", "--json", env=cli_env(COMZY_PLUGINS="custom_domains"))
    assert again.returncode == 0, again.stderr
    before = {row["variable"]: row["value"] for row in json.loads(first.stdout)}
    after = {row["variable"]: row for row in json.loads(again.stdout)}
    assert before["COMZY_DATA_DIR"] == str(data)
    for variable, value in before.items():
        if variable in ("COMZY_NATS_URL", "COMZY_PLUGINS", "COMZY_HTTP_SERVER"):
            continue  # set by cli_env in both runs (COMZY_HTTP_SERVER in CI's hypercorn pass)
        assert after[variable]["value"] == value, variable
        if value is not None and value != after[variable]["default"]:
            assert after[variable]["source"] == ".env", variable


def test_settings_with_a_bad_value_still_list_and_name_it(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", COMZY_HTTP_PORT="abc", COMZY_PLUGINS="nope")
    result = comzy_server(tmp_path, "settings", env=env)
    assert result.returncode == 1
    assert "COMZY_HTTP_PORT=abc" in result.stdout.splitlines()
    assert "COMZY_HTTP_PORT='abc'" in result.stderr
    assert "plugin 'nope'" in result.stderr and "not installed" in result.stderr


# -- comzy-server check ----------------------------------------------------------------------
def test_check_passes_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = comzy_server(tmp_path, "check", env=server_env(data, COMZY_PLUGINS="auth_token,metrics"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = check_lines(result)
    assert set(lines) == {"settings", "plugins", "tls", "data", "admin token", "public port", "agent port",
                          "admin port", "database"}, result.stdout
    assert all(line.startswith("ok  ") for line in lines.values()), result.stdout
    assert result.stdout.splitlines()[-1] == "all 9 checks passed"
    assert "no file yet" in lines["database"]
    assert not data.exists()  # nothing made: start-up makes the directory and the database


async def test_check_reads_the_sqlite_database_a_server_made(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", COMZY_PLUGINS="auth_token")
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        await wait_banner(cli)
        checked = comzy_server(tmp_path, "check", env=env)  # while the server runs: ports are 0
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    assert checked.returncode == 0, checked.stdout
    assert re.search(r"^ok\s+database: sqlite\S+comzy\.db: core and auth_token at head$", checked.stdout, re.M)


def test_check_reports_a_bad_setting_as_start_up_does(tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", COMZY_HTTP_PORT="abc")
    started = comzy_server(tmp_path, env=env)
    checked = comzy_server(tmp_path, "check", env=env)
    assert started.returncode == 2 and checked.returncode == 1
    message = started.stderr.strip().removeprefix("comzy-server: ")
    assert message.startswith("invalid setting: COMZY_HTTP_PORT='abc'")
    assert check_lines(checked)["settings"].startswith(f"FAILED  settings: {message}")


@pytest.mark.parametrize(("extra", "name", "said"), [
    ({"COMZY_PLUGINS": "nope"}, "plugins", "COMZY_PLUGINS names 'nope', which is not installed"),
    ({"COMZY_PLUGINS": "dashboard", "COMZY_DASHBOARD_FEED_QUEUE": "1"}, "plugins",
     "COMZY_DASHBOARD_FEED_QUEUE='1'"),
    ({"SSL_CERT_PATH": "/nonexistent/cert.pem", "SSL_KEY_PATH": "/nonexistent/key.pem"}, "tls",
     "SSL_CERT_PATH=/nonexistent/cert.pem: no such file"),
    ({"SSL_CERT_PATH": "/nonexistent/cert.pem"}, "tls", "set both for TLS"),
    ({"COMZY_DATA_DIR": "FILE"}, "data", "is not a directory"),
    ({"COMZY_WS_PORT": "SAME", "COMZY_HTTP_PORT": "SAME"}, "agent port", "is also COMZY_HTTP_PORT"),
    ({"COMZY_ROLE": "edge", "COMZY_NATS_URL": "http://nats.example.com"}, "cluster", "COMZY_NATS_URL"),
])
def test_check_fails_naming_what_to_fix(tmp_path: Path, extra: dict[str, str], name: str, said: str) -> None:
    if "SAME" in extra.values():
        with dead_port() as port:
            pass  # a port nothing holds: both listeners are given it
        extra = {name: str(port) if value == "SAME" else value for name, value in extra.items()}
    if extra.get("COMZY_DATA_DIR") == "FILE":
        (tmp_path / "a-file").write_text("")
        extra = dict(extra, COMZY_DATA_DIR=str(tmp_path / "a-file"))
    if extra.get("COMZY_ROLE") and not _has_module("nats"):
        pytest.skip("the nats extra is needed for a cluster role")
    result = comzy_server(tmp_path, "check", env=server_env(tmp_path / "data", **extra))
    assert result.returncode == 1, result.stdout
    lines = check_lines(result)
    assert lines[name].startswith(f"FAILED  {name}: "), result.stdout
    assert said in lines[name], result.stdout
    failed = [line for line in lines.values() if line.startswith("FAILED")]
    assert failed == [lines[name]], result.stdout
    assert re.fullmatch(r"1 of \d+ checks FAILED", result.stdout.splitlines()[-1])
    assert "Traceback" not in result.stderr


async def test_check_accepts_a_certificate_that_loads(tmp_path: Path) -> None:
    cert, key = await self_signed_certificate(tmp_path)
    result = comzy_server(tmp_path, "check", env=server_env(tmp_path / "data", SSL_CERT_PATH=str(cert),
                                                            SSL_KEY_PATH=str(key)))
    assert result.returncode == 0, result.stdout
    assert f"certificate {cert} and key {key} load" in check_lines(result)["tls"]


def test_check_fails_on_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    with dead_port() as port:
        url = f"mysql+aiomysql://comzy:pw-s3cret@127.0.0.1:{port}/comzy"
        env = server_env(tmp_path / "data", COMZY_PLUGINS="auth_token", COMZY_DATABASE_URL=url)
        result = comzy_server(tmp_path, "check", env=env)
    assert result.returncode == 1, result.stdout
    line = check_lines(result)["database"]
    assert line.startswith(f"FAILED  database: cannot use mysql+aiomysql://comzy:***@127.0.0.1:{port}/comzy: ")
    assert "COMZY_DATABASE_URL" in line
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize("service", ["mariadb", "postgres"])
async def test_check_says_to_upgrade_a_database_behind_head(tmp_path: Path, service: str) -> None:
    async for url in scratch_database(service):
        env = server_env(tmp_path / "data", COMZY_PLUGINS="auth_token", COMZY_DATABASE_URL=_with_password(url))
        before = comzy_server(tmp_path, "check", env=env)
        assert before.returncode == 1, before.stdout
        line = check_lines(before)["database"]
        assert line.startswith("FAILED  database: ") and "run `comzy-server db upgrade`" in line, line
        assert "auth_token: revision none" in line
        upgraded = comzy_server(tmp_path, "db", "upgrade", env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        after = comzy_server(tmp_path, "check", env=env)
        assert after.returncode == 0, after.stdout
        assert check_lines(after)["database"].endswith("reachable, core and auth_token at head")
        assert "s3cret" not in before.stdout + after.stdout


def _with_password(url: URL) -> str:
    """``url`` as text; on PostgreSQL, whose test service trusts every local user, with a password it
    ignores, to look for in the output (were it not masked)."""
    if url.get_backend_name() == "postgresql" and not url.password:
        url = url.set(password="pw-s3cret")
    return url.render_as_string(hide_password=False)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- --help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["db"], ["plugins"], ["settings"], ["check"], ["completion"],
                                     ["users"], ["domains"]])  # the last two: plugins' epilogs (Commands.add)
def test_help_has_examples_and_no_file_a_pip_user_lacks(tmp_path: Path, command: list[str]) -> None:
    result = comzy_server(tmp_path, *command, "--help", env=cli_env(COLUMNS="100"))
    assert result.returncode == 0, result.stderr
    assert "docs/" not in result.stdout, result.stdout
    assert "\nexamples:\n" in result.stdout, result.stdout
    # Prose (the lines that start at the margin) is wrapped to the terminal; examples are kept as
    # written. COLUMNS is argparse's width.
    assert max(len(line) for line in result.stdout.splitlines() if not line.startswith(" ")) <= 100, result.stdout
    if not command:
        for variable in ("COMZY_BASE_DOMAIN", "COMZY_HTTP_PORT", "COMZY_WS_PORT", "COMZY_ADMIN_PORT",
                         "COMZY_DATA_DIR", "COMZY_PLUGINS", "COMZY_DATABASE_URL"):
            assert re.search(rf"^  {variable}\s", result.stdout, re.M), variable
        assert "comzy-server settings" in result.stdout and "comzy-server check" in result.stdout


def test_the_help_defaults_are_the_models(tmp_path: Path) -> None:
    result = comzy_server(tmp_path, "--help", env=cli_env(HOME=str(tmp_path), XDG_DATA_HOME=""))
    for name in ("http_port", "ws_port", "admin_port", "base_domain", "host", "admin_host", "log_level"):
        info = ServerSettings.model_fields[name]
        variable = model_variables(ServerSettings, name, info)[0]
        assert re.search(rf"^  {variable}\s+{re.escape(str(info.default))}\s", result.stdout, re.M), variable
    assert re.search(r"^  COMZY_DATA_DIR\s+~/\.local/share/comzy\s", result.stdout, re.M), result.stdout

"""``comzy-server`` as an edge and as a control node: real processes against a real nats-server.

Readiness is the server's ``ready`` line; ports are 0. Bad cluster settings end start-up with
one line naming the variable (exit 2), and a node waits for NATS rather than failing.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest

from comzy.core.cluster.settings import ClusterSettings
from tests.cluster.conftest import NatsServer
from tests.conftest import PYTHON, ROOT, cli_env
from tests.test_cli import SERVER, Cli, run_cli, server_env

pytestmark = pytest.mark.anyio


def node_env(tmp_path: Path, nats: NatsServer | None, role: str, **extra: str) -> dict[str, str]:
    values = {"COMZY_ROLE": role, "COMZY_CLUSTER_NAME": "proc", "COMZY_NODE_NAME": role,
              "COMZY_CLUSTER_NODE_TTL": "1", **extra}
    if nats is not None:
        values.setdefault("COMZY_NATS_URL", nats.url)
    return server_env(tmp_path / f"data-{role}", **values)


async def ready(cli: Cli, role: str) -> tuple[str, int, list[str]]:
    """The node id and admin port from a node's start-up lines."""
    match = await cli.wait_for(rf"comzy-server \S+ ready as {role} node ({role}-[0-9a-f]{{8}})$", stream="stderr",
                               within=20)
    admin = await cli.wait_for(r"\badmin\s+http://127\.0\.0\.1:(\d+)", stream="stderr")
    await cli.wait_for(r"\bdata\s+\S", stream="stderr")
    return match.group(1), int(admin.group(1)), list(cli.lines["stderr"])


async def health(admin: int, data_dir: Path) -> dict[str, object]:
    token = (data_dir / "admin_token").read_text().strip()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{admin}/healthz", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize(("role", "binds", "skips"), [("edge", "public", "agents"), ("control", "agents", "public")])
async def test_a_node_starts_with_its_role_listeners_and_stops_on_sigterm(
        tmp_path: Path, nats_server: NatsServer, role: str, binds: str, skips: str) -> None:
    env = node_env(tmp_path, nats_server, role, COMZY_NATS_URL=f"nats://node:s3cret@127.0.0.1:{nats_server.port}")
    # nats-server without auth accepts (and ignores) the credentials: enough to see they are masked.
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        node, admin, lines = await ready(cli, role)
        text = "\n".join(lines)
        assert re.search(rf"^.*\b{binds}\s+\S+://127\.0\.0\.1:\d+", text, re.M), text
        assert not re.search(rf"\b{skips}\s+\S+://", text), text
        assert f"cluster  proc on NATS nats://node:***@127.0.0.1:{nats_server.port}" in text, text
        assert "s3cret" not in cli.stderr
        body = await health(admin, tmp_path / f"data-{role}")
        assert body["role"] == role and body["node"] == node and body["nats"] == "connected", body
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit(within=20) == 0, cli.describe()
    assert "s3cret" not in cli.stderr + cli.stdout


async def test_a_node_waits_for_nats_and_is_ready_once_it_answers(tmp_path: Path, nats_server: NatsServer) -> None:
    nats_server.kill9()  # its port is known: the node is pointed at a NATS that is down
    async with run_cli(SERVER, env=node_env(tmp_path, nats_server, "control"), cwd=tmp_path) as cli:
        await cli.wait_for(r"cannot connect to NATS at nats://127\.0\.0\.1:\d+: .*; retrying", stream="stderr")
        assert "ready" not in cli.stderr
        nats_server.start()
        _, admin, _ = await ready(cli, "control")
        assert (await health(admin, tmp_path / "data-control"))["nats"] == "connected"
        cli.signal(signal.SIGTERM)
        assert await cli.wait_exit(within=20) == 0, cli.describe()


@pytest.mark.parametrize(("name", "value", "says"), [
    ("COMZY_CLUSTER_NAME", "Main.Cluster", "must be 1 to 32 of a-z"),
    ("COMZY_NATS_URL", "http://u:pw@127.0.0.1:4222", "is not a NATS URL"),
    ("COMZY_CLUSTER_NODE_TTL", "0", "greater than or equal to 1"),
    ("COMZY_NODE_NAME", "a.b", "it becomes part of NATS subjects"),
    ("COMZY_NATS_TLS_CERT", "/nonexistent/cert.pem", "no such file"),
    ("COMZY_ROLE", "relay", "'all', 'edge' or 'control'"),
])
async def test_bad_cluster_settings_fail_with_one_line_naming_the_variable(
        tmp_path: Path, name: str, value: str, says: str) -> None:
    env = node_env(tmp_path, None, "edge", **{name: value})
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code == 2, cli.describe()
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, cli.describe()
    assert lines[0].startswith("comzy-server: invalid setting: ") and name in lines[0] and says in lines[0], lines
    assert "pw" not in cli.stderr


async def test_a_nats_too_small_for_the_request_head_is_refused(tmp_path: Path, nats_server: NatsServer) -> None:
    # nats-server's max_payload is 1 MiB: a 1 MiB request head cannot fit in a link message.
    env = node_env(tmp_path, nats_server, "edge", COMZY_MAX_REQUEST_HEAD=str(1024 * 1024))
    async with run_cli(SERVER, env=env, cwd=tmp_path) as cli:
        code = await cli.wait_exit(within=20)
    assert code == 2, cli.describe()
    assert "comzy-server: NATS max_payload 1024 KiB is too small for COMZY_MAX_REQUEST_HEAD=1048576" in cli.stderr
    assert "Traceback" not in cli.stderr and "ready" not in cli.stderr


async def test_a_cluster_role_without_the_nats_extra_says_what_to_install(tmp_path: Path) -> None:
    # A None in sys.modules makes the package unimportable, as in an install without the extra.
    (tmp_path / "no_nats.py").write_text("import sys\nsys.modules['nats'] = None\n"
                                         "from comzy.core.cli import main\nmain([])\n")
    async with run_cli("no_nats", env=node_env(tmp_path, None, "control"), cwd=tmp_path) as cli:
        code = await cli.wait_exit()
    assert code == 2, cli.describe()
    assert cli.stderr.strip() == "comzy-server: COMZY_ROLE=control needs the nats extra: pip install 'comzy[nats]'"


def test_every_cluster_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in ClusterSettings.model_fields.items():
        canonical = field.validation_alias.choices[0]  # type: ignore[union-attr]
        assert f"`{canonical}`" in doc, f"{canonical} ({name}) is missing from docs/configuration.md"


def test_role_all_needs_no_nats() -> None:
    # The default role imports nothing of NATS (the extra is optional for a single server).
    import subprocess

    code = ("import sys; import comzy.core.cli, comzy.core.server, comzy.core.cluster, comzy.core.cluster.settings; "
            "print('nats' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert result.stdout.strip() == "False"

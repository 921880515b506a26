"""The look the admin dashboard and the agent's inspector share (comzy/assets: base.css and the icon):
one copy in the package, served by both programs under their own asset paths, linked by both pages
before their own stylesheet, with no inline style (their Content-Security-Policy forbids it)."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

import httpx
import pytest

from comzy import assets
from comzy.agent import inspector_page
from comzy.plugins.dashboard import Dashboard
from tests.conftest import ROOT, admin_client, start_server

pytestmark = pytest.mark.anyio

PAGES = {"dashboard": (ROOT / "comzy/plugins/dashboard/static", "/static/"),
         "inspector": (ROOT / "comzy/agent/inspector_assets", "/assets/")}


def test_one_copy_ships_and_only_its_names_are_read() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["comzy.assets"]
    folder = resources.files("comzy.assets")
    shipped = sorted(item.name for item in folder.iterdir() if not item.name.endswith((".py", "__pycache__")))
    assert shipped == sorted(assets.FILES)
    assert all(any(Path(name).match(pattern) for pattern in patterns) for name in shipped)
    for name in assets.FILES:
        assert assets.read(name) == folder.joinpath(name).read_bytes()
    for name in ("__init__.py", "../agent/inspector_page.py", "", "style.css", "BASE.CSS"):
        assert assets.read(name) is None, name
    # No page keeps a copy of its own.
    for folder_path, _ in PAGES.values():
        assert not any((folder_path / name).exists() for name in assets.FILES), folder_path


def test_each_page_links_the_shared_look_first_and_has_no_inline_style() -> None:
    for folder, prefix in PAGES.values():
        html = (folder / "index.html").read_text()
        sheets = re.findall(r'<link rel="stylesheet" href="([^"]+)">', html)
        assert sheets == [f"{prefix}base.css", f"{prefix}style.css"], folder
        assert f'href="{prefix}favicon.svg"' in html
        assert "<style" not in html and not re.search(r'\sstyle\s*=', html)
    # The inspector's table serves the shared files at the paths its page links.
    assert set(inspector_page.SHARED_ASSETS) == {f"/assets/{name}" for name in assets.FILES}
    for path, name in inspector_page.SHARED_ASSETS.items():
        reply = inspector_page.asset(path)
        assert reply is not None and reply.body == assets.read(name)
        assert (b"content-type", assets.FILES[name].encode()) in reply.headers


async def test_the_admin_listener_serves_the_same_bytes(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("dashboard", Dashboard())]) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.admin}") as anonymous:
            assert (await anonymous.get("/static/base.css")).status_code == 401  # behind the admin token too
        async with admin_client(server) as admin:
            for name, content_type in assets.FILES.items():
                answer = await admin.get(f"/static/{name}")
                assert answer.status_code == 200, name
                assert answer.headers["content-type"] == content_type
                assert answer.content == assets.read(name)

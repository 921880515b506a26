"""What the `comzy` agent says when it is used wrongly, and what its --help tells (issue 16):
usage errors of the command that was mistyped, suggestions, one error prefix, --subdomain as typed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from comzy.agent import cli
from tests.conftest import ROOT, start_server
from tests.test_cli import run_agent
from tests.upstream import Upstream


def comzy(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``comzy ARGV`` in this process, for the words only (every case here exits before connecting)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    printed = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), printed.out, printed.err


@pytest.mark.parametrize(("typed", "meant"), [("statsu", "status"), ("logni", "login"), ("alias", "aliases"),
                                              ("lgout", "logout")])
def test_a_mistyped_command_is_answered_with_the_command_meant(
        capsys: pytest.CaptureFixture[str], typed: str, meant: str) -> None:
    code, out, err = comzy(capsys, typed)
    assert (code, out) == (2, "")
    assert err.startswith("usage: comzy ")
    assert err.endswith(f"\ncomzy: unknown command '{typed}'; did you mean {meant}?\n"), err


def test_a_word_near_no_command_is_neither_a_port_nor_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = comzy(capsys, "abc")
    assert code == 2
    assert err.endswith("comzy: argument port: 'abc' is neither a port number nor a command (try: comzy 3000, "
                        f"or one of {', '.join(cli.COMMANDS)})\n"), err
    # A port still is one, wherever the options are.
    assert cli.parse_args(["3000"]).port == 3000
    assert cli.parse_args(["--quiet", "8080"]).port == 8080


@pytest.mark.parametrize(("argv", "usage", "error"), [
    (["login", "--tokn", "x"], "usage: comzy login ", "unrecognized arguments: --tokn x (did you mean --token?)"),
    (["status", "--sever", "ws://x"], "usage: comzy status ",
     "unrecognized arguments: --sever ws://x (did you mean --server?)"),
    (["aliases", "release", "mine", "--bogus"], "usage: comzy aliases release ", "unrecognized arguments: --bogus"),
    (["logout", "now"], "usage: comzy logout ", "unrecognized arguments: now"),
    (["login", "--token"], "usage: comzy login ", "argument --token: expected one argument"),
])
def test_a_commands_usage_error_shows_that_commands_usage(
        capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, error: str) -> None:
    code, out, err = comzy(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(usage), err
    assert err.endswith(f"\ncomzy: {error}\n"), err


def test_every_agent_error_has_one_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["statsu"], ["login", "--tokn", "x"], ["3000", "--host-header", "keep"]):
        _, _, err = comzy(capsys, *argv)
        assert err.splitlines()[-1].startswith("comzy: ") and "error:" not in err, err


def test_help_lists_examples_and_every_environment_variable_the_agent_reads(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = comzy(capsys, "--help")
    assert code == 0
    assert "examples:\n  comzy 3000 " in out
    source = "\n".join(path.read_text() for path in (ROOT / "comzy" / "agent").glob("*.py"))
    read = set(re.findall(r"environ(?:\.get\(|\[)\"([A-Z_]+)\"", source))
    assert {"COMZY_WS_SERVER", "COMZY_TOKEN", "COMZY_LOGIN_URL", "NO_COLOR"} <= read  # the scan works
    listed = {name for name, _ in cli.ENVIRONMENT}
    assert read | {"SSL_CERT_FILE"} <= listed, read - listed
    for name in listed:
        assert re.search(rf"^  {name} +\S", out, re.MULTILINE), name
    # A pip user has no docs/ folder: no help text may send them to one.
    for argv in (["--help"], ["login", "--help"], ["logout", "--help"], ["status", "--help"],
                 ["aliases", "--help"], ["aliases", "release", "--help"]):
        code, out, _ = comzy(capsys, *argv)
        assert code == 0 and "docs/" not in out and ".md" not in out, (argv, out)
    assert "COMZY_LOGIN_URL" in comzy(capsys, "login", "--help")[1]


@pytest.mark.parametrize(("typed", "problem", "suggestion"), [
    ("My_App", "'_' is not allowed", "my-app"),
    ("shop.example", "'.' is not allowed", "shop-example"),
    ("-app-", "it starts or ends with '-'", "app"),
    ("a" * 64, "it has more than 63 characters", "a" * 63),
    ("caf\u00e9", "'\u00e9' is not allowed", "caf"),
])
def test_a_subdomain_the_server_would_refuse_is_refused_as_typed(
        capsys: pytest.CaptureFixture[str], typed: str, problem: str, suggestion: str) -> None:
    code, out, err = comzy(capsys, "3000", f"--subdomain={typed}")
    assert (code, out) == (2, "")
    assert f"comzy: --subdomain '{typed}' cannot be a subdomain: {problem}; use a-z, 0-9 and '-'" in err, err
    assert err.endswith(f". Try --subdomain {suggestion}\n"), err
    assert cli.parse_args(["3000", "--subdomain", "MyApp"]).subdomain == "MyApp"  # capitals are fine


@pytest.mark.anyio
async def test_a_subdomain_in_capitals_is_asked_for_in_lowercase_and_says_so(
        tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server, \
            run_agent(upstream.port, server.ports.ws, tmp_path, "--subdomain", "MyApp") as agent:
        await agent.wait_for(r"^Asking for myapp \(--subdomain MyApp, lowercased: DNS names ignore case\)\.$")
        await agent.wait_for(rf"^Public URL: http://myapp\.localhost:{server.ports.http}$")
        assert server.tunnel("myapp") is not None

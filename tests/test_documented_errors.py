"""The error messages docs/configuration.md shows are the ones a real ``comzy-server`` prints.

Each ``comzy-server: ...`` message in the document (in a code block or inline code) is looked up
in :data:`HOW`, which says how to make a real process print it; the process runs and its
message must be the documented one, word for word. A message added to the document without an
entry here fails, as does a message the code changes without the document.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

DOC = ROOT / "docs" / "configuration.md"

#: ``python -c`` code that runs ``comzy-server`` as its console script does.
SERVER = "from comzy.core.cli import main; main()"
#: The same without the nats package, as on an install without the ``nats`` extra.
SERVER_WITHOUT_NATS = "import sys; sys.modules['nats'] = None; " + SERVER

#: For each documented message: the code to run, its arguments and its environment.
HOW: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "comzy-server: invalid setting: COMZY_HTTP_PORT='abc': Input should be a valid integer, unable to parse "
    "string as an integer": (SERVER, [], {"COMZY_HTTP_PORT": "abc"}),
    "comzy-server: COMZY_ROLE=edge needs the nats extra: pip install 'comzy[nats]'":
        (SERVER_WITHOUT_NATS, [], {"COMZY_ROLE": "edge"}),
    "comzy-server: `users` belongs to the plugin auth_token, which is not enabled: add it to COMZY_PLUGINS "
    "(now: custom_domains)": (SERVER, ["users", "list"], {"COMZY_PLUGINS": "custom_domains"}),
}


def documented_messages() -> list[str]:
    """Every ``comzy-server: ...`` message of the document: whole lines of code blocks, and inline code."""
    text = DOC.read_text()
    found: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        found += [line.strip() for line in block.splitlines() if line.strip().startswith("comzy-server: ")]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    found += re.findall(r"`(comzy-server: [^`]+)`", prose)
    return found


def run(code: str, args: list[str], env: dict[str, str], cwd: Path,
        dotenv: str | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a process of its own in ``cwd`` (with ``dotenv`` as its ``.env``, if given)."""
    if dotenv is not None:
        (cwd / ".env").write_text(dotenv)
    environment = cli_env(COMZY_DATA_DIR=str(cwd / "data"), **env)
    return subprocess.run([PYTHON, "-c", code, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=60, check=False)


def test_every_documented_message_has_a_way_to_make_it() -> None:
    messages = documented_messages()
    assert messages, f"no comzy-server message found in {DOC}: has the document's format changed?"
    unknown = [message for message in messages if message not in HOW]
    assert unknown == [], (f"{DOC.name} shows messages this test cannot make: add to HOW how to make each (or, if "
                           f"the code prints something else now, correct the document):\n" + "\n".join(unknown))


@pytest.mark.parametrize("message", documented_messages())
def test_a_documented_message_is_what_comzy_server_prints(message: str, tmp_path: Path) -> None:
    if message not in HOW:
        pytest.fail(f"no way to make {message!r}: see test_every_documented_message_has_a_way_to_make_it")
    code, args, env = HOW[message]
    result = run(code, args, env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == message, (f"{DOC.name} says:\n  {message}\ncomzy-server prints:\n  "
                                              f"{result.stderr.strip()}")


@pytest.mark.parametrize(("where", "named"), [
    ({"HTTP_PORT": "abc"}, "HTTP_PORT"),
    (None, "COMZY_HTTP_PORT/HTTP_PORT"),
], ids=["seed-name", "dotenv"])
def test_the_documented_variable_names_are_the_ones_printed(where: dict[str, str] | None, named: str,
                                                          tmp_path: Path) -> None:
    """The prose above the example: the variable set is named (`HTTP_PORT` if that was it), both
    names when the value came from `.env`; the rest of the line is the example's."""
    doc = DOC.read_text()
    assert f"`{named}`" in doc.split("## Server settings", 1)[0], f"{DOC.name} no longer names {named}"
    [example] = [message for message in HOW if "COMZY_HTTP_PORT='abc'" in message]
    result = run(SERVER, [], where or {}, tmp_path, dotenv="HTTP_PORT=abc\n" if where is None else None)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == example.replace("COMZY_HTTP_PORT=", f"{named}=")

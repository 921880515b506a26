"""Shell completion of ``comzy`` and ``comzy-server``: the scripts their ``completion`` commands
print, run by a real bash (and zsh, when installed; required under CI=true) to see what they offer,
and typed into zsh with compsys on a tmux pane (tests/test_agent_screen.py's terminal).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, cli_env
from tests.helpers import IN_CI
from tests.test_agent_screen import terminal
from tests.test_cli import AGENT, SERVER


def completion(module: str, shell: str, cwd: Path) -> str:
    """The script ``python -m module completion SHELL`` prints (``comzy-server`` with no plugin
    disabled: the built-ins' commands are in it)."""
    result = subprocess.run([PYTHON, "-m", module, "completion", shell], env=cli_env(), cwd=cwd,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- Shell completion --------------------------------------------------------------------------
def complete_bash(script: str, function: str, words: list[str]) -> list[str]:
    """What the bash completion ``function`` offers for ``words`` (the last is the one being typed)."""
    program = f"""source /dev/stdin <<'COMZY_COMPLETION'
{script}
COMZY_COMPLETION
COMP_WORDS=({' '.join(_bash_word(word) for word in words)})
COMP_CWORD={len(words) - 1}
{function}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def _bash_word(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@pytest.mark.parametrize(("words", "offered"), [
    (["comzy-server", "ch"], ["check"]),
    (["comzy-server", ""], ["db", "plugins", "settings", "check", "completion", "domains", "users"]),
    (["comzy-server", "db", ""], ["upgrade", "current"]),
    (["comzy-server", "db", "up"], ["upgrade"]),
    (["comzy-server", "settings", "--"], ["--help", "--json"]),
    (["comzy-server", "completion", ""], ["bash", "zsh"]),
    (["comzy-server", "users", "cr"], ["create"]),  # a plugin's command, installed now
    (["comzy-server", "--"], ["--help", "--version"]),
])
def test_bash_completion_of_comzy_server(tmp_path: Path, words: list[str], offered: list[str]) -> None:
    assert complete_bash(completion(SERVER, "bash", tmp_path), "_comzy_server", words) == offered


@pytest.mark.parametrize(("words", "offered"), [
    (["comzy", "st"], ["status"]),
    (["comzy", ""], ["login", "logout", "status", "aliases", "completion"]),
    (["comzy", "--host-header", ""], ["preserve", "rewrite"]),
    (["comzy", "--host-header", "r"], ["rewrite"]),
    (["comzy", "3000", "--lo"], ["--local-host", "--log"]),
    (["comzy", "-s", "myapp", "--qu"], ["--quiet"]),  # myapp is the value of -s, not a command
    (["comzy", "aliases", ""], ["release"]),
    (["comzy", "aliases", "release", "--"], ["--help", "--cacert"]),
    (["comzy", "login", "--t"], ["--token"]),
    (["comzy", "completion", "z"], ["zsh"]),
])
def test_bash_completion_of_comzy(tmp_path: Path, words: list[str], offered: list[str]) -> None:
    assert complete_bash(completion(AGENT, "bash", tmp_path), "_comzy", words) == offered


def test_an_option_value_without_choices_completes_file_names(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    program = f"""source /dev/stdin <<'COMZY_COMPLETION'
{completion(AGENT, "bash", tmp_path)}
COMZY_COMPLETION
compopt() {{ echo "compopt $*"; }}
COMP_WORDS=(comzy --cacert c); COMP_CWORD=2; _comzy
echo "replies: ${{#COMPREPLY[@]}}"
"""
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    # Nothing of its own: bash's default (file names) takes over.
    assert result.stdout.splitlines() == ["compopt -o default", "replies: 0"], result


def zsh_path() -> str:
    """Debian's zsh: skipped without it, failed under CI=true (.ci/run installs it)."""
    zsh = shutil.which("zsh")
    if zsh is None:
        if IN_CI:
            pytest.fail("zsh is needed for the zsh completion test (required when CI=true; .ci/run installs it)")
        pytest.skip("zsh is not installed")
    return zsh


def test_zsh_completion_of_comzy_server(tmp_path: Path) -> None:
    zsh = zsh_path()
    text = completion(SERVER, "zsh", tmp_path)
    assert text.startswith("#compdef comzy-server\n")
    script = tmp_path / "_comzy-server"
    script.write_text(text)
    # compsys's functions stubbed: each prints what it was asked to offer.
    program = f"""
compdef() {{ print -r -- "compdef $*" }}
_describe() {{ local name=$4; print -rl -- "${{(@P)name}}" }}
compadd() {{ shift; print -rl -- "$@" }}
_files() {{ print -r -- FILES }}
source {script}
words=(comzy-server db up); CURRENT=3; PREFIX=up; _comzy_server
words=(comzy-server completion ''); CURRENT=3; PREFIX=''; _comzy_server
words=(comzy-server settings --); CURRENT=3; PREFIX=--; _comzy_server
"""
    ran = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "compdef _comzy_server comzy-server"
    assert "upgrade:apply every pending migration" in lines
    assert "current:print the schema revision and whether it is current" in lines
    assert "bash" in lines and "zsh" in lines
    assert "--json:print a JSON list, for scripts" in lines


@pytest.mark.anyio
async def test_zsh_completes_comzy_server_on_a_real_terminal(tmp_path: Path) -> None:
    """compsys itself (compinit) completes with the script, typed into zsh in a tmux pane."""
    zsh = zsh_path()
    script = tmp_path / "_comzy-server"
    script.write_text(completion(SERVER, "zsh", tmp_path))
    async with terminal() as term:
        await term.start([zsh, "-f"], cli_env(HOME=str(tmp_path)), width=150, height=30)

        async def keys(*typed: str) -> None:
            await term.tmux("send-keys", "-t", "t", *typed)

        await keys(f"autoload -U compinit && compinit -u && source {script} && PS1='ready> '", "Enter")
        await term.wait_for(r"^ready> ?$")
        await keys("comzy-server db up", "Tab")
        await term.wait_for(r"^ready> comzy-server db upgrade ?$")
        await keys("C-u", "comzy-server settings --", "Tab")
        await term.wait_for(r"^--json\s+-- print a JSON list, for scripts$")
        await keys("C-u", "comzy-server completion ", "Tab")
        await term.wait_for(r"^bash\s+zsh$")
        await keys("C-u", "comzy-server ", "Tab")
        await term.wait_for(r"^users\s+-- users and their tokens \(plugin auth_token\)$")


@pytest.mark.anyio
async def test_bash_completes_comzy_on_a_real_terminal(tmp_path: Path) -> None:
    """readline itself completes with the script, typed into an interactive bash in a tmux pane."""
    script = tmp_path / "comzy.bash"
    script.write_text(completion(AGENT, "bash", tmp_path))
    async with terminal() as term:
        await term.start(["bash", "--norc", "--noprofile", "-i"], cli_env(HOME=str(tmp_path)), width=150, height=30)

        async def keys(*typed: str) -> None:
            await term.tmux("send-keys", "-t", "t", *typed)

        await keys(f"source {script} && PS1='ready> '", "Enter")
        await term.wait_for(r"^ready> ?$")
        await keys("comzy sta", "Tab")
        await term.wait_for(r"^ready> comzy status ?$")
        await keys("C-u", "comzy 3000 --host-header r", "Tab")
        await term.wait_for(r"^ready> comzy 3000 --host-header rewrite ?$")

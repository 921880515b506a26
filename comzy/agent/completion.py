"""``comzy completion bash|zsh``: the agent's shell completion script, written from its parsers.

``comzy`` has two: ``comzy [PORT] [options]`` (comzy.agent.cli) and its commands (``login``,
``status``... in comzy.agent.commands); the script completes both as one tree.
"""

from __future__ import annotations

import argparse

from comzy.completion import SHELLS, Node, script

HELP = "print a shell completion script (bash or zsh)"
EPILOG = """\
examples:
  source <(comzy completion bash)    in this shell; add the line to ~/.bashrc
  comzy completion bash > ~/.local/share/bash-completion/completions/comzy
  comzy completion zsh > ~/.zfunc/_comzy    with fpath+=(~/.zfunc) before compinit in ~/.zshrc
"""


def parser() -> argparse.ArgumentParser:
    """The parser of ``comzy completion SHELL``."""
    from comzy.agent.cli import Parser  # the agent's error format

    completion = Parser(prog="comzy completion", description="Print the completion script of comzy for SHELL: "
                        "its commands, options and their choices.", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    completion.add_argument("shell", metavar="SHELL", choices=SHELLS, help="bash or zsh")
    return completion


def tree() -> Node:
    """Every word ``comzy`` takes: the tunnel's options, the commands and theirs."""
    from comzy.agent.cli import build_parser
    from comzy.agent.commands import _parser as commands_parser  # the commands' own parser

    root = Node.from_parser(build_parser())
    root.commands.update(Node.from_parser(commands_parser()).commands)
    root.commands["completion"] = (HELP, Node.from_parser(parser()))
    return root


def run(argv: list[str]) -> int:
    """``comzy completion SHELL``: print the script; the exit status."""
    args = parser().parse_args(argv)
    print(script(args.shell, "comzy", tree()), end="")
    return 0


__all__ = ["HELP", "parser", "run", "tree"]

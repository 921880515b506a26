"""Shell completion scripts for ``comzy`` and ``comzy-server``, written from their argparse parsers.

``comzy completion bash`` / ``comzy-server completion zsh`` print a script that completes the
commands, their options and the options' fixed choices (``--host-header preserve|rewrite``); an
option that takes a free value (a file, a URL) falls back to file names. The script is a table
made when it is printed, so ``comzy-server``'s includes the commands of the plugins installed then.

Only the parsers' public shape is read (``_actions`` and ``_SubParsersAction`` are argparse's
long-standing internals, which every completion generator reads).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh")


@dataclass(slots=True)
class Node:
    """A command (or the program itself): its subcommands and its options."""

    #: Subcommand name -> (its one-line help, its node).
    commands: dict[str, tuple[str, Node]] = field(default_factory=dict)
    #: Option string -> (its one-line help, whether it takes a value, the value's fixed choices).
    options: dict[str, tuple[str, bool, list[str]]] = field(default_factory=dict)
    #: Fixed choices of the positional arguments (``bash`` and ``zsh`` for ``completion``).
    choices: list[str] = field(default_factory=list)

    @classmethod
    def from_parser(cls, parser: argparse.ArgumentParser) -> Node:
        """The tree of ``parser``: its options, positional choices and subcommands (recursively)."""
        node = cls()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    node.commands[name] = (helps.get(name, ""), cls.from_parser(sub))
            elif action.option_strings:
                if action.help == argparse.SUPPRESS:
                    continue
                takes_value = action.nargs != 0
                choices = [str(choice) for choice in action.choices] if action.choices else []
                for option in action.option_strings:
                    node.options[option] = (action.help or "", takes_value, choices)
            elif action.choices:
                node.choices += [str(choice) for choice in action.choices]
        return node

    def walk(self, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Node]]:
        """This node and every node under it, each with its command path."""
        found = [(path, self)]
        for name, (_help, child) in self.commands.items():
            found += child.walk((*path, name))
        return found


def script(shell: str, program: str, tree: Node) -> str:
    """The completion script of ``program`` for ``shell`` (``bash`` or ``zsh``)."""
    if shell == "bash":
        return _bash(program, tree)
    if shell == "zsh":
        return _zsh(program, tree)
    raise ValueError(f"no completion for {shell!r}: choose one of {', '.join(SHELLS)}")


def function_name(program: str) -> str:
    """The shell function that completes ``program``: ``_comzy``, ``_comzy_server``."""
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", program)


def _quote(text: str) -> str:
    """``text`` in single quotes for bash and zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _key(path: tuple[str, ...], word: str = "") -> str:
    """A ``case`` pattern for a word after the command ``path``: ``'db upgrade:--json'``."""
    return _quote(f"{' '.join(path)}:{word}")


def _short(text: str) -> str:
    """An option's or command's help cut to one short line, for zsh's descriptions."""
    text = " ".join(text.split())
    text = text.split("; ")[0].split(". ")[0]
    return text if len(text) <= 70 else text[:67].rstrip() + "..."


def _walk_cases(tree: Node) -> tuple[list[str], list[str], list[tuple[str, list[str]]]]:
    """Shared by both shells: the ``case`` patterns that step into a subcommand, those of an option
    that takes a value, and those of an option with fixed choices (with the choices)."""
    steps: list[str] = []
    values: list[str] = []
    choices: list[tuple[str, list[str]]] = []
    for path, node in tree.walk():
        for name in node.commands:
            steps.append(_key(path, name))
        for option, (_help, takes_value, fixed) in node.options.items():
            if takes_value:
                values.append(_key(path, option))
                if fixed:
                    choices.append((_key(path, option), fixed))
    return steps, values, choices


def _scan(indent: str, steps: list[str], values: list[str]) -> list[str]:
    """The loop both scripts share: which command the words before the cursor name, and whether the
    word under the cursor is an option's value. ``$cmdpath`` (not ``path``: zsh ties it to PATH)."""
    lines = [
        f"{indent}case \"$cmdpath:$word\" in",
    ]
    if values:
        lines.append(f"{indent}    {'|'.join(values)}) option=$word ;;")
    if steps:
        lines.append(f"{indent}    {'|'.join(steps)}) cmdpath=\"${{cmdpath:+$cmdpath }}$word\" ;;")
    lines.append(f"{indent}esac")
    return lines


def _bash(program: str, tree: Node) -> str:
    name = function_name(program)
    steps, values, choices = _walk_cases(tree)
    lines = [
        f"# bash completion for {program}; load it with: source <({program} completion bash)",
        f"{name}() {{",
        "    local cur=${COMP_WORDS[COMP_CWORD]} cmdpath='' option='' word words='' i",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        word=${COMP_WORDS[i]}",
        "        if [[ -n $option ]]; then option=''; continue; fi",
        *_scan("        ", steps, values),
        "    done",
        "    if [[ -n $option ]]; then",
        "        case \"$cmdpath:$option\" in",
        *(f"            {key}) words={_quote(' '.join(fixed))} ;;" for key, fixed in choices),
        "            *) compopt -o default 2>/dev/null; COMPREPLY=(); return 0 ;;",
        "        esac",
        "    elif [[ $cur == -* ]]; then",
        "        case \"$cmdpath\" in",
    ]
    for path, node in tree.walk():
        if node.options:
            lines.append(f"            {_quote(' '.join(path))}) words={_quote(' '.join(node.options))} ;;")
    lines += [
        "        esac",
        "    else",
        "        case \"$cmdpath\" in",
    ]
    for path, node in tree.walk():
        words = [*node.commands, *node.choices]
        if words:
            lines.append(f"            {_quote(' '.join(path))}) words={_quote(' '.join(words))} ;;")
    lines += [
        "        esac",
        "    fi",
        "    COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))",
        "}",
        f"complete -F {name} {program}",
        "",
    ]
    return "\n".join(lines)


def _zsh(program: str, tree: Node) -> str:
    name = function_name(program)
    steps, values, choices = _walk_cases(tree)
    lines = [
        f"#compdef {program}",
        f"# zsh completion for {program}: save it as _{program} in a directory of $fpath, or after",
        f"# compinit load it with: source <({program} completion zsh)",
        f"{name}() {{",
        # Not `words`: zsh keeps the command line in that array.
        "    local cmdpath='' option='' word i",
        "    local -a described plain",
        "    for ((i = 2; i < CURRENT; i++)); do",
        "        word=${words[i]}",
        "        if [[ -n $option ]]; then option=''; continue; fi",
        *_scan("        ", steps, values),
        "    done",
        "    if [[ -n $option ]]; then",
        "        case \"$cmdpath:$option\" in",
        *(f"            {key}) described=({' '.join(map(_quote, fixed))}) ;;" for key, fixed in choices),
        "            *) _files; return ;;",
        "        esac",
        "        compadd -- \"${described[@]}\"",
        "        return",
        "    elif [[ $PREFIX == -* ]]; then",
        "        case \"$cmdpath\" in",
    ]
    for path, node in tree.walk():
        if node.options:
            entries = " ".join(_quote(f"{option.replace(':', chr(92) + ':')}:{_short(text)}")
                               for option, (text, _value, _fixed) in node.options.items())
            lines.append(f"            {_quote(' '.join(path))}) described=({entries}) ;;")
    lines += [
        "        esac",
        "    else",
        "        case \"$cmdpath\" in",
    ]
    for path, node in tree.walk():
        # Commands with their help; a positional's fixed choices (completion's bash, zsh) bare.
        assigned = []
        if node.commands:
            entries = " ".join(_quote(f"{command}:{_short(text)}") for command, (text, _child) in node.commands.items())
            assigned.append(f"described=({entries})")
        if node.choices:
            assigned.append(f"plain=({' '.join(map(_quote, node.choices))})")
        if assigned:
            lines.append(f"            {_quote(' '.join(path))}) {'; '.join(assigned)} ;;")
    lines += [
        "        esac",
        "    fi",
        f"    (( ${{#described}} )) && _describe -t commands {_quote(program)} described",
        "    (( ${#plain} )) && compadd -- \"${plain[@]}\"",
        "    return 0",
        "}",
        'if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then',
        f'    {name} "$@"',
        "else",
        f"    compdef {name} {program}",
        "fi",
        "",
    ]
    return "\n".join(lines)


__all__ = ["SHELLS", "Node", "function_name", "script"]

"""``comzy-server`` commands that plugins add (the ``register_commands`` hook), and ``comzy-server plugins``.

Every installed plugin is built once to collect its commands, so that ``comzy-server --help``
lists them all; a command runs only while its plugin is enabled (COMZY_PLUGINS), and otherwise
one line says which plugin to enable. A plugin that cannot be built (bad settings, a missing
dependency) loses its commands and stops nothing else until it is enabled.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from comzy.core.hooks import (
    HookRunner,
    PluginError,
    available_plugins,
    build_manager,
    load_plugin,
    plugin_manager,
    select_plugins,
    unknown_plugin,
)

if TYPE_CHECKING:
    from comzy.core.server import ServerContext
    from comzy.core.settings import ServerSettings

#: What runs a command: its parsed arguments and a :class:`CommandContext` in, the exit status out
#: (None means 0). It may be ``async def``.
RunCommand = Callable[[argparse.Namespace, "CommandContext"], "int | Awaitable[int | None] | None"]

#: comzy-server's own commands: no plugin may take these names.
CORE_COMMANDS = frozenset({"db", "plugins", "settings", "check", "completion"})
_COMMAND_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a text of several lines (an epilog of examples) is kept as
    written; one-line texts (descriptions) are wrapped to the terminal as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


@dataclass(frozen=True, slots=True)
class PluginCommand:
    """One ``comzy-server`` subcommand and the plugin that added it."""

    name: str
    plugin: str
    help: str
    description: str
    parser: argparse.ArgumentParser
    run: RunCommand
    epilog: str | None = None


class Commands:
    """What ``register_commands(commands)`` receives: one plugin adds its ``comzy-server`` commands here.

    ``add`` returns the command's ``argparse.ArgumentParser``; give it arguments (and actions
    with ``add_subparsers``) as to any argparse parser.
    """

    def __init__(self, plugin: str) -> None:
        #: The name of the plugin whose commands these are.
        self.plugin = plugin
        self.added: list[PluginCommand] = []

    def add(self, name: str, run: RunCommand, *, help: str, description: str | None = None,
            epilog: str | None = None) -> argparse.ArgumentParser:
        """Add ``comzy-server NAME``; ``help`` is its line in ``comzy-server --help``, ``description``
        the text of ``comzy-server NAME --help`` (``help`` when omitted), ``epilog`` what follows the
        options there, printed as written (``"examples:\\n  comzy-server NAME ...  what it does"``).

        ``run(args, context)`` runs it: ``args`` is the parsed ``argparse.Namespace``, ``context`` a
        :class:`CommandContext`; it returns the exit status (None means 0) and may be ``async def``.
        Raise ``PluginError("what to do")`` from it for a one-line error and exit status 2.
        """
        where = f"plugin {self.plugin!r}"
        if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
            raise PluginError(f"{where}: {name!r} cannot be a command name: use up to 32 lowercase letters, "
                              "digits and '-', starting with a letter")
        if name in CORE_COMMANDS:
            raise PluginError(f"{where}: the command {name!r} is comzy-server's own; choose another name")
        if any(command.name == name for command in self.added):
            raise PluginError(f"{where} adds the command {name!r} twice")
        if not callable(run):
            raise PluginError(f"{where}: the command {name!r} needs a function to run it, "
                              "run(args, context) -> exit status")
        # Built apart and attached once every plugin has spoken, so a name two plugins add
        # is known to neither (no plugin's arguments end up parsed for another's command).
        parser = argparse.ArgumentParser(prog=f"comzy-server {name}", add_help=False)
        self.added.append(PluginCommand(name, self.plugin, help, description or help, parser, run, epilog))
        return parser


class CommandContext:
    """What a plugin command's ``run`` receives beside its arguments.

    ``settings`` are the server's settings (COMZY_*), ``plugin`` the name of the plugin the command
    belongs to and ``plugin_names`` the enabled plugins, in order. ``start_plugins`` starts them as
    the server would, for a command that must ask other plugins something (through hooks).
    """

    def __init__(self, settings: ServerSettings, plugins: list[tuple[str, object]], plugin: str) -> None:
        self.settings = settings
        self.plugin = plugin
        self.plugin_names = [name for name, _ in plugins]
        self._plugins = plugins
        self._hooks: HookRunner | None = None

    def implementers(self, hook: str) -> list[str]:
        """The enabled plugins that implement ``hook``, in calling order (none: nobody answers it)."""
        if self._hooks is None:
            self._hooks = HookRunner(build_manager(self.settings.base_domain, self._plugins))
        return [name for name in self._hooks.implementers(hook) if name in self.plugin_names]

    @asynccontextmanager
    async def start_plugins(self, hook: str | None = None) -> AsyncIterator[ServerContext]:
        """Start the enabled plugins (only those that implement ``hook``, when given) as the server
        does, by their ``on_startup``, and yield the ``ServerContext`` they got; its listeners never
        run. Ask them through ``server.hooks`` (e.g. ``server.hooks.alias_owner(alias, server)``).
        On the way out their ``on_shutdown`` runs. Their errors (``PluginError``...) propagate.
        """
        from comzy.core.server import ServerContext  # the server's modules load only when needed

        wanted = set(self.implementers(hook)) if hook is not None else set(self.plugin_names)
        chosen = [(name, plugin) for name, plugin in self._plugins if name in wanted]
        hooks = HookRunner(build_manager(self.settings.base_domain, chosen), trace=self.settings.trace_hooks)
        server = ServerContext(self.settings, hooks, [name for name, _ in chosen])
        # Their start-up lines describe a server, which a command is not; warnings still show.
        chatter = logging.getLogger("comzy.plugins")
        level = chatter.level
        chatter.setLevel(max(logging.WARNING, chatter.getEffectiveLevel()))
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                server.task_group = tg
                try:
                    await hooks.on_startup(server)
                    yield server
                except Exception as exc:  # raised below, out of the task group (which would wrap it)
                    failure = exc
                finally:
                    with anyio.CancelScope(shield=True):
                        await hooks.on_shutdown(server)
                    tg.cancel_scope.cancel()
        finally:
            chatter.setLevel(level)
        if failure is not None:
            raise failure


@dataclass(slots=True)
class InstalledPlugin:
    """An installed plugin as ``comzy-server plugins`` shows it."""

    name: str
    distribution: str | None
    version: str | None
    #: The plugin object, or None when it could not be built.
    plugin: object | None = None
    #: Why it cannot run (one line), or None.
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Catalog:
    """The installed plugins, each built once, and the commands they add."""

    plugins: dict[str, InstalledPlugin] = field(default_factory=dict)
    commands: dict[str, PluginCommand] = field(default_factory=dict)
    #: A command name that two or more plugins add -> those plugins (neither command runs).
    clashes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def discover(cls) -> Catalog:
        """Build every installed plugin and collect its commands; failures are recorded, not raised."""
        catalog = cls()
        for name, entry_point in sorted(available_plugins().items()):
            dist = entry_point.dist
            info = InstalledPlugin(name, dist.name if dist else None, dist.version if dist else None)
            catalog.plugins[name] = info
            try:
                info.plugin = load_plugin(name, entry_point)
                hooks = HookRunner(plugin_manager([(name, info.plugin)]))
                info.hooks = hooks.hooks_of(name)
                commands = Commands(name)
                hooks.register_commands(lambda _plugin, commands=commands: commands)
                for command in commands.added:
                    argparse.ArgumentParser(parents=[command.parser])  # what attaching it will do
            except PluginError as exc:
                info.error = str(exc)
                continue
            except Exception as exc:  # a plugin's bug: its commands are left out, and it says why
                info.error = f"plugin {name!r}: register_commands failed: {type(exc).__name__}: {exc}"
                continue
            for command in commands.added:
                catalog._take(command)
                info.commands.append(command.name)
        return catalog

    def _take(self, command: PluginCommand) -> None:
        if command.name in self.clashes:
            self.clashes[command.name].append(command.plugin)
        elif command.name in self.commands:
            self.clashes[command.name] = [self.commands.pop(command.name).plugin, command.plugin]
        else:
            self.commands[command.name] = command

    def add_parsers(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Attach every plugin command to ``comzy-server``'s subcommands."""
        for name in sorted({*self.commands, *self.clashes}):
            command = self.commands.get(name)
            if command is not None:
                subparsers.add_parser(name, parents=[command.parser], help=f"{command.help} (plugin {command.plugin})",
                                      description=command.description, epilog=command.epilog,
                                      formatter_class=HelpFormatter)
            else:
                # Any arguments at all (prefix_chars no option can start with): running it says
                # which plugins clash, whatever was typed after it.
                clash = subparsers.add_parser(name, add_help=False, prefix_chars="\0",
                                              help=f"added by two plugins ({', '.join(self.clashes[name])}): "
                                              "cannot run")
                clash.add_argument("ignored", nargs=argparse.REMAINDER)

    def enabled(self, names: list[str]) -> list[tuple[str, object]]:
        """The enabled plugins' objects, in order; the usual PluginError for one that is unknown or
        cannot be built."""
        loaded = []
        for name in names:
            info = self.plugins.get(name)
            if info is None:
                raise unknown_plugin(name)
            if info.error is not None or info.plugin is None:
                raise PluginError(info.error)
            loaded.append((name, info.plugin))
        return loaded

    def run(self, name: str, args: argparse.Namespace, settings: ServerSettings) -> int:
        """Run the plugin command ``name``; its exit status. PluginError when it cannot run (a clash,
        its plugin not enabled, an enabled plugin that cannot be built) or says so itself."""
        if name in self.clashes:
            plugins = " and ".join(repr(p) for p in self.clashes[name])
            raise PluginError(f"plugins {plugins} all add the command {name!r}, so it cannot run: "
                              "uninstall all but one of them (`comzy-server plugins` shows their distributions)")
        command = self.commands[name]
        enabled = select_plugins(settings.plugins)
        if command.plugin not in enabled:
            now = ("unset, which enables the built-in plugins" if settings.plugins is None
                   else settings.plugins.strip() or "empty")
            raise PluginError(f"`{name}` belongs to the plugin {command.plugin}, which is not enabled: "
                              f"add it to COMZY_PLUGINS (now: {now})")
        context = CommandContext(settings, self.enabled(enabled), command.plugin)
        if inspect.iscoroutinefunction(command.run):
            result = anyio.run(command.run, args, context)
        else:
            result = command.run(args, context)
        return 0 if result is None else int(result)  # type: ignore[arg-type]

    def report(self, settings: ServerSettings, as_json: bool) -> tuple[str, list[str], int]:
        """``comzy-server plugins``: the listing, the problems to print on stderr, and the exit status
        (1 when the server could not start with these plugins)."""
        enabled = select_plugins(settings.plugins)
        problems = [f"COMZY_PLUGINS names {name!r}, which is not installed" for name in enabled
                    if name not in self.plugins]
        problems += [f"plugin {self.plugins[name].name!r} is enabled but cannot run: {self.plugins[name].error}"
                     for name in enabled if name in self.plugins and self.plugins[name].error]
        problems += [f"COMZY_PLUGINS names {name!r} more than once: the server refuses that"
                     for name in sorted({name for name in enabled if enabled.count(name) > 1})]
        status = 1 if problems else 0
        problems += [f"the command {name!r} is added by plugins {', '.join(plugins)}: it cannot run"
                     for name, plugins in sorted(self.clashes.items())]
        rows = [{"name": info.name, "enabled": info.name in enabled, "distribution": info.distribution,
                 "version": info.version, "hooks": info.hooks, "commands": info.commands, "error": info.error}
                for info in self.plugins.values()]
        if as_json:
            return json.dumps(rows, indent=2), problems, status
        if not rows:
            return "no plugins installed", problems, status
        table = [["NAME", "ENABLED", "DISTRIBUTION", "VERSION", "COMMANDS", "HOOKS"]]
        for info in self.plugins.values():
            hooks = ", ".join(info.hooks) if info.error is None else f"(cannot run: {info.error})"
            table.append([info.name, "yes" if info.name in enabled else "no", info.distribution or "-",
                          info.version or "-", ", ".join(info.commands) or "-", hooks])
        widths = [max(len(line[i]) for line in table) for i in range(5)]  # the last column is not padded
        lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[5]])
                 for line in table]
        return "\n".join(lines), problems, status

__all__ = ["CORE_COMMANDS", "Catalog", "CommandContext", "Commands", "HelpFormatter", "InstalledPlugin",
           "PluginCommand", "RunCommand"]

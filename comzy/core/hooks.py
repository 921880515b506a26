"""The HookRunner (the only code that calls plugin hooks) and plugin loading."""

from __future__ import annotations

import asyncio
import inspect
import logging
import operator
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import anyio
import pluggy
from pydantic import ValidationError

from comzy.core import hookspecs
from comzy.core.aliases import subdomain_of
from comzy.core.settings import explain_validation_error, settings_class
from comzy.core.types import LoggedRequest, Reject

log = logging.getLogger("comzy.plugins")
trace_log = logging.getLogger("comzy.trace")

ENTRY_POINT_GROUP = "comzy"
#: Hooks pluggy calls itself (first non-None answer wins): plain functions only, wrappers allowed.
SYNC_FIRSTRESULT = ("resolve_host", "alias_owner", "alias_reserved")
#: Hooks the runner calls without awaiting (every impl): plain functions only, no wrappers.
SYNC_EVERY = ("describe_policy",)


class PluginError(Exception):
    """A plugin could not be loaded or failed where failure stops the server."""


class CoreRouting:
    """The core's own hook implementations: the subdomain parser runs after all others."""

    def __init__(self, base_domain: str) -> None:
        self.base_domain = base_domain

    @hookspecs.hookimpl(trylast=True)
    def resolve_host(self, host: str) -> str | None:
        """``<alias>.<base domain>`` -> ``alias``."""
        return subdomain_of(host, self.base_domain)


class HookRunner:
    """Calls hooks with Comzy's ordering and error policy.

    Async implementations are awaited one at a time in pluggy's call order (LIFO by
    registration, tryfirst/trylast respected); an implementation receives only the
    arguments it names. With ``trace`` (COMZY_TRACE_HOOKS) every implementation called is
    logged with its plugin and duration; without it, tracing costs nothing.
    """

    def __init__(self, pm: pluggy.PluginManager, trace: bool = False) -> None:
        self.pm = pm
        self.trace = trace
        if trace:
            self._resolve_host = self._traced_firstresult("resolve_host")
            self._alias_owner = self._traced_firstresult("alias_owner")
            self._alias_reserved = self._traced_firstresult("alias_reserved")
        else:
            self._resolve_host = self._direct_firstresult("resolve_host")
            self._alias_owner = self._direct_firstresult("alias_owner")
            self._alias_reserved = self._direct_firstresult("alias_reserved")
        # The per-request hooks' implementations in calling order, each as (plugin name, a call
        # taking the hook's arguments positionally: _positional), read once: plugins are fixed once
        # the server runs, get_hookimpls copies its list on each call, and a call by keyword names
        # (a dict and an argument list per implementation) cost three times the call itself.
        self._after_response = self._calls("after_response")
        #: Whether any plugin listens to after_response: the edge skips building exchanges otherwise.
        self.has_after_response = bool(self._after_response)
        self._before_forward = self._calls("before_forward")
        #: Whether any plugin checks requests before they are forwarded (the edge serves a request
        #: without a task only when none does: the hook may await).
        self.has_before_forward = bool(self._before_forward)
        self._before_response = self._calls("before_response")
        #: Whether any plugin edits response heads: the edge skips the hook's call otherwise.
        self.has_before_response = bool(self._before_response)

    def resolve_host(self, host: str, server: Any) -> str | None:
        """First non-None alias for ``host`` (sync, firstresult)."""
        return self._resolve_host(host, server)

    def alias_owner(self, alias: str, server: Any) -> str | None:
        """The user who owns ``alias`` (sync, firstresult), or None."""
        return self._alias_owner(alias, server)

    def alias_reserved(self, alias: str, server: Any) -> str | None:
        """Why ``alias`` is kept for its owner (sync, firstresult), or None."""
        return self._alias_reserved(alias, server)

    def implementers(self, name: str) -> list[str]:
        """The names of the plugins that implement hook ``name``, in calling order."""
        return [impl.plugin_name for impl in reversed(getattr(self.pm.hook, name).get_hookimpls())]

    def hooks_of(self, plugin_name: str) -> list[str]:
        """The hooks the plugin registered as ``plugin_name`` implements, sorted."""
        plugin = self.pm.get_plugin(plugin_name)
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()) if plugin else []

    def register_commands(self, commands_for: Callable[[str], Any]) -> None:
        """Ask every register_commands impl for its commands; each gets ``commands_for(its plugin's
        name)``, so that every command is known by the plugin that added it. Errors propagate."""
        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):
            if inspect.iscoroutinefunction(impl.function) or inspect.isasyncgenfunction(impl.function):
                raise PluginError(f"plugin {impl.plugin_name!r}: register_commands must be a plain function "
                                  "(it only describes commands; their run functions may be async)")
            kwargs = {"commands": commands_for(impl.plugin_name)}
            started = time.perf_counter() if self.trace else 0.0
            result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            if self.trace:
                _trace("register_commands", impl.plugin_name, started, result)

    def _calls(self, name: str) -> list[tuple[str, Callable[..., Any]]]:
        """Hook ``name``'s implementations in calling order, as (plugin name, the implementation
        called with the hook's arguments positionally, in its spec's order: :func:`_positional`)."""
        caller = getattr(self.pm.hook, name)
        spec = tuple(caller.spec.argnames)
        return [(impl.plugin_name, _positional(impl.function, tuple(impl.argnames), spec))
                for impl in reversed(caller.get_hookimpls())]

    def _direct_firstresult(self, name: str) -> Callable[..., Any]:
        """A synchronous firstresult hook called without pluggy's machinery, with pluggy's answer (the
        first non-None, in its order), its arguments given positionally: resolve_host runs on every
        request, and pluggy's call took 1.8 µs of it against 0.8 µs (one plugin). A single
        implementation is called as it is. With a wrapper among the implementations, pluggy's own
        call. The implementations are read once: plugins are fixed once the server runs."""
        caller = getattr(self.pm.hook, name)
        if any(impl.hookwrapper or impl.wrapper for impl in caller.get_hookimpls()):
            spec = tuple(caller.spec.argnames)
            return lambda *args: caller(**dict(zip(spec, args, strict=True)))
        functions = [function for _, function in self._calls(name)]
        if len(functions) == 1:
            return functions[0]

        def call(*args: Any) -> Any:
            for function in functions:
                result = function(*args)
                if result is not None:
                    return result
            return None

        return call

    def _traced_firstresult(self, name: str) -> Callable[..., Any]:
        """A synchronous firstresult hook that logs each implementation it asks (and stops at the
        first answer, as pluggy does)."""
        caller = getattr(self.pm.hook, name)
        spec = tuple(caller.spec.argnames)

        def call(*args: Any) -> Any:
            kwargs = dict(zip(spec, args, strict=True))
            for impl in reversed(caller.get_hookimpls()):
                started = time.perf_counter()
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
                _trace(name, impl.plugin_name, started, result)
                if result is not None:
                    return result
            return None

        return call

    async def _call_in_order(self, name: str, kwargs: dict[str, Any], first_answer: bool = False,
                             named: bool = False) -> list[Any]:
        """Every non-None result, each implementation awaited in turn; with ``first_answer``, stop at the
        first one (pluggy's firstresult cannot await, and would take a coroutine for an answer); with
        ``named``, each result as ``(plugin name, result)``."""
        results: list[Any] = []
        caller = getattr(self.pm.hook, name)
        for impl in reversed(caller.get_hookimpls()):
            result = await self._call_one(name, impl, kwargs)
            if result is not None:
                results.append((impl.plugin_name, result) if named else result)
                if first_answer:
                    break
        return results

    async def _call_one(self, name: str, impl: Any, kwargs: dict[str, Any]) -> Any:
        """One implementation of ``name``, awaited, traced; its error propagates."""
        started = time.perf_counter() if self.trace else 0.0
        try:
            result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            # Most answers are None, and isawaitable(None) is an ABC check (about 0.8 µs here).
            if result is not None and inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            if self.trace:
                _trace(name, impl.plugin_name, started, exc)
            raise
        if self.trace:
            _trace(name, impl.plugin_name, started, result)
        return result

    async def _call_logged(self, name: str, args: tuple[Any, ...], only: set[str] | None = None,
                           calls: list[tuple[str, Callable[..., Any]]] | None = None, shield: bool = False) -> None:
        """Every implementation of ``name`` in turn, given the hook's ``args`` (``calls``: those, as
        :meth:`_calls` makes them; ``only``: just those plugins); an error is logged, never raised.
        With ``shield``, what an implementation returns to await is awaited in a shielded cancel
        scope: a plain function's call has nothing to cancel, so it pays for no scope."""
        calls = self._calls(name) if calls is None else calls
        if only is not None:
            calls = [call for call in calls if call[0] in only]
        rest = self._logged_now(name, calls, args, shield)
        if rest is not None:
            await rest

    def _logged_now(self, name: str, calls: list[tuple[str, Callable[..., Any]]], args: tuple[Any, ...],
                    shield: bool) -> Coroutine[Any, Any, None] | None:
        """``_call_logged`` for a caller without a task: the implementations are called now, in
        order, until one returns something to await; that one and the rest are returned as one
        coroutine (None: all done)."""
        for index, (plugin, call) in enumerate(calls):
            started = time.perf_counter() if self.trace else 0.0
            try:
                result = call(*args)
            except Exception as exc:
                result = exc
                log.exception("plugin %s failed in %s (traffic unaffected)", plugin, name)
            else:
                # Most answers are None, and isawaitable(None) is an ABC check (about 0.8 µs here).
                if result is not None and inspect.isawaitable(result):
                    return self._logged_rest(name, calls[index + 1:], args, shield, plugin, result, started)
            if self.trace:
                _trace(name, plugin, started, result)
        return None

    async def _logged_rest(self, name: str, calls: list[tuple[str, Callable[..., Any]]], args: tuple[Any, ...],
                           shield: bool, plugin: str, pending: Awaitable[Any], started: float) -> None:
        """Await ``pending`` (``plugin``'s), then go on with ``calls`` (see _logged_now)."""
        result: Any
        try:
            if shield:
                with anyio.CancelScope(shield=True):
                    result = await pending
            else:
                result = await pending
        except Exception as exc:
            result = exc
            log.exception("plugin %s failed in %s (traffic unaffected)", plugin, name)
        if self.trace:
            _trace(name, plugin, started, result)
        rest = self._logged_now(name, calls, args, shield)
        if rest is not None:
            await rest

    async def on_startup(self, server: Any) -> None:
        """Run every on_startup impl; an error stops start-up. The plugins whose on_startup had
        completed are shut down first (their on_shutdown, errors logged), so what they opened (a
        database pool) is released while the event loop still runs, not by a garbage collector
        after it closed (aiomysql then printed "Exception ignored in Connection.__del__")."""
        started: list[str] = []
        try:
            for impl in reversed(self.pm.hook.on_startup.get_hookimpls()):
                await self._call_one("on_startup", impl, {"server": server})
                started.append(impl.plugin_name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._call_logged("on_shutdown", (server,), only=set(started))
            raise

    async def on_shutdown(self, server: Any) -> None:
        """Run every on_shutdown impl; errors are logged."""
        await self._call_logged("on_shutdown", (server,))

    async def on_register(self, registration: Any, server: Any) -> None:
        """Run every on_register impl; ``Reject`` propagates to refuse the agent."""
        await self._call_in_order("on_register", {"registration": registration, "server": server})

    async def before_forward(self, request: Any, tunnel: Any, server: Any) -> None:
        """Run every before_forward impl; ``Reject`` propagates to answer the visitor, with
        ``plugin`` set to the name of the plugin that raised it."""
        pending = self.before_forward_now(request, tunnel, server)
        if pending is not None:
            await pending

    async def on_request_refused(self, request: Any, tunnel: Any, reject: Reject, server: Any) -> None:
        """Run every on_request_refused impl for a visitor ``reject`` answered; errors are logged."""
        await self._call_logged("on_request_refused", (request, tunnel, reject.status, reject.reason,
                                                       reject.plugin or "", server))

    def describe_policy(self, tunnel: Any, server: Any) -> dict[str, Any]:
        """``{plugin name: summary}`` from every describe_policy impl that answered (sync). An impl
        that fails is logged and left out: a view never fails for it."""
        kwargs = {"tunnel": tunnel, "server": server}
        summaries: dict[str, Any] = {}
        for impl in reversed(self.pm.hook.describe_policy.get_hookimpls()):
            started = time.perf_counter() if self.trace else 0.0
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                result = exc
                log.exception("plugin %s failed in describe_policy (left out of the view)", impl.plugin_name)
            else:
                if result is not None:
                    summaries[impl.plugin_name] = result
            if self.trace:
                _trace("describe_policy", impl.plugin_name, started, result)
        return summaries

    async def before_response(self, response: Any, request: Any, tunnel: Any, server: Any) -> None:
        """Run every before_response impl in order; ``Reject`` (or any error) propagates to the edge,
        which answers the visitor instead of the local service's response."""
        pending = self.before_response_now(response, request, tunnel, server)
        if pending is not None:
            await pending

    async def after_response(self, exchange: Any, server: Any) -> None:
        """Run every after_response impl; errors are logged, never raised.

        The visitor's request task may be cancelled as its exchange ends (a disconnect), and the
        plugins must still see the exchange: what an implementation returns to await is awaited
        shielded. A plain function's call has nothing to cancel, so the built-in plugins (all
        plain functions) pay for no cancel scope: about 5-9 µs per request each on this machine.
        """
        await self._call_logged("after_response", (exchange, server), calls=self._after_response, shield=True)

    def before_forward_now(self, request: Any, tunnel: Any, server: Any) -> Awaitable[None] | None:
        """``before_forward`` for a caller without a task: the implementations are called now, in
        order, and Reject (with its plugin) or an error raises here; from the first one that returns
        something to await, what is left is returned as one awaitable (None: all done)."""
        return self._call_now("before_forward", self._before_forward, (request, tunnel, server), True)

    def before_response_now(self, response: Any, request: Any, tunnel: Any, server: Any) -> Awaitable[None] | None:
        """``before_response`` for a caller without a task, as :meth:`before_forward_now`."""
        return self._call_now("before_response", self._before_response, (response, request, tunnel, server), False)

    def after_response_soon(self, exchange: Any, server: Any) -> asyncio.Task[None] | None:
        """``after_response`` for a caller without a task (the edge's taskless path): the plain
        implementations are called now, in order; from the first one that returns something to
        await, the rest runs in a task, which is returned (None: all done). Errors are logged, never
        raised, as in ``after_response``; what the task awaits is shielded as there."""
        rest = self._logged_now("after_response", self._after_response, (exchange, server), True)
        return None if rest is None else asyncio.get_running_loop().create_task(rest)

    def _call_now(self, name: str, calls: list[tuple[str, Callable[..., Any]]], args: tuple[Any, ...],
                  name_rejects: bool) -> Awaitable[None] | None:
        """Call ``calls`` in order until one returns an awaitable; then that one and the rest, awaited
        in order, as one coroutine (None when none did). With ``name_rejects``, a Reject names its
        plugin (before_forward).

        A coroutine returned here is closed unstarted and its implementation called again from the
        coroutine returned, so that it starts where it is made, in the awaiting task, as when the hook
        is awaited (a coroutine may record shared state when it starts, such as a password check in
        progress: made here and started a loop turn later, another request could start a second one)."""
        for index, (plugin, call) in enumerate(calls):
            started = time.perf_counter() if self.trace else 0.0
            try:
                result = call(*args)
            except BaseException as exc:
                self._raised(name, plugin, started, exc, name_rejects)
                raise
            if result is not None and inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                    return self._call_from(name, calls[index:], args, name_rejects)
                return self._call_from(name, calls[index + 1:], args, name_rejects, result, plugin, started)
            if self.trace:
                _trace(name, plugin, started, result)
        return None

    async def _call_from(self, name: str, calls: list[tuple[str, Callable[..., Any]]], args: tuple[Any, ...],
                         name_rejects: bool, pending: Awaitable[Any] | None = None, plugin: str = "",
                         started: float = 0.0) -> None:
        """Await ``pending`` (of ``plugin``), then call and await ``calls`` in order (see _call_now)."""
        if pending is not None:
            try:
                result = await pending
            except BaseException as exc:
                self._raised(name, plugin, started, exc, name_rejects)
                raise
            if self.trace:
                _trace(name, plugin, started, result)
        for plugin, call in calls:
            started = time.perf_counter() if self.trace else 0.0
            try:
                result = call(*args)
                if result is not None and inspect.isawaitable(result):
                    result = await result
            except BaseException as exc:
                self._raised(name, plugin, started, exc, name_rejects)
                raise
            if self.trace:
                _trace(name, plugin, started, result)

    def _raised(self, name: str, plugin: str, started: float, exc: BaseException, name_rejects: bool) -> None:
        """An implementation of ``name`` raised ``exc``: traced, and a Reject named (``name_rejects``)."""
        if self.trace:
            _trace(name, plugin, started, exc)
        if name_rejects and isinstance(exc, Reject):
            exc.plugin = exc.plugin or plugin

    async def on_connect(self, tunnel: Any, server: Any) -> None:
        """Run every on_connect impl; errors are logged, never raised."""
        await self._call_logged("on_connect", (tunnel, server))

    async def on_disconnect(self, tunnel: Any, reason: str, server: Any) -> None:
        """Run every on_disconnect impl; errors are logged, never raised."""
        await self._call_logged("on_disconnect", (tunnel, reason, server))

    async def on_registration_refused(self, code: str, reason: str, client_address: str, server: Any) -> None:
        """Run every on_registration_refused impl; errors are logged, never raised."""
        await self._call_logged("on_registration_refused", (code, reason, client_address, server))

    async def recent_requests(self, alias: str | None, limit: int, server: Any) -> list[LoggedRequest] | None:
        """The newest requests from the first plugin that keeps a request log (None: no plugin
        answered). An implementation's exception propagates: the caller says the log cannot be read."""
        answers = await self._call_in_order("recent_requests", {"alias": alias, "limit": limit, "server": server},
                                            first_answer=True)
        return answers[0] if answers else None

    async def database_schemas(self) -> list[tuple[str, Any]]:
        """Every ``(plugin name, Schema)`` answered by ``database_schema``, in calling order."""
        return await self._call_in_order("database_schema", {}, named=True)

    async def admin_routes(self, server: Any) -> list[Any]:
        """Every route contributed by plugins, flattened."""
        routes: list[Any] = []
        for result in await self._call_in_order("admin_routes", {"server": server}):
            routes.extend(result)
        return routes

    async def agent_routes(self, server: Any) -> list[Any]:
        """Every agent-listener API route contributed by plugins, flattened."""
        routes: list[Any] = []
        for result in await self._call_in_order("agent_routes", {"server": server}):
            routes.extend(result)
        return routes


def _positional(function: Callable[..., Any], argnames: tuple[str, ...], spec: tuple[str, ...]) -> Callable[..., Any]:
    """``function``, an implementation taking ``argnames`` (pluggy passes only the arguments an
    implementation names), as a callable taking all of the hook's arguments positionally, in
    ``spec``'s order. Built once per implementation: the call per request is then ``function``
    itself (it takes them all) or one small lambda, where a dict of the arguments by name and a
    list comprehension over ``argnames`` cost about three times the call (callgrind, 3.1k against
    1.1k instructions)."""
    if argnames == spec:
        return function
    picks = [spec.index(name) for name in argnames]
    if not picks:
        return lambda *args: function()
    if len(picks) == 1:
        index = picks[0]
        return lambda *args: function(args[index])
    pick = operator.itemgetter(*picks)
    return lambda *args: function(*pick(args))


def _trace(hook: str, plugin: str, started: float, outcome: object) -> None:
    """One line per implementation called (COMZY_TRACE_HOOKS): hook, plugin, duration, outcome."""
    took = (time.perf_counter() - started) * 1000
    if isinstance(outcome, BaseException):
        shown = f"raised {type(outcome).__name__}: {outcome}"
    else:
        shown = "returned None" if outcome is None else f"returned {type(outcome).__name__}"
    trace_log.info("hook %s plugin %s took %.3f ms, %s", hook, plugin, took, shown)


def available_plugins() -> dict[str, EntryPoint]:
    """Installed plugins by entry-point name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def builtin_names() -> list[str]:
    """Plugins shipped with Comzy itself (enabled when COMZY_PLUGINS is unset): the entry points
    of the ``comzy`` distribution, whatever modules they name."""
    return sorted(name for name, ep in available_plugins().items()
                  if ep.dist is not None and (ep.dist.name or "").lower() == "comzy")


def select_plugins(setting: str | None) -> list[str]:
    """Names to enable for a COMZY_PLUGINS value: unset = built-ins, 'none' = nothing."""
    if setting is None:
        return builtin_names()
    names = [n.strip() for n in setting.split(",") if n.strip()]
    return [] if names == ["none"] else names


def unknown_plugin(name: str) -> PluginError:
    """The error for a COMZY_PLUGINS name that no installed package provides: it lists those that are."""
    known = ", ".join(sorted(available_plugins())) or "none installed"
    return PluginError(f"unknown plugin {name!r} in COMZY_PLUGINS; available: {known}")


def load_plugin(name: str, entry_point: EntryPoint) -> object:
    """Build the plugin an entry point names (a class is called with no arguments); PluginError
    says in one line why it could not be (a bad setting by its environment variable)."""
    try:
        target = entry_point.load()
        return target() if inspect.isclass(target) else target
    except ValidationError as exc:  # its settings: named by their variables, as the core's are
        model = settings_class(exc)
        detail = explain_validation_error(model, exc) if model is not None else str(exc)
        raise PluginError(f"plugin {name!r} failed to load: {detail}") from None
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to load: {exc}") from exc


def load_plugins(names: Iterable[str]) -> list[tuple[str, object]]:
    """Instantiate the named entry-point plugins; an unknown name fails with the list."""
    available = available_plugins()
    loaded = []
    for name in names:
        ep = available.get(name)
        if ep is None:
            raise unknown_plugin(name)
        loaded.append((name, load_plugin(name, ep)))
    return loaded


def build_manager(base_domain: str, plugins: Iterable[tuple[str, object]]) -> pluggy.PluginManager:
    """A fresh plugin manager with the core routing and the given plugins."""
    return plugin_manager([("core-routing", CoreRouting(base_domain)), *plugins])


def plugin_manager(plugins: Iterable[tuple[str, object]]) -> pluggy.PluginManager:
    """A fresh plugin manager with exactly the given plugins, checked as the server checks them
    (PluginError for an unknown hook, a wrong argument name, a name registered twice...)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        for name, plugin in plugins:
            if pm.has_plugin(name):  # pluggy's own message is a dump of every registered object
                raise PluginError(f"plugin {name!r} is enabled twice: name it once in COMZY_PLUGINS")
            pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:  # ValueError: a name registered twice
        raise PluginError(str(exc)) from exc
    _check_calling_rules(pm)
    return pm


def _check_calling_rules(pm: pluggy.PluginManager) -> None:
    """Refuse impls that pluggy would accept but Comzy cannot call as their author expects."""
    for hook in (*SYNC_FIRSTRESULT, *SYNC_EVERY):
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if inspect.iscoroutinefunction(impl.function) or inspect.isasyncgenfunction(impl.function):
                # firstresult + a coroutine (never None) would answer every call with garbage.
                raise PluginError(f"plugin {impl.plugin_name!r}: an async {hook} is not allowed; it must be a "
                                  "plain function (look the answer up in memory)")
    for name in sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{hookspecs.PROJECT}_spec")):
        if name in SYNC_FIRSTRESULT:
            continue  # pluggy itself calls these, wrappers included
        for impl in getattr(pm.hook, name).get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"plugin {impl.plugin_name!r}: {name} cannot be a (hook)wrapper; "
                                  "Comzy awaits each implementation in turn")


__all__ = ["HookRunner", "PluginError", "Reject", "build_manager", "load_plugin", "load_plugins", "plugin_manager",
           "select_plugins", "unknown_plugin"]

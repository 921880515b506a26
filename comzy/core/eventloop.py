"""The event loop the server and the agent run on (COMZY_EVENT_LOOP): uvloop where installed.

uvloop (libuv, in C) is a dependency on the platforms it supports, and ``auto`` (the default)
uses it: on this project's benchmark it cut the CPU per proxied request of both processes and
the latency each hop adds (docs/benchmarks.md, "Event loop"). ``asyncio`` keeps the standard
library's loop (for a platform without uvloop wheels, or to rule the loop out when debugging);
``uvloop`` insists on it and fails at start-up, saying what to install, when it is missing.
Everything Comzy runs works on both: the test suite runs in-process on asyncio's loop and the
real server and agent processes on the default.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Literal

EventLoop = Literal["auto", "uvloop", "asyncio"]
#: The values COMZY_EVENT_LOOP takes.
EVENT_LOOPS: tuple[str, ...] = ("auto", "uvloop", "asyncio")


def uvloop_missing() -> str | None:
    """Why uvloop cannot be used here (what to install), or None when it can."""
    if importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed (pip install uvloop; it has no build for Windows)"
    return None


def check_choice(choice: str) -> str:
    """``choice`` if it is a COMZY_EVENT_LOOP value that can run here; ValueError saying why not."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"must be one of {', '.join(EVENT_LOOPS)} (got {choice!r})")
    if choice == "uvloop":
        problem = uvloop_missing()
        if problem:
            raise ValueError(f"uvloop was asked for but {problem}; or set COMZY_EVENT_LOOP=auto")
    return choice


def backend_options(choice: str) -> dict[str, Any]:
    """``anyio.run``'s asyncio backend options for COMZY_EVENT_LOOP ``choice`` (checked)."""
    check_choice(choice)
    if choice == "asyncio" or uvloop_missing():
        return {}
    return {"use_uvloop": True}


def running_loop_name() -> str:
    """The running loop's implementation, as the start-up lines name it: ``uvloop`` or ``asyncio``."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".", 1)[0] == "uvloop" else "asyncio"

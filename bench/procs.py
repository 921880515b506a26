"""Subprocesses the harness starts: banners read from their output, peak memory, stopped by PID.

Every process is started here and stopped here (``Proc.stop``), by its own PID, in the
``finally`` of the ``ExitStack`` that owns it. Readiness comes from what the process prints
(its banner), never from a sleep.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

MIB = 1024 * 1024


class ProcessFailed(RuntimeError):
    """A process ended, or did not print what was expected in time."""


class Proc:
    """One subprocess with its stdout and stderr merged and drained by a thread."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.args = args
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace")
        self.pid = self.popen.pid
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._watching = True
        self._reader = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.tail.append(line)
            if self._watching:
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Block until an output line matches ``pattern``; raise if the process ends or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(f"{self.name} did not print {pattern!r} within {timeout:.0f} s:\n{self.output()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ProcessFailed(f"{self.name} exited ({self.popen.wait()}) before printing {pattern!r}:\n"
                                    f"{self.output()}")
            match = regex.search(line)
            if match:
                return match

    def done_waiting(self) -> None:
        """Stop queueing lines (they still go to ``tail`` for error reports)."""
        self._watching = False
        with contextlib.suppress(queue.Empty):
            while True:
                self._lines.get_nowait()

    def output(self) -> str:
        """The last lines the process printed."""
        return "".join(self.tail)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def peak_rss(self) -> int | None:
        """Peak resident memory in bytes (VmHWM), or None if the process is gone."""
        return read_status(self.pid, "VmHWM")

    def rss(self) -> int | None:
        """Current resident memory in bytes (VmRSS), or None if the process is gone."""
        return read_status(self.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (0.0 once it is gone)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Send ``sig`` to this process (by PID), then SIGKILL after ``grace`` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        self._reader.join(2)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def read_status(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status, in bytes."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

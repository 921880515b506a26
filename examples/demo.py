"""The quick-start demo: a server, an agent and a small sample app, all on this machine.

Run by ``make demo``. It starts ``comzy-server`` on its embedded defaults, a sample web app
on a free port, and ``comzy <port>``; prints the public URL and a curl line to try; Ctrl-C
stops all three.

The server keeps its data (the SQLite database, the admin token) in a temporary directory of its
own, printed at start and removed at the end: never in the default data directory
(~/.local/share/comzy), where a real server started later would find the demo's database and
token. With COMZY_DATA_DIR set, that directory is used and kept.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    """A sample local app: says hello and echoes the path it was asked for."""

    def do_GET(self) -> None:
        body = (f"Hello from your local app on port {self.server.server_address[1]}!\n"
                f"You asked for {self.path}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # the agent prints requests
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(signum: int, frame: object) -> None:
    """SIGTERM stops the demo as Ctrl-C does: the server and the agent stopped, the data removed."""
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    given = os.environ.get("COMZY_DATA_DIR")
    data_dir = given or tempfile.mkdtemp(prefix="comzy-demo-")
    kept = "kept: COMZY_DATA_DIR" if given else "removed at the end; set COMZY_DATA_DIR to keep it"
    print(f"demo: the server's data (database, admin token) is in {data_dir} ({kept})", file=sys.stderr, flush=True)
    try:
        run(data_dir)
    finally:
        if not given:
            shutil.rmtree(data_dir, ignore_errors=True)


def run(data_dir: str) -> None:
    """Serve the sample app, start the server (data in ``data_dir``) and the agent, and relay what
    they print until Ctrl-C or until the agent stops."""
    app = ThreadingHTTPServer(("127.0.0.1", free_port()), Hello)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    app_port = app.server_address[1]
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "COMZY_HOST": os.environ.get("COMZY_HOST", "127.0.0.1"), "COMZY_DATA_DIR": data_dir}
    server = subprocess.Popen([os.path.join(bindir, "comzy-server")], env=env,
                              stderr=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen[str]] = [server]
    try:
        assert server.stderr is not None
        ws_port = http_port = None
        for line in server.stderr:
            sys.stderr.write(line)
            if m := re.search(r"agents\s+ws://[^:]+:(\d+)", line):
                ws_port = m[1]
            if m := re.search(r"public\s+https?://[^:]+:(\d+)", line):
                http_port = m[1]
            if "data " in line and ws_port:
                break
        if ws_port is None:
            raise SystemExit("demo: comzy-server did not start (see above)")
        threading.Thread(target=lambda: [sys.stderr.write(line) for line in server.stderr], daemon=True).start()
        agent = subprocess.Popen([os.path.join(bindir, "comzy"), str(app_port), "--local-host", "127.0.0.1",
                                  "--server", f"ws://127.0.0.1:{ws_port}"], stdout=subprocess.PIPE, text=True)
        procs.append(agent)
        assert agent.stdout is not None
        for line in agent.stdout:
            sys.stdout.write(line)
            if m := re.search(r"Public URL: (\S+)", line):
                url = m[1]
                host = re.sub(r"^\w+://", "", url).split("/")[0].split(":")[0]
                print(f"\nTry it:\n  curl {url}/hello\n  curl -H 'Host: {host}' http://127.0.0.1:{http_port}/hello\n",
                      flush=True)
                break
        for line in agent.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        app.shutdown()


if __name__ == "__main__":
    main()

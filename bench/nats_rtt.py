"""The floor of the cluster's hop: sequential round trips between two Python processes over NATS.

An edge → nats-server → control node → nats-server → edge round trip is what the cluster adds to
a request at one connection, on top of the relay's own work. This measures it bare, with nothing
of Comzy in between: a requester (this process) publishes a message, a responder (a subprocess)
publishes it back on receipt, one at a time, on uvloop (the nodes' loop), through a nats-server of
its own (free port, never the machine's 4222 service). Two clients, alternating round by round:

- ``stock``: nats-py as documented (``subscribe(cb=...)``, ``publish``): each message goes through
  the subscription's queue and task, and each publish through nats-py's flusher task;
- ``direct``: ``LinkClient`` (comzy/core/cluster/connection.py), as the links use it: messages
  handled in nats-py's read loop, publishes written in the caller's call.

And a reference without nats-server, ``tcp``: the same round trip over one loopback TCP
connection between the same two processes (asyncio streams), i.e. one process hop less each way.

    python -m bench.nats_rtt                          # 3 rounds of 3,000 round trips, 1 KiB
    python -m bench.nats_rtt --count 5000 --size 1300 --rounds 5

It prints p50/p90 per client (medians over rounds) and the CPU (user + system) the responder and
nats-server spent per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from bench.procs import Proc
from bench.stack import find_nats_server

SUBJECT_IN = "rtt.in"
SUBJECT_OUT = "rtt.out"
MODES = ("stock", "direct", "tcp")


async def _client(mode: str, url: str):  # type: ignore[no-untyped-def]
    if mode == "direct":
        from comzy.core.cluster.connection import LinkClient

        client = LinkClient()
    else:
        from nats.aio.client import Client

        client = Client()
    await client.connect(servers=[url], allow_reconnect=False)
    return client


async def _serve(url: str, mode: str) -> None:
    """The responder: echo every message on SUBJECT_IN to SUBJECT_OUT (and over TCP, for ``tcp``)."""
    if mode == "tcp":
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()
        return
    client = await _client(mode, url)
    if mode == "direct":
        async def unused(msg: object) -> None:
            """Messages with headers would come here; none are sent."""
        sub = await client.subscribe(SUBJECT_IN, cb=unused)

        def on_message(subject: bytes, data: bytes) -> None:
            if not client.write_now(SUBJECT_OUT, "", b"", data):
                raise RuntimeError("LinkClient.write_now could not write (NATS reconnecting?)")
        client.direct(sub, on_message)
    else:
        async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
            await client.publish(SUBJECT_OUT, msg.data)
        await client.subscribe(SUBJECT_IN, cb=on_msg)
    await client.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _measure(url: str, mode: str, count: int, size: int, tcp_port: int) -> list[float]:
    payload = b"x" * size
    times: list[float] = []
    if mode == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        for _ in range(count + 100):
            start = time.perf_counter()
            writer.write(payload)
            got = 0
            while got < size:
                got += len(await reader.read(65536))
            times.append(time.perf_counter() - start)
        writer.close()
        return times[100:]
    client = await _client(mode, url)
    arrived = asyncio.Event()
    if mode == "direct":
        async def unused(msg: object) -> None:
            """Messages with headers would come here; none are sent."""
        sub = await client.subscribe(SUBJECT_OUT, cb=unused)
        client.direct(sub, lambda subject, data: arrived.set())
    else:
        async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
            arrived.set()
        await client.subscribe(SUBJECT_OUT, cb=on_msg)
    await client.flush()
    for _ in range(count + 100):  # the first 100 warm up
        arrived.clear()
        start = time.perf_counter()
        if mode == "direct":
            await client.publish_now(SUBJECT_IN, "", b"", payload)
        else:
            await client.publish(SUBJECT_IN, payload)
        await arrived.wait()
        times.append(time.perf_counter() - start)
    await client.close()
    return times[100:]


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.nats_rtt", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="round trips per round and client")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("URL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import uvloop

    if args.serve:
        uvloop.run(_serve(*args.serve))
        return 0
    nats_server = find_nats_server()
    if nats_server is None:
        print("nats-server is not installed (apt-get install nats-server)", file=sys.stderr)
        return 1
    procs: list[Proc] = []
    results: dict[str, list[tuple[float, float, float, float]]] = {mode: [] for mode in MODES}
    try:
        nats = Proc("nats-server", [nats_server, "-a", "127.0.0.1", "-p", "-1"])
        procs.append(nats)
        port = int(nats.wait_for(r"Listening for client connections on 127\.0\.0\.1:(\d+)")[1])
        nats.wait_for(r"Server is ready")
        nats.done_waiting()
        url = f"nats://127.0.0.1:{port}"
        for round_no in range(args.rounds):
            order = MODES if round_no % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                responder = Proc(f"responder ({mode})", [sys.executable, "-m", "bench.nats_rtt", "--serve", url,
                                                         mode])
                procs.append(responder)
                tcp_port = int(responder.wait_for(r"ready ?(\d*)")[1] or 0)
                responder.done_waiting()
                cpu = responder.cpu_seconds(), nats.cpu_seconds()
                times = uvloop.run(_measure(url, mode, args.count, args.size, tcp_port))
                used = responder.cpu_seconds() - cpu[0], nats.cpu_seconds() - cpu[1]
                responder.stop()
                procs.remove(responder)
                times.sort()
                results[mode].append((times[len(times) // 2] * 1e3, times[len(times) * 9 // 10] * 1e3,
                                      used[0] / len(times) * 1e6, used[1] / len(times) * 1e6))
    finally:
        for proc in reversed(procs):
            proc.stop()
    print(f"{args.rounds} rounds of {args.count} sequential round trips of {args.size} bytes (medians over rounds)")
    print(f"{'client':8} {'p50 ms':>8} {'p90 ms':>8} {'responder µs':>13} {'nats-server µs':>15}")
    for mode in MODES:
        rows = results[mode]
        med = [statistics.median(row[i] for row in rows) for i in range(4)]
        nats_cpu = "-" if mode == "tcp" else f"{med[3]:.0f}"
        print(f"{mode:8} {med[0]:8.3f} {med[1]:8.3f} {med[2]:13.0f} {nats_cpu:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

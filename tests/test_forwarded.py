"""RFC 7239 ``Forwarded`` (issue 17): its grammar with the RFC's own examples and hostile ones, the
trust rule shared with X-Forwarded-*, and, through a real server, agent and app, the real client
everywhere it is recorded (request log table, dashboard feed and API, metrics) while an untrusted
peer can set none of it."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import pool, select

from comzy import ForwardRequest, hookimpl
from comzy.core import db
from comzy.core.forwarded import element, format_node, format_value, node_address, parse_forwarded
from comzy.core.headers import Origin, add_forwarded, parse_networks, real_client, request_origin
from comzy.plugins.dashboard import Dashboard
from comzy.plugins.metrics import Metrics
from comzy.plugins.mysql_logging import MysqlLogging, MysqlLoggingSettings
from comzy.plugins.mysql_logging.models import ApiRequest
from tests.conftest import admin_client, start_agent, start_server
from tests.helpers import wait_until
from tests.test_plugin_dashboard import next_event, open_feed
from tests.test_plugin_mysql_logging import _no_database_environment, database  # noqa: F401 (fixtures)
from tests.upstream import Upstream

PROXIES = parse_networks("127.0.0.1/32, 10.0.0.0/8")


def chain_of(*lines: str) -> list[dict[str, str]] | None:
    chain = parse_forwarded(line.encode("latin-1") for line in lines)
    return None if chain is None else [chain.element(i) for i in range(len(chain))]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# -- The grammar ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "expected"), [
    # RFC 7239 section 4's examples.
    ('for="_gazonk"', [{"for": "_gazonk"}]),
    ('For="[2001:db8:cafe::17]:4711"', [{"for": "[2001:db8:cafe::17]:4711"}]),
    ("for=192.0.2.60;proto=http;by=203.0.113.43", [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}]),
    ("for=192.0.2.43, for=198.51.100.17", [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]),
    # Section 7.4 (X-Forwarded-For converted) and 6.3 (obfuscated identifiers).
    ('for=192.0.2.43, for="[2001:db8:cafe::17]", for=unknown',
     [{"for": "192.0.2.43"}, {"for": "[2001:db8:cafe::17]"}, {"for": "unknown"}]),
    ("for=_hidden, for=_SEVKISEK", [{"for": "_hidden"}, {"for": "_SEVKISEK"}]),
    # Case-insensitive names, whitespace around separators, empty list items, extensions ignored.
    ("FOR=192.0.2.1 ; Proto=https ;ext=1, ,for=192.0.2.2",
     [{"for": "192.0.2.1", "proto": "https"}, {"for": "192.0.2.2"}]),
    # Quoted strings with escapes.
    (r'for="_a\"b\\c";host="x.example:8443"', [{"for": '_a"b\\c', "host": "x.example:8443"}]),
    ('host="a, for=6.6.6.6"', [{"host": "a, for=6.6.6.6"}]),
])
def test_rfc_7239_elements(header: str, expected: list[dict[str, str]]) -> None:
    assert chain_of(header) == expected


def test_several_lines_are_one_list() -> None:
    assert chain_of("for=192.0.2.1", "for=192.0.2.2;proto=https") == [{"for": "192.0.2.1"},
                                                                      {"for": "192.0.2.2", "proto": "https"}]


@pytest.mark.parametrize("header", [
    "for=[2001:db8::1]",            # IPv6 must be quoted (not a token)
    'for="192.0.2.1',               # unterminated quoted string
    "for=192.0.2.1;for=192.0.2.2",  # a parameter twice in one element
    "for = 192.0.2.1",              # nothing around "="
    "for=192.0.2.1 proto=http",     # pairs without ";"
    "=192.0.2.1", "for=", "for", "for=192.0.2.1,proto",
    'for="a\x01b"',                 # a control character, even quoted
    'for="\\"',                     # an escape eats the closing quote
    "for=a\\b",                     # a backslash outside quotes
    "for=192.0.2.1\x00",
    " " * 100_000 + "x",            # hostile: a long run of spaces, then a bad byte
    'for="' + "\\a" * 50_000,      # hostile: a long unterminated quoted string of escapes
    "for=a;" * 20_000 + "for=a",    # hostile: a parameter repeated in one huge element
])
def test_a_malformed_header_counts_as_absent(header: str) -> None:
    assert chain_of(header) is None
    # ... and never fails the request: the proxy's view is simply not taken from it.
    headers = [(b"forwarded", header.encode("latin-1")), (b"x-real-ip", b"203.0.113.8")]
    assert real_client(headers, "127.0.0.1", PROXIES) == "203.0.113.8"
    out = add_forwarded(headers, "127.0.0.1", "http", b"h", trusted=True,
                        origin=request_origin(headers, "127.0.0.1", "http", b"h", PROXIES))
    assert values(out, b"forwarded") == [] and values(out, b"x-forwarded-for") == [b"127.0.0.1"]


def test_headers_without_a_pair_are_absent() -> None:
    assert chain_of("") is None and chain_of(" , ,; ") is None


@pytest.mark.parametrize(("node", "address"), [
    ("192.0.2.43", "192.0.2.43"), ("192.0.2.43:8080", "192.0.2.43"), ("192.0.2.43:_port", "192.0.2.43"),
    ("[2001:db8:cafe::17]:4711", "2001:db8:cafe::17"), ("[2001:DB8::1]", "2001:db8::1"),
    ("unknown", None), ("_hidden", None), ("", None), ("2001:db8::1", None), ("[192.0.2.1]", None),
    ("[2001:db8::1]x", None), ("192.0.2.1:123456", None), ("192.0.2.1:", None), ("[2001:db8::1", None),
    ("example.com", None),
])
def test_node_addresses(node: str, address: str | None) -> None:
    assert node_address(node) == address


def test_the_edge_s_element_quotes_what_is_no_token() -> None:
    assert element("192.0.2.1", "http", "a.example") == "for=192.0.2.1;proto=http;host=a.example"
    assert element("2001:db8::1", "https", "a.example:8443") == 'for="[2001:db8::1]";proto=https;host="a.example:8443"'
    assert element("", "http", "") == "for=unknown;proto=http"
    assert format_value('a"b\\c') == '"a\\"b\\\\c"'
    assert format_value("a\x01b") is None  # not even a quoted string carries it: host left out
    assert element("192.0.2.1", "http", "a\x01b") == "for=192.0.2.1;proto=http"
    assert format_node("::1") == '"[::1]"'


@given(peer=st.ip_addresses().map(str), host=st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=30))
def test_the_edge_s_element_reads_back(peer: str, host: str) -> None:
    parsed = chain_of(element(peer, "https", host))
    assert parsed is not None and len(parsed) == 1
    assert node_address(parsed[0]["for"]) == peer and parsed[0]["proto"] == "https"
    assert parsed[0].get("host", host) == host


@given(text=st.text(alphabet=st.sampled_from(list('for=_"\\[]:;, \t1.2a\x01')), max_size=40))
def test_any_text_parses_or_is_absent_and_hops_stay_one_per_element(text: str) -> None:
    chain = parse_forwarded([text.encode("latin-1")])
    if chain is not None:
        hops = list(chain.hops())
        assert len(hops) == len(chain)
        assert not any("," in hop or " " in hop for hop in hops)


# -- Trust ---------------------------------------------------------------------------------------
def test_the_real_client_walks_the_forwarded_chain() -> None:
    def client(header: str, peer: str = "127.0.0.1") -> str:
        return real_client([(b"forwarded", header.encode())], peer, PROXIES)

    assert client("for=203.0.113.7") == "203.0.113.7"
    assert client('for=6.6.6.6, for="203.0.113.7:4711", for=10.1.1.1') == "203.0.113.7"  # 10.1.1.1: a proxy
    assert client('for="[2001:db8::7]:4711"') == "2001:db8::7"
    assert client("for=203.0.113.7", peer="198.51.100.1") == "198.51.100.1"  # an untrusted peer: itself
    # unknown and obfuscated nodes end the walk at the last hop that was an address.
    assert client("for=6.6.6.6, for=unknown, for=10.1.1.1") == "10.1.1.1"
    assert client("for=_hidden") == "127.0.0.1"
    assert client("proto=https") == "127.0.0.1"
    # All trusted: the farthest one.
    assert client("for=10.0.0.9, for=10.1.1.1") == "10.0.0.9"


def test_x_forwarded_for_wins_over_forwarded() -> None:
    """nginx, Caddy and others write X-Forwarded-* themselves and pass a visitor's Forwarded on."""
    both = [(b"forwarded", b"for=6.6.6.6;proto=http;host=evil.example"), (b"x-forwarded-for", b"203.0.113.7"),
            (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"app.example")]
    assert request_origin(both, "127.0.0.1", "http", b"h", PROXIES) == request_origin(
        both[1:], "127.0.0.1", "http", b"h", PROXIES)
    assert request_origin(both, "127.0.0.1", "http", b"h", PROXIES).client == "203.0.113.7"
    # With X-Forwarded-For there, nothing of Forwarded is believed, not even what X-Forwarded-* left out.
    partial = [(b"forwarded", b"for=6.6.6.6;proto=https;host=evil.example"), (b"x-forwarded-for", b"203.0.113.7")]
    assert request_origin(partial, "127.0.0.1", "http", b"h", PROXIES) == Origin("203.0.113.7", "http", b"h")


@pytest.mark.parametrize(("sent", "scheme"), [("https", "https"), ("HTTPS", "https"), ("http, https", "https"),
                                              ("gopher", "http"), ("", "http")])
def test_the_scheme_a_trusted_proxy_names(sent: str, scheme: str) -> None:
    headers = [(b"x-forwarded-proto", sent.encode())]
    assert request_origin(headers, "127.0.0.1", "http", b"h", PROXIES).scheme == scheme
    assert request_origin(headers, "203.0.113.1", "http", b"h", PROXIES).scheme == "http"  # untrusted


def test_scheme_and_host_come_from_the_element_of_the_outermost_trusted_proxy() -> None:
    headers = [(b"forwarded", b'for=203.0.113.7;proto=https;host="app.example:8443", for=10.1.1.1;proto=http;host=in')]
    origin = request_origin(headers, "127.0.0.1", "http", b"edge", PROXIES)
    assert (origin.client, origin.scheme, origin.host) == ("203.0.113.7", "https", b"app.example:8443")
    # A proto that is neither http nor https is not believed; a missing one leaves the edge's own.
    odd = [(b"forwarded", b"for=203.0.113.7;proto=gopher")]
    assert request_origin(odd, "127.0.0.1", "http", b"edge", PROXIES).scheme == "http"
    # From an untrusted peer nothing of it counts.
    assert request_origin(headers, "203.0.113.1", "http", b"edge", PROXIES).scheme == "http"


def test_a_trusted_proxy_s_forwarded_is_extended_and_said_in_x_forwarded_too() -> None:
    headers = [(b"forwarded", b'for="_x", for="a, 6.6.6.6"'), (b"accept", b"*/*"),
               (b"forwarded", b'for=203.0.113.7;proto=https;host="app.example:8443", for="[2001:db8::9]:80"')]
    origin = request_origin(headers, "::1", "http", b"h:1", parse_networks("::1/128, 2001:db8::/32"))
    out = add_forwarded(headers, "::1", "http", b"h:1", trusted=True, origin=origin)
    assert values(out, b"forwarded") == [b'for="_x", for="a, 6.6.6.6", '
                                         b'for=203.0.113.7;proto=https;host="app.example:8443", '
                                         b'for="[2001:db8::9]:80", for="[::1]";proto=http;host="h:1"']
    # One X-Forwarded-For entry per element: a quoted comma does not make a forged hop.
    assert values(out, b"x-forwarded-for") == [b"_x, unknown, 203.0.113.7, 2001:db8::9, ::1"]
    # Scheme and host: those of the element 203.0.113.7's proxy wrote (2001:db8::9 is trusted too).
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"app.example:8443"]
    assert values(out, b"accept") == [b"*/*"]


def test_an_untrusted_peer_s_forwarded_is_dropped() -> None:
    headers = [(b"forwarded", b"for=203.0.113.7;proto=https"), (b"Forwarded", b"for=203.0.113.8")]
    origin = request_origin(headers, "198.51.100.1", "http", b"h", PROXIES)
    out = add_forwarded(headers, "198.51.100.1", "http", b"h", trusted=False, origin=origin)
    assert not any(n.lower() == b"forwarded" for n, _ in out)
    assert values(out, b"x-forwarded-for") == [b"198.51.100.1"] and values(out, b"x-forwarded-proto") == [b"http"]


def test_a_header_of_thousands_of_elements_costs_memory_within_its_size() -> None:
    line = ", ".join(f"for=10.0.{i // 250}.{i % 250}" for i in range(8000)) + ", for=203.0.113.7"
    headers = [(b"forwarded", line.encode())]
    tracemalloc.start()
    try:
        origin = request_origin(headers, "127.0.0.1", "http", b"h", PROXIES)
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = add_forwarded(headers, "127.0.0.1", "http", b"h", trusted=True, origin=origin)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert origin.client == "203.0.113.7"
    # The extended Forwarded and the X-Forwarded-For made from it are about the header's size each;
    # the parse itself adds 4 bytes per element. A dict per element would be ~40 times the size.
    assert peak - before < 5 * len(line), (peak - before, len(line))
    assert len(values(out, b"x-forwarded-for")[0].split(b",")) == 8002


# -- End to end ----------------------------------------------------------------------------------
#: A visitor that is not the trusted proxy: another loopback address.
VISITOR_ADDRESS = "127.0.0.2"


class Seen:
    """What plugins are given for each request: its path, client and scheme."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    @hookimpl
    def before_forward(self, request: ForwardRequest) -> None:
        self.requests.append((request.path, request.client, request.scheme))


def visitor_from(server: Any, alias: str, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{server.ports.http}",
                             headers={"host": f"{alias}.{server.settings.base_domain}"}, timeout=30)


def echoed(response: httpx.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, response.text
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


FORGED = {"forwarded": 'for=203.0.113.66;proto=https;host="forged.example"', "x-forwarded-for": "203.0.113.67",
          "x-real-ip": "203.0.113.68", "x-forwarded-proto": "https"}


@pytest.mark.anyio
async def test_forwarded_from_a_trusted_proxy_end_to_end(tmp_path: Path, upstream: Upstream) -> None:
    seen = Seen()
    async with start_server(tmp_path / "data", [("seen", seen)], trusted_proxies="127.0.0.1/32") as server, \
            start_agent(server, upstream.port) as running:
        host = f"{running.alias}.{server.settings.base_domain}"
        async with visitor_from(server, running.alias, "127.0.0.1") as proxy:
            proxied = echoed(await proxy.get("/by-proxy", headers={
                "forwarded": 'for="[2001:db8::7]:4711";proto=https;host="app.example:8443"'}))
            broken = echoed(await proxy.get("/broken", headers={"forwarded": "for=[2001:db8::7]"}))
            echoed(await proxy.get("/x-forwarded", headers={"x-forwarded-for": "203.0.113.5",
                                                            "x-forwarded-proto": "https"}))
        async with visitor_from(server, running.alias, VISITOR_ADDRESS) as visitor:
            forged = echoed(await visitor.get("/forged", headers=FORGED))
    # The app is told what the proxy said, in both header families, plus the hop the edge saw.
    assert proxied["forwarded"] == [f'for="[2001:db8::7]:4711";proto=https;host="app.example:8443", '
                                    f"for=127.0.0.1;proto=http;host={host}"]
    assert proxied["x-forwarded-for"] == ["2001:db8::7, 127.0.0.1"]
    assert proxied["x-forwarded-proto"] == ["https"] and proxied["x-forwarded-host"] == ["app.example:8443"]
    # A malformed Forwarded counts as absent: no error for the visitor, nothing taken from it.
    assert "forwarded" not in broken and broken["x-forwarded-for"] == ["127.0.0.1"]
    # A visitor who is not the proxy sets nothing.
    assert "forwarded" not in forged and "x-real-ip" not in forged
    assert forged["x-forwarded-for"] == [VISITOR_ADDRESS] and forged["x-forwarded-proto"] == ["http"]
    assert seen.requests == [("/by-proxy", "2001:db8::7", "https"), ("/broken", "127.0.0.1", "http"),
                             ("/x-forwarded", "203.0.113.5", "https"), ("/forged", VISITOR_ADDRESS, "http")]


@pytest.mark.anyio
async def test_the_real_client_is_in_the_request_log_the_dashboard_and_not_in_metrics(
        tmp_path: Path, upstream: Upstream, database: dict[str, Any]) -> None:  # noqa: F811 (the fixture)
    """Behind a trusted proxy, every record of a request names the visitor, never the proxy's
    127.0.0.1; an untrusted peer cannot put another address there. The request log's table on
    SQLite and MariaDB (skipped without one locally, required under CI=true)."""
    logging_plugin = MysqlLogging(MysqlLoggingSettings(_env_file=None, flush_seconds=0.05))
    plugins = [("mysql_logging", logging_plugin), ("dashboard", Dashboard()), ("metrics", Metrics())]
    sent = [("/xff", "127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, "203.0.113.7"),
            ("/forwarded", "127.0.0.1", {"forwarded": "for=203.0.113.8;proto=https"}, "203.0.113.8"),
            ("/real-ip", "127.0.0.1", {"x-real-ip": "203.0.113.9"}, "203.0.113.9"),
            ("/forged", VISITOR_ADDRESS, FORGED, VISITOR_ADDRESS)]
    async with start_server(tmp_path / "data", plugins, trusted_proxies="127.0.0.1/32", **database) as server, \
            start_agent(server, upstream.port) as running:
        feed = await open_feed(server)
        try:
            await next_event(feed, "snapshot")
            for path, address, headers, _ in sent:
                async with visitor_from(server, running.alias, address) as client:
                    assert (await client.get(path, headers=headers)).status_code == 200
            events = [await next_event(feed, "request") for _ in sent]
        finally:
            await feed.aclose()
        engine = db.create_engine(db.database_url(server.settings), poolclass=pool.NullPool)
        table = ApiRequest.__table__

        async def rows() -> list[tuple[str, str]]:
            async with engine.connect() as connection:
                result = await connection.execute(select(table.c.path, table.c.client_address).order_by(table.c.id))
                return [(str(path), str(client)) for path, client in result]

        try:
            await wait_until(lambda: _has(rows, len(sent)))
            logged = await rows()
        finally:
            await engine.dispose()
        async with admin_client(server) as admin:
            api = (await admin.get("/api/requests", params={"alias": running.alias})).json()
            metrics = (await admin.get("/metrics")).text
    expected = [(path, client) for path, _, _, client in sent]
    assert logged == expected  # the mysql_logging table
    assert [(e["path"], e["client"]) for e in events] == expected  # the dashboard's live feed
    assert api["source"] == "log" and [(r["path"], r["client"]) for r in reversed(api["requests"])] == expected
    # Metrics carry no client address at all (no label per visitor: unbounded series, and personal data).
    assert "comzy_requests_total" in metrics
    for address in ("127.0.0.1", VISITOR_ADDRESS, "203.0.113."):
        assert address not in metrics, address


async def _has(rows: Any, count: int) -> bool:
    return len(await rows()) >= count

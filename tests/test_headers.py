"""Property tests of the edge's header rules (comzy/core/headers.py): whatever a visitor sends,
the local app never gets a Host-less request, a visitor's forged client address, two body
framings, or an absolute-form target."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from comzy.core.forwarded import parse_forwarded
from comzy.core.headers import (
    FORWARDING,
    HOP_BY_HOP,
    PROTECTED,
    FramingError,
    add_forwarded,
    announces_body,
    head_size,
    is_trusted,
    origin_form,
    parse_networks,
    plain_request_headers,
    real_client,
    strip_hop_by_hop,
)

token = st.sampled_from([b"host", b"content-length", b"x-forwarded-for", b"x-real-ip", b"forwarded",
                         b"connection", b"keep-alive", b"te", b"x-app", b"cookie", b"transfer-encoding",
                         b"x-forwarded-proto", b"upgrade"])
value = st.binary(min_size=0, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)
headers = st.lists(st.tuples(token, value), max_size=12)
connection_lists = st.lists(token, max_size=6).map(lambda names: b", ".join(names))


@given(headers=headers, named=connection_lists)
def test_connection_never_removes_what_the_tunnel_relies_on(headers: list[tuple[bytes, bytes]],
                                                            named: bytes) -> None:
    sent = [*headers, (b"connection", named)]
    kept = strip_hop_by_hop(sent)
    for name in PROTECTED:
        assert [v for n, v in kept if n == name] == [v for n, v in sent if n == name]
    assert not any(n in HOP_BY_HOP for n, _ in kept)
    # Order and duplicates of what stays are those the visitor sent.
    assert kept == [(n, v) for n, v in sent if (n, v) in kept]


@given(headers=headers, client=st.sampled_from(["127.0.0.1", "203.0.113.5", "::1", ""]),
       host=st.binary(max_size=10))
def test_an_untrusted_visitor_cannot_claim_a_client_address(headers: list[tuple[bytes, bytes]], client: str,
                                                            host: bytes) -> None:
    out = add_forwarded(headers, client, "https", host, trusted=False)
    assert [v for n, v in out if n == b"x-forwarded-for"] == ([client.encode()] if client else [])
    assert not any(n in (b"x-real-ip", b"forwarded") for n, _ in out)
    assert [v for n, v in out if n == b"x-forwarded-proto"] == [b"https"]
    assert [v for n, v in out if n == b"x-forwarded-host"] == ([host] if host else [])
    # Everything else the visitor sent goes through untouched, in order.
    assert [h for h in out if h[0] not in FORWARDING] == [h for h in headers if h[0] not in FORWARDING]


@given(headers=headers)
@example(headers=[(b"forwarded", b"0=0")])  # a well-formed Forwarded without X-Forwarded-For
@example(headers=[(b"forwarded", b"for=1.2.3.4"), (b"x-forwarded-for", b"5.6.7.8")])
def test_a_trusted_proxy_chain_is_extended(headers: list[tuple[bytes, bytes]]) -> None:
    out = add_forwarded(headers, "10.0.0.2", "http", b"h", trusted=True)
    prior = [v for n, v in headers if n == b"x-forwarded-for"]
    forwarded = parse_forwarded(v for n, v in headers if n == b"forwarded")
    if not prior and forwarded is not None:  # the proxy's Forwarded, said as X-Forwarded-For
        prior = [", ".join(forwarded.hops()).encode()]
    assert [v for n, v in out if n == b"x-forwarded-for"] == [b", ".join([*prior, b"10.0.0.2"])]
    assert [v for n, v in out if n == b"x-real-ip"] == [v for n, v in headers if n == b"x-real-ip"]
    # The proxy's view of scheme and host (it terminated TLS) wins over the edge's.
    for name, ours in ((b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"h")):
        theirs = [v for n, v in headers if n == name]
        assert [v for n, v in out if n == name] == (theirs or [ours])


@given(headers=headers)
def test_two_body_framings_are_always_refused(headers: list[tuple[bytes, bytes]]) -> None:
    names = {n for n, _ in headers}
    try:
        body = announces_body(headers)
    except FramingError:
        refused = True
    else:
        refused = False
    assert refused == ({b"content-length", b"transfer-encoding"} <= names)
    if not refused and b"transfer-encoding" in names:
        assert body is True
    if not names & {b"content-length", b"transfer-encoding"}:
        assert body is None  # the ASGI messages decide (HTTP/2)


plain_values = st.one_of(value, st.sampled_from([b"0", b" 0", b"", b"12", b"close", b"x-app, te", b"keep-alive",
                                                  b"host, content-length", b"x-forwarded-for, cookie"]))


@given(headers=st.lists(st.tuples(token, plain_values), max_size=12), trusted=st.booleans())
@example(headers=[(b"host", b"a"), (b"connection", b"x-app"), (b"x-app", b"1"), (b"connection", b"cookie"),
                  (b"cookie", b"c")], trusted=False)
@example(headers=[(b"host", b"a"), (b"content-length", b" 0"), (b"x-real-ip", b"1.2.3.4")], trusted=True)
def test_the_plain_path_forwards_what_the_general_rules_do(headers: list[tuple[bytes, bytes]], trusted: bool) -> None:
    """plain_request_headers (the edge's plain path, one pass) against the functions the ASGI path
    composes: the same headers kept, the same Host, and nothing with a body or two Hosts served."""
    plain = plain_request_headers(headers, trusted)
    hosts = [v for n, v in headers if n == b"host"]
    bodyless = all(n != b"transfer-encoding" and (n != b"content-length" or v.strip() in (b"0", b""))
                   for n, v in headers)
    assert (plain is not None) == (len(hosts) == 1 and bodyless)
    if plain is None:
        return
    assert not announces_body(headers)
    kept, host, size = plain
    assert host == hosts[0]
    assert size == head_size(headers)
    general = strip_hop_by_hop(headers)
    assert kept == (general if trusted else [h for h in general if h[0] not in FORWARDING])


path_chars = st.text(alphabet="abcxyz/%?=&.-_~0123456789", max_size=20).map(str.encode)


@given(scheme=st.sampled_from([b"http", b"https", b"ws", b"HTTP"]),
       authority=st.text(alphabet="abc.:@0123456789[]", min_size=1, max_size=20).map(str.encode),
       path=path_chars)
def test_an_absolute_form_target_always_becomes_origin_form(scheme: bytes, authority: bytes, path: bytes) -> None:
    target = origin_form(scheme + b"://" + authority + (b"/" + path if path else b""))
    assert target.startswith(b"/")
    assert authority not in target or authority in path


@given(path=path_chars)
def test_origin_form_targets_pass_untouched(path: bytes) -> None:
    assert origin_form(b"/" + path) == b"/" + path


def test_trust_follows_the_networks() -> None:
    networks = parse_networks("127.0.0.1/32, 10.0.0.0/8, fd00::/8")
    assert is_trusted("127.0.0.1", networks) and is_trusted("10.9.8.7", networks) and is_trusted("fd00::1", networks)
    assert not is_trusted("127.0.0.2", networks) and not is_trusted("203.0.113.1", networks)
    assert not is_trusted("not-an-ip", networks) and not is_trusted("", networks)
    assert not is_trusted("127.0.0.1", ())  # none by default


def test_the_real_client_is_the_nearest_untrusted_hop() -> None:
    proxies = parse_networks("127.0.0.1/32, 10.0.0.0/8")
    xff = [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.7"), (b"x-forwarded-for", b"10.1.1.1")]
    assert real_client(xff, "127.0.0.1", proxies) == "203.0.113.7"  # 10.1.1.1 is another proxy
    assert real_client(xff, "198.51.100.1", proxies) == "198.51.100.1"  # an untrusted peer: itself
    assert real_client([(b"x-real-ip", b"203.0.113.8")], "127.0.0.1", proxies) == "203.0.113.8"
    assert real_client([], "127.0.0.1", proxies) == "127.0.0.1"
    # A value that is no address ends the walk at the last hop that was one.
    assert real_client([(b"x-forwarded-for", b"evil\n, 10.2.2.2")], "127.0.0.1", proxies) == "10.2.2.2"


@given(chain=st.lists(st.sampled_from(["10.0.0.1", "10.9.9.9", "203.0.113.1", "198.51.100.2", "bogus"]),
                      max_size=5))
def test_the_real_client_is_never_a_forged_left_hop(chain: list[str]) -> None:
    proxies = parse_networks("10.0.0.0/8")
    got = real_client([(b"x-forwarded-for", ", ".join(chain).encode())] if chain else [], "10.0.0.5", proxies)
    hops = ["10.0.0.5", *reversed(chain)]
    # The answer is a hop reached by walking left through trusted proxies only.
    index = hops.index(got)
    assert all(hop.startswith("10.") for hop in hops[:index])

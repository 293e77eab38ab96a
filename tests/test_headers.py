"""twistproxy.headers: hop-by-hop rules, Host/X-Forwarded-*/Via, actions, reverse mapping,
Max-Forwards and the Server header."""

import platform

import pytest

from twistproxy import __version__
from twistproxy.config import HeaderAction
from twistproxy.headers import (
    HOP_BY_HOP, REWRITTEN_RESPONSE_HEADERS, ReverseMap, apply_actions, connection_tokens,
    decrement_max_forwards, max_forwards, request_to_backend, response_to_client,
    server_header,
)


def req(headers, **kw):
    """request_to_backend with everyday defaults; add_headers off unless asked, so each
    test sees only what it is about."""
    args = dict(client_ip="10.0.0.9", backend_hostport=b"127.0.0.1:3000", preserve_host=False,
                add_headers=False, server_name=b"www.example.com", via="off",
                via_name=b"www.example.com:80", client_version=b"1.1")
    args.update(kw)
    return request_to_backend(headers, **args)


def resp(headers, **kw):
    args = dict(via="off", via_name=b"www.example.com:80", backend_version=b"1.1")
    args.update(kw)
    return response_to_client(headers, **args)


def values(headers, name):
    return [v for n, v in headers if n.lower() == name]


# -- constants and Connection ----------------------------------------------------------

def test_hop_by_hop_set():
    assert HOP_BY_HOP == {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                          b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                          b"proxy-authorization"}
    assert all(n == n.lower() for n in HOP_BY_HOP)


def test_connection_tokens_from_every_connection_header():
    h = [(b"Connection", b"close, X-Foo"), (b"Host", b"a"), (b"connection", b" Keep-Alive ,,x-BAR")]
    assert connection_tokens(h) == {b"close", b"x-foo", b"keep-alive", b"x-bar"}
    assert connection_tokens([(b"Host", b"a")]) == frozenset()


# -- request ---------------------------------------------------------------------------

def test_request_drops_hop_by_hop_and_framing():
    h = [(b"Host", b"example.com"), (b"Connection", b"keep-alive"), (b"Keep-Alive", b"300"),
         (b"Proxy-Connection", b"keep-alive"), (b"Trailer", b"X-T"),
         (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"), (b"Upgrade", b"h2c"),
         (b"Proxy-Authorization", b"Basic eA=="), (b"TE", b"gzip"),
         (b"Expect", b"100-continue"), (b"Accept", b"*/*")]
    out, host = req(h)
    assert out == [(b"Host", b"127.0.0.1:3000"), (b"Accept", b"*/*")]
    assert host == b"example.com"


def test_request_drops_connection_listed_custom_header():
    h = [(b"Host", b"a"), (b"X-Foo", b"1"), (b"Connection", b"close, X-Foo"),
         (b"X-Bar", b"2"), (b"x-foo", b"3")]
    out, _ = req(h)
    assert out == [(b"Host", b"127.0.0.1:3000"), (b"X-Bar", b"2")]


def test_request_te_dropped_even_when_it_lists_trailers():
    # RFC 9110 §10.1.4: TE is hop-by-hop; Apache passes on none of it, trailers included
    h = [(b"Host", b"a"), (b"TE", b"gzip;q=0.5, Trailers"), (b"Connection", b"TE")]
    out, _ = req(h)
    assert out == [(b"Host", b"127.0.0.1:3000")]


def test_request_te_without_trailers_dropped():
    out, _ = req([(b"Host", b"a"), (b"TE", b"gzip"), (b"TE", b"x-trailersish")])
    assert out == [(b"Host", b"127.0.0.1:3000")]


def test_request_keep_upgrade_and_chain_auth():
    h = [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
         (b"Proxy-Authorization", b"Basic eA==")]
    out, _ = req(h)
    assert out == [(b"Host", b"127.0.0.1:3000")]
    out, _ = req(h, keep_upgrade=True, proxy_chain_auth=True)
    assert out == [(b"Host", b"127.0.0.1:3000"), (b"Upgrade", b"websocket"),
                   (b"Proxy-Authorization", b"Basic eA==")]


def test_request_keeps_order_names_and_repeats():
    h = [(b"x-CUSTOM", b"1"), (b"Host", b"a"), (b"Cookie", b"a=1"), (b"x-custom", b"2"),
         (b"Cookie", b"b=2")]
    out, _ = req(h)
    assert out == [(b"Host", b"127.0.0.1:3000"), (b"x-CUSTOM", b"1"), (b"Cookie", b"a=1"),
                   (b"x-custom", b"2"), (b"Cookie", b"b=2")]


@pytest.mark.parametrize("preserve, sent, expect_host, expect_original", [
    (False, b"example.com:8080", b"127.0.0.1:3000", b"example.com:8080"),
    (True, b"example.com:8080", b"example.com:8080", b"example.com:8080"),
    (True, None, b"127.0.0.1:3000", None),
    (False, None, b"127.0.0.1:3000", None),
])
def test_request_host(preserve, sent, expect_host, expect_original):
    h = [(b"Accept", b"*/*")] + ([(b"hOsT", sent)] if sent else [])
    out, original = req(h, preserve_host=preserve)
    assert out[0] == (b"Host", expect_host)      # Host always first
    assert values(out, b"host") == [expect_host]
    assert original == expect_original


def test_request_add_headers_fresh():
    out, _ = req([(b"Host", b"example.com")], add_headers=True)
    assert out == [(b"Host", b"127.0.0.1:3000"), (b"X-Forwarded-For", b"10.0.0.9"),
                   (b"X-Forwarded-Host", b"example.com"),
                   (b"X-Forwarded-Server", b"www.example.com")]


def test_request_xff_appended_to_two_existing():
    h = [(b"x-forwarded-for", b"1.1.1.1"), (b"Host", b"a"),
         (b"X-Forwarded-For", b"2.2.2.2, 3.3.3.3"),
         (b"X-Forwarded-Host", b"orig.example"), (b"X-Forwarded-Server", b"edge1")]
    out, _ = req(h, add_headers=True)
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]
    assert (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9") in out  # first name kept
    assert values(out, b"x-forwarded-host") == [b"orig.example, a"]
    assert values(out, b"x-forwarded-server") == [b"edge1, www.example.com"]


def test_request_add_headers_without_host():
    out, host = req([(b"X-Forwarded-Host", b"orig")], add_headers=True)
    assert host is None
    assert values(out, b"x-forwarded-host") == [b"orig"]       # passed on, nothing added
    out, _ = req([], add_headers=True)
    assert values(out, b"x-forwarded-host") == []


def test_request_add_headers_off_leaves_existing_alone():
    h = [(b"Host", b"a"), (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")]
    out, _ = req(h)
    assert out[1:] == h[1:]


def test_request_connection_listed_xff_replaced_by_ours():
    h = [(b"Host", b"a"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Connection", b"X-Forwarded-For")]
    out, _ = req(h, add_headers=True)
    assert values(out, b"x-forwarded-for") == [b"10.0.0.9"]


@pytest.mark.parametrize("mode, expect", [
    ("off", [b"1.0 a", b"1.1 b"]),
    ("on", [b"1.0 a, 1.1 b, 1.1 www.example.com:80"]),
    ("full", [b"1.0 a, 1.1 b, 1.1 www.example.com:80 (twistproxy)"]),
    ("block", []),
])
def test_request_via(mode, expect):
    h = [(b"Host", b"x"), (b"Via", b"1.0 a"), (b"via", b"1.1 b")]
    out, _ = req(h, via=mode)
    assert values(out, b"via") == expect


def test_request_via_client_version_and_fresh():
    out, _ = req([(b"Host", b"x")], via="on", client_version=b"1.0")
    assert out[-1] == (b"Via", b"1.0 www.example.com:80")


def test_request_unknown_via_mode():
    with pytest.raises(ValueError):
        req([], via="sometimes")


# -- response --------------------------------------------------------------------------

def test_response_drops_hop_by_hop_and_framing():
    h = [(b"Connection", b"close, X-Secret"), (b"X-Secret", b"s"), (b"Keep-Alive", b"t=5"),
         (b"Proxy-Connection", b"x"), (b"Proxy-Authenticate", b"Basic"), (b"TE", b"trailers"),
         (b"Trailer", b"X-T"), (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"9"),
         (b"Upgrade", b"websocket"), (b"Content-Type", b"text/plain")]
    assert resp(h) == [(b"Content-Type", b"text/plain")]
    assert resp(h, keep_upgrade=True) == [(b"Upgrade", b"websocket"),
                                          (b"Content-Type", b"text/plain")]


def test_response_set_cookie_kept_separate_and_in_order():
    h = [(b"Set-Cookie", b"a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT"), (b"X-A", b"x"),
         (b"set-cookie", b"b=2"), (b"Set-Cookie", b"c=3")]
    assert resp(h) == h


@pytest.mark.parametrize("mode, expect", [
    ("off", [b"1.1 backend"]),
    ("block", [b"1.1 backend"]),
    ("on", [b"1.1 backend, 1.0 www.example.com:80"]),
    ("full", [b"1.1 backend, 1.0 www.example.com:80 (twistproxy)"]),
])
def test_response_via(mode, expect):
    out = resp([(b"Via", b"1.1 backend")], via=mode, backend_version=b"1.0")
    assert values(out, b"via") == expect


# -- actions ---------------------------------------------------------------------------

def test_actions_set_add_unset():
    h = [(b"x-a", b"1"), (b"B", b"2"), (b"X-A", b"3"), (b"C", b"4")]
    acts = [HeaderAction("set", "X-A", "new"), HeaderAction("add", "B", "5"),
            HeaderAction("unset", "c"), HeaderAction("set", "X-New", "n")]
    assert apply_actions(h, acts) == [(b"X-A", b"new"), (b"B", b"2"), (b"B", b"5"),
                                      (b"X-New", b"n")]
    assert h[0] == (b"x-a", b"1")                      # input list not modified


def test_actions_in_order():
    acts = [HeaderAction("add", "X", "1"), HeaderAction("unset", "x"),
            HeaderAction("add", "X", "2")]
    assert apply_actions([], acts) == [(b"X", b"2")]


def test_actions_always_on_error_responses():
    acts = [HeaderAction("set", "X-Normal", "1"), HeaderAction("set", "X-Always", "2", always=True)]
    assert apply_actions([], acts, error_response=True) == [(b"X-Always", b"2")]
    assert apply_actions([], acts) == [(b"X-Normal", b"1"), (b"X-Always", b"2")]


def test_actions_latin1_values():
    assert apply_actions([], [HeaderAction("add", "X", "caf\xe9")]) == [(b"X", b"caf\xe9")]


# -- ProxyPassReverse ------------------------------------------------------------------

BASE = b"https://example.com:8443"


def test_location_match_and_no_match():
    m = ReverseMap([("http://127.0.0.1:3000/", "/api/users/")])
    assert m.location(b"http://127.0.0.1:3000/42?x=1", BASE) == BASE + b"/api/users/42?x=1"
    assert m.location(b"http://other:3000/42", BASE) == b"http://other:3000/42"
    assert m.location(b"/relative/unmatched", BASE) == b"/relative/unmatched"


def test_location_case_insensitive_prefix():
    m = ReverseMap([("http://Backend.Local/app/", "/pub/")])
    assert m.location(b"HTTP://backend.local/app/X", BASE) == BASE + b"/pub/X"


def test_location_default_port_both_ways():
    m = ReverseMap([("http://b/", "/x/")])
    assert m.location(b"http://b:80/p", BASE) == BASE + b"/x/p"
    assert m.location(b"http://b/p", BASE) == BASE + b"/x/p"
    m = ReverseMap([("https://b:443/", "/s/")])
    assert m.location(b"https://b/p", BASE) == BASE + b"/s/p"
    m = ReverseMap([("http://b:8080/", "/y/")])
    assert m.location(b"http://b/p", BASE) == b"http://b/p"


def test_location_first_entry_wins():
    m = ReverseMap([("http://b/", "/first/"), ("http://b/deep/", "/second/")])
    assert m.location(b"http://b/deep/1", BASE) == BASE + b"/first/deep/1"


def test_location_absolute_public_left_as_is():
    m = ReverseMap([("http://b/", "https://cdn.example/")])
    assert m.location(b"http://b/p", BASE) == b"https://cdn.example/p"


def test_rewritten_header_names_and_rewrite():
    assert REWRITTEN_RESPONSE_HEADERS == {b"location", b"content-location", b"uri", b"destination"}
    m = ReverseMap([("http://b/", "/x/")])
    h = [(b"Content-Location", b"http://b/1"), (b"URI", b"http://b/2"),
         (b"destination", b"http://b/3"), (b"Link", b"http://b/4")]
    assert m.rewrite(h, BASE) == [(b"Content-Location", BASE + b"/x/1"), (b"URI", BASE + b"/x/2"),
                                  (b"destination", BASE + b"/x/3"), (b"Link", b"http://b/4")]
    assert not ReverseMap([]) and ReverseMap([]).rewrite(h, BASE) is h


# -- cookies ---------------------------------------------------------------------------

def test_cookie_rewrites_only_domain_and_path():
    m = ReverseMap([], cookie_domain=[("backend.local", "example.com")],
                   cookie_path=[("/internal/", "/public/")])
    value = b"a=b; Path=/internal/x; Domain=backend.local; HttpOnly"
    assert m.set_cookie(value) == b"a=b; Path=/public/; Domain=example.com; HttpOnly"


def test_cookie_name_value_and_spacing_untouched():
    m = ReverseMap([], cookie_domain=[("Backend.LOCAL", "example.com")],
                   cookie_path=[("/internal", "/")])
    value = b"path=/internal;pAtH = /internal/y ;DOMAIN=BACKEND.local.;Secure"
    assert m.set_cookie(value) == b"path=/internal;pAtH = / ;DOMAIN=example.com;Secure"


def test_cookie_path_case_sensitive_and_first_match():
    m = ReverseMap([], cookie_path=[("/app", "/one/"), ("/app/x", "/two/")])
    assert m.set_cookie(b"s=1; Path=/APP/x") == b"s=1; Path=/APP/x"
    assert m.set_cookie(b"s=1; Path=/app/x") == b"s=1; Path=/one/"


def test_cookie_no_match_or_no_map_unchanged():
    value = b"s=1; Path=/other; Domain=x.org"
    assert ReverseMap([("http://b/", "/")]).set_cookie(value) is value
    m = ReverseMap([], cookie_domain=[("backend", "e.com")], cookie_path=[("/in", "/")])
    assert m.set_cookie(value) is value


def test_rewrite_set_cookie_headers_separately():
    m = ReverseMap([], cookie_path=[("/in", "/out")])
    h = [(b"Set-Cookie", b"a=1; Path=/in"), (b"Set-Cookie", b"b=2; Path=/in/z")]
    assert m.rewrite(h, BASE) == [(b"Set-Cookie", b"a=1; Path=/out"),
                                  (b"Set-Cookie", b"b=2; Path=/out")]


# -- Max-Forwards ----------------------------------------------------------------------

def test_max_forwards_only_trace_and_options():
    h = [(b"Max-Forwards", b"3")]
    assert max_forwards(h, b"GET") is None
    assert max_forwards(h, b"TRACE") == 3
    assert max_forwards(h, b"OPTIONS") == 3
    assert max_forwards([], b"OPTIONS") is None
    assert max_forwards([(b"max-forwards", b" 0 ")], b"TRACE") == 0


@pytest.mark.parametrize("bad", [b"-1", b"+1", b"abc", b"", b"1.5", b"\xb2"])
def test_max_forwards_invalid(bad):
    with pytest.raises(ValueError):
        max_forwards([(b"Max-Forwards", bad)], b"TRACE")
    assert max_forwards([(b"Max-Forwards", bad)], b"GET") is None


def test_max_forwards_repeated_is_invalid():
    with pytest.raises(ValueError):
        max_forwards([(b"Max-Forwards", b"1"), (b"Max-Forwards", b"2")], b"OPTIONS")


def test_decrement_max_forwards():
    h = [(b"A", b"1"), (b"max-Forwards", b"10"), (b"B", b"2")]
    assert decrement_max_forwards(h) == [(b"A", b"1"), (b"max-Forwards", b"9"), (b"B", b"2")]


# -- Server ----------------------------------------------------------------------------

def test_server_header():
    assert server_header("prod") == b"twistproxy"
    assert server_header("off") is None
    full = server_header("full").decode()
    assert full.startswith(f"twistproxy/{__version__} Python/{platform.python_version()} Twisted/")
    with pytest.raises(ValueError):
        server_header("minimal")

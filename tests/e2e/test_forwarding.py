"""Forwarding end to end: routing, the forwarded request, the relayed response,
Max-Forwards and the access log, through a real proxy process and echo backends.

One proxy (module scope) carries a config with many vhosts and routes at once; each
test picks its vhost by Host and its route by path, and asserts on what the echo
backend reports it received (its JSON) or on what the client got back.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

from clients import Response, Session, ask, fetch, message
from harness import Lab, Proxy, read_head

ECHO_NAMES = ("main", "users", "payments", "iis", "oldie", "other")

OLD_IE = "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
          "(KHTML, like Gecko) Chrome/120.0 Safari/537.36")

# Placeholders (@NAME@) instead of an f-string: the TOML has braces and backslashes.
CONFIG = r"""
[server]
access_log = "-"
server_tokens = "prod"

[[listen]]
address = "127.0.0.1"
port = @PORT@

# ---- the first vhost: also the answer for unknown Host values -----------------------
[[vhost]]
server_name = "proxy.test"
server_alias = ["www.proxy.test"]
allow_encoded_slashes = "nodecode"   # the %2F tests below (the default answers 404)

  [[vhost.route]]
  path = "/first"
  url = "@main@/one"
  [[vhost.route]]
  path = "/first"
  url = "@other@/two"

  [[vhost.route]]
  path = "/excl/private"
  exclude = true
  [[vhost.route]]
  path = "/excl"
  url = "@main@/excl"

  [[vhost.route]]
  path = "/late"
  url = "@main@/late"
  [[vhost.route]]
  path = "/late/private"
  exclude = true

  [[vhost.route]]
  path = "/foo"
  url = "@main@/bar"
  [[vhost.route]]
  path = "/slash/"
  url = "@main@/s/"
  [[vhost.route]]
  path = "/mm1/"
  url = "@main@/bar"
  [[vhost.route]]
  path = "/mm2"
  url = "@main@/bar/"

  [[vhost.route]]
  regex = '^/re/(\w+)/(.*)$'
  url = "@main@/regex/$2/from/$1"
  [[vhost.route]]
  regex = '\.gif$'
  url = "@other@"

  [[vhost.route]]
  path = "/ie/"
  match_headers = { "User-Agent" = "(?i)msie" }
  url = "@oldie@/ie/"
  [[vhost.route]]
  path = "/ie/"
  url = "@main@/ie/"

  [[vhost.route]]
  path = "/admin"
  exclude = true
  [[vhost.route]]
  path = "/app/"
  url = "@main@/app-backend/"

  [[vhost.route]]
  path = "/rev/"
  url = "@main@/internal/"
  reverse = true
  cookie_domain = { "backend.local" = "www.example.com" }
  cookie_path = { "/internal/" = "/rev/" }

  [[vhost.route]]
  path = "/raw/"
  url = "@raw@/"

  [[vhost.route]]
  path = "/"
  url = "@main@/"

# ---- name-based choice -------------------------------------------------------------
[[vhost]]
server_name = "other.test"
server_alias = ["alias.other.test", "*.other.org"]
  [[vhost.route]]
  path = "/"
  url = "@other@/"

# ---- seed (a): IIS behind the proxy, /apache-apps kept off it -------------------------
[[vhost]]
server_name = "iis.test"
  [[vhost.route]]
  path = "/apache-apps"
  exclude = true
  [[vhost.route]]
  path = "/"
  url = "@iis@/"

# ---- seed (b): two API services and a front end -------------------------------------
[[vhost]]
server_name = "shop.test"
  [[vhost.route]]
  path = "/api/users/"
  url = "@users@/api/users/"
  [[vhost.route]]
  path = "/api/payments/"
  url = "@payments@/v2/"
  [[vhost.route]]
  path = "/"
  url = "@main@/"

# ---- forwarded-request settings --------------------------------------------------------
[[vhost]]
server_name = "preserve.test"
preserve_host = true
  [[vhost.route]]
  path = "/"
  url = "@main@/"

[[vhost]]
server_name = "noadd.test"
add_headers = false
  [[vhost.route]]
  path = "/"
  url = "@main@/"

[[vhost]]
server_name = "via-on.test"
proxy_via = "on"
  [[vhost.route]]
  path = "/"
  url = "@main@/"

[[vhost]]
server_name = "via-full.test"
proxy_via = "full"
  [[vhost.route]]
  path = "/"
  url = "@main@/"

[[vhost]]
server_name = "via-block.test"
proxy_via = "block"
  [[vhost.route]]
  path = "/"
  url = "@main@/"

[[vhost]]
server_name = "chain.test"
proxy_chain_auth = true
  [[vhost.route]]
  path = "/"
  url = "@main@/"

# ---- RequestHeader-style actions act on the client's request (Apache: fixups, before
# mod_proxy adds its X-Forwarded-* headers) -----------------------------------------
[[vhost]]
server_name = "strip.test"
request_headers = [
  { action = "unset", name = "X-Forwarded-For" },
  { action = "unset", name = "X-Forwarded-Host" },
]
  [[vhost.route]]
  path = "/"
  url = "@main@/"

# ---- header actions ----------------------------------------------------------------------
[[vhost]]
server_name = "hdrs.test"
request_headers = [
  { action = "set", name = "X-Req-Vhost", value = "v1" },
  { action = "unset", name = "X-Debug" },
]
response_headers = [
  { action = "set", name = "X-Frame-Options", value = "SAMEORIGIN", always = true },
  { action = "set", name = "X-Vhost", value = "hdrs" },
]
  [[vhost.route]]
  path = "/closed"
  exclude = true
  [[vhost.route]]
  path = "/dead/"
  url = "@dead@/"
  response_headers = [
    { action = "add", name = "X-Route-Always", value = "yes", always = true },
    { action = "set", name = "X-Route-Normal", value = "no" },
  ]
  [[vhost.route]]
  path = "/route/"
  url = "@main@/route/"
  request_headers = [
    { action = "add", name = "X-Add", value = "two" },
    { action = "set", name = "X-Req-Vhost", value = "v2" },
    { action = "set", name = "X-Route-Set", value = "r" },
  ]
  response_headers = [
    { action = "unset", name = "X-Powered-By" },
    { action = "set", name = "Cache-Control", value = "no-store" },
    { action = "add", name = "X-Added", value = "1" },
  ]
  [[vhost.route]]
  path = "/"
  url = "@main@/"
"""

QUIET_CONFIG = """
[server]
access_log = "-"
server_tokens = "off"

[[listen]]
address = "127.0.0.1"
port = @PORT@

[[vhost]]
server_name = "quiet.test"
response_headers = [
  { action = "set", name = "X-Frame-Options", value = "DENY", always = true },
]
  [[vhost.route]]
  path = "/gone"
  exclude = true
  [[vhost.route]]
  path = "/"
  url = "@main@/"
"""


def fill(template: str, **values) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", str(value))
    assert "@" not in template.replace("@PORT@", ""), "unfilled placeholder"
    return template


# ---------------------------------------------------------------------------------------
# scripted backends


def reason_backend(conn):
    """Answers every request with an unusual status and reason phrase."""
    read_head(conn)
    conn.sendall(b"HTTP/1.1 299 Quite Fine Thanks\r\nContent-Length: 4\r\n"
                 b"X-Raw: yes\r\nConnection: close\r\n\r\nraw!")


def dead_backend(conn):
    """Reads the request, then hangs up without a word (the proxy must answer 502)."""
    read_head(conn)


# ---------------------------------------------------------------------------------------
# fixtures


@dataclass
class Env:
    proxy: Proxy
    port: int
    echoes: dict


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Lab(tmp_path_factory.mktemp("forwarding")) as lab:
        echoes = dict(zip(ECHO_NAMES, lab.echos(*ECHO_NAMES)))
        reason, dead = lab.raw(reason_backend), lab.raw(dead_backend)
        proxy = lab.proxy(lambda ports: fill(CONFIG, PORT=ports[0], raw=reason.url,
                                             dead=dead.url,
                                             **{n: e.url for n, e in echoes.items()}))
        yield Env(proxy, proxy.port, echoes)


@pytest.fixture(scope="module")
def quiet(env, tmp_path_factory):
    """A second proxy with server_tokens = "off"."""
    with Lab(tmp_path_factory.mktemp("forwarding-quiet")) as lab:
        proxy = lab.proxy(lambda ports: fill(QUIET_CONFIG, PORT=ports[0],
                                             main=env.echoes["main"].url))
        yield Env(proxy, proxy.port, env.echoes)


# ---------------------------------------------------------------------------------------
# clients


def raw(port: int, lines: list[str], body: bytes = b"") -> Response:
    """Send a request head written line by line; read one response."""
    return ask(port, message(*lines, body=body), timeout=5)


def seen(echo: dict, name: str) -> list[str]:
    """Values of a header as the backend received it (case-insensitive name)."""
    return [v for n, v in echo["headers"] if n.lower() == name.lower()]


def seen_names(echo: dict) -> list[str]:
    return [n.lower() for n, _ in echo["headers"]]


def assert_proxy_404(r: Response):
    """The proxy's own 404 page, not a backend's."""
    assert r.status == 404, (r.status, r.body[:300])
    assert r.one("Content-Type") == "text/html; charset=utf-8"
    assert b"Not Found" in r.body
    assert b'"server"' not in r.body


def echo_of(env: Env, path: str, **kw) -> dict:
    r = fetch(env.port, path, **kw)
    assert r.status == 200, (r.status, r.body[:300])
    return r.echo


# =======================================================================================
# routing


def test_first_matching_route_wins(env):
    e = echo_of(env, "/first/x")
    assert (e["server"], e["target"]) == ("main", "/one/x")
    # prefix and regex routes share one order: "/first" comes before the .gif regex...
    e = echo_of(env, "/first/x.gif")
    assert (e["server"], e["target"]) == ("main", "/one/x.gif")
    # ...and the .gif regex before "/app/"
    e = echo_of(env, "/app/logo.gif")
    assert (e["server"], e["target"]) == ("other", "/app/logo.gif")


def test_exclusion_before_general_route_answers_404(env):
    assert_proxy_404(fetch(env.port, "/excl/private"))
    assert_proxy_404(fetch(env.port, "/excl/private/deeper?x=1"))
    # the exclusion is a prefix rule too: /excl/privatex is not under it
    e = echo_of(env, "/excl/privatex")
    assert e["target"] == "/excl/privatex"
    e = echo_of(env, "/excl/public")
    assert (e["server"], e["target"]) == ("main", "/excl/public")


def test_exclusion_after_general_route_is_never_reached(env):
    # first match wins: "/late" catches /late/private before its exclusion is tried
    e = echo_of(env, "/late/private")
    assert (e["server"], e["target"]) == ("main", "/late/private")


@pytest.mark.parametrize("path, target", [
    ("/foo", "/bar"),
    ("/foo/", "/bar/"),
    ("/foo/x/y", "/bar/x/y"),
    ("/foo?q=1", "/bar?q=1"),
    ("/foo/x?q=1", "/bar/x?q=1"),
    ("/foobar", "/foobar"),           # not under /foo: the catch-all "/" takes it
    ("/foo.txt", "/foo.txt"),
    ("/FOO/x", "/FOO/x"),             # prefixes are case-sensitive
    ("/slash", "/slash"),             # shorter than the rule "/slash/": no match
    ("/slash/a", "/s/a"),
    ("/mm1/x", "/barx"),              # mismatched slashes behave as in Apache
    ("/mm2/x", "/bar//x"),
])
def test_prefix_rules_and_target_building(env, path, target):
    e = echo_of(env, path)
    assert (e["server"], e["target"]) == ("main", target)


@pytest.mark.parametrize("query", [
    "a=1;b=2",
    "c=%2F&d=%25&e=a+b&f=&g=%7e",
    "path=/x/../y&q=%2e%2e",
    "x=1&x=2&&y",
    "",                                # a bare "?" is kept
    "k=%E2%82%AC;s=%3B",
])
def test_query_kept_byte_for_byte(env, query):
    e = echo_of(env, f"/foo/q?{query}")
    assert e["target"] == f"/bar/q?{query}"


def test_regex_route_substitutes_groups(env):
    e = echo_of(env, "/re/abc/d/e.html?z=9")
    assert (e["server"], e["target"]) == ("main", "/regex/d/e.html/from/abc?z=9")


def test_regex_route_keeps_encoded_slash_in_groups(env):
    e = echo_of(env, "/re/k/a%2Fb%25c")
    assert e["target"] == "/regex/a%2Fb%25c/from/k"


def test_regex_route_without_groups_appends_the_whole_path(env):
    e = echo_of(env, "/img/logo.gif?v=2")
    assert (e["server"], e["target"]) == ("other", "/img/logo.gif?v=2")


@pytest.mark.parametrize("ua, backend", [
    (OLD_IE, "oldie"),
    ("Mozilla/4.0 (compatible; msie 7.0)", "oldie"),
    (CHROME, "main"),
    (None, "main"),
])
def test_match_headers_sends_old_ie_elsewhere(env, ua, backend):
    headers = [("User-Agent", ua)] if ua else []
    e = echo_of(env, "/ie/page", headers=headers)
    assert (e["server"], e["target"]) == (backend, "/ie/page")


@pytest.mark.parametrize("path", [
    "/app/../admin",
    "/app/../admin/secret",
    "/app/%2e%2e/admin",
    "/app/%2E%2E/admin",
    "/app/.%2e/admin",
    "/app/./../admin",
    "/app/x/../../admin",
    "/app//../admin",
])
def test_dot_segments_cannot_leave_a_route(env, path):
    # normalised to /admin..., which is excluded: the /app/ route must never see it
    assert_proxy_404(fetch(env.port, path))


@pytest.mark.parametrize("path, server_target", [
    ("/app/../other", "/other"),                  # resolved first, then routed to "/"
    ("/app/./x", "/app-backend/x"),
    ("/app/sub/../x", "/app-backend/x"),
    ("/app/%2e/x", "/app-backend/x"),
])
def test_dot_segments_resolved_before_routing(env, path, server_target):
    e = echo_of(env, path)
    assert e["target"] == server_target


@pytest.mark.parametrize("path, target", [
    ("/app/a%2Fb", "/app-backend/a%2Fb"),
    ("/app/a%2F..%2F..%2Fadmin", "/app-backend/a%2F..%2F..%2Fadmin"),
    ("/app/..%2Fadmin", "/app-backend/..%2Fadmin"),
    ("/app/100%25", "/app-backend/100%25"),
    ("/app/%252e%252e/admin", "/app-backend/%252e%252e/admin"),
    ("/app/%25%32%46", "/app-backend/%252F"),     # digits decoded, %25 kept
])
def test_encoded_slash_and_percent_never_decoded(env, path, target):
    e = echo_of(env, path)
    assert e["target"] == target


@pytest.mark.parametrize("host, backend", [
    ("proxy.test", "main"),
    ("other.test", "other"),
    ("OTHER.Test", "other"),
    ("other.test:8080", "other"),
    ("Other.Test:1", "other"),
    ("other.test.", "other"),
    ("alias.other.test", "other"),
    ("x.other.org", "other"),
    ("A.B.Other.Org:81", "other"),
    ("other.org", "main"),            # "*.other.org" needs a subdomain
    ("evilother.org", "main"),
    ("nope.example", "main"),         # unknown: the first vhost
    ("127.0.0.1", "main"),
])
def test_vhost_chosen_by_host(env, host, backend):
    e = echo_of(env, "/vh", host=host)
    assert e["server"] == backend


def test_http10_without_host_goes_to_first_vhost(env):
    r = raw(env.port, ["GET /vh10 HTTP/1.0"])
    assert r.status == 200
    e = r.echo
    assert (e["server"], e["target"]) == ("main", "/vh10")


def test_seed_iis_behind_proxy_with_apache_apps_excluded(env):
    e = echo_of(env, "/default.aspx?id=3", host="iis.test")
    assert (e["server"], e["target"]) == ("iis", "/default.aspx?id=3")
    e = echo_of(env, "/apache-appsx", host="iis.test")
    assert e["server"] == "iis"
    for path in ("/apache-apps", "/apache-apps/", "/apache-apps/wiki/index.php?x=1"):
        r = fetch(env.port, path, host="iis.test")
        assert_proxy_404(r)
        assert r.one("Server") == "twistproxy"


@pytest.mark.parametrize("path, backend, target", [
    ("/api/users/42?expand=1", "users", "/api/users/42?expand=1"),
    ("/api/users/", "users", "/api/users/"),
    ("/api/payments/charge", "payments", "/v2/charge"),
    ("/api/payments/", "payments", "/v2/"),
    ("/api/users", "main", "/api/users"),        # no trailing slash: not the users rule
    ("/api/paymentsx/1", "main", "/api/paymentsx/1"),
    ("/", "main", "/"),
    ("/static/app.js", "main", "/static/app.js"),
])
def test_seed_two_services_and_a_front_end(env, path, backend, target):
    e = echo_of(env, path, host="shop.test")
    assert (e["server"], e["target"]) == (backend, target)


# =======================================================================================
# the forwarded request


def test_host_is_the_backends_unless_preserved(env):
    main_port = env.echoes["main"].port
    e = echo_of(env, "/h", host=f"proxy.test:{env.port}")
    assert seen(e, "Host") == [f"127.0.0.1:{main_port}"]
    assert e["headers"][0][0] == "Host"
    e = echo_of(env, "/h", host=f"Preserve.Test:{env.port}")
    assert seen(e, "Host") == [f"Preserve.Test:{env.port}"]


def test_x_forwarded_headers(env):
    e = echo_of(env, "/xf", host=f"proxy.test:{env.port}")
    assert seen(e, "X-Forwarded-For") == ["127.0.0.1"]
    assert seen(e, "X-Forwarded-Host") == [f"proxy.test:{env.port}"]
    assert seen(e, "X-Forwarded-Server") == ["proxy.test"]
    # appended to what an earlier proxy said
    e = echo_of(env, "/xf", host="www.proxy.test", headers=[
        ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"), ("X-Forwarded-Host", "shop.example")])
    assert seen(e, "X-Forwarded-For") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    assert seen(e, "X-Forwarded-Host") == ["shop.example, www.proxy.test"]
    assert seen(e, "X-Forwarded-Server") == ["proxy.test"]      # the ServerName, not the alias


def test_x_forwarded_for_repeated_fields_merged(env):
    e = echo_of(env, "/xf", headers=[("X-Forwarded-For", "192.0.2.1"), ("X-Other", "o"),
                                     ("X-Forwarded-For", "192.0.2.2")])
    assert seen(e, "X-Forwarded-For") == ["192.0.2.1, 192.0.2.2, 127.0.0.1"]
    assert seen(e, "X-Other") == ["o"]


def test_add_headers_false_adds_nothing(env):
    e = echo_of(env, "/noadd", host="noadd.test")
    names = seen_names(e)
    for name in ("x-forwarded-for", "x-forwarded-host", "x-forwarded-server"):
        assert name not in names
    # what the client sent passes through untouched
    e = echo_of(env, "/noadd", host="noadd.test",
                headers=[("X-Forwarded-For", "198.51.100.1")])
    assert seen(e, "X-Forwarded-For") == ["198.51.100.1"]


def test_proxy_via_on(env):
    r = fetch(env.port, "/via", host="via-on.test", headers=[("Via", "1.0 fred")])
    e = r.echo
    assert len(seen(e, "Via")) == 1
    assert re.fullmatch(r"1\.0 fred, 1\.1 via-on\.test(:\d+)?", seen(e, "Via")[0])
    assert re.fullmatch(r"1\.1 via-on\.test(:\d+)?", r.one("Via") or "")
    # a backend's Via is kept, ours appended
    r = fetch(env.port, "/via", host="via-on.test",
              headers=[("X-Echo-Header", "Via: 1.1 upstream-cache")])
    assert re.fullmatch(r"1\.1 upstream-cache, 1\.1 via-on\.test(:\d+)?", r.one("Via") or "")
    # the client's HTTP version names the request hop
    r = raw(env.port, ["GET /via10 HTTP/1.0", "Host: via-on.test"])
    assert re.fullmatch(r"1\.0 via-on\.test(:\d+)?", seen(r.echo, "Via")[0])


def test_proxy_via_full(env):
    r = fetch(env.port, "/via", host="via-full.test", headers=[("Via", "1.0 fred")])
    via = seen(r.echo, "Via")
    assert len(via) == 1
    assert re.fullmatch(r"1\.0 fred, 1\.1 via-full\.test(:\d+)? \(.+\)", via[0])
    assert re.fullmatch(r"1\.1 via-full\.test(:\d+)? \(.+\)", r.one("Via") or "")


def test_proxy_via_block(env):
    r = fetch(env.port, "/via", host="via-block.test",
              headers=[("Via", "1.0 fred"), ("via", "1.1 barney")])
    assert "via" not in seen_names(r.echo)
    assert r.all("Via") == []


def test_proxy_via_off_leaves_via_alone(env):
    r = fetch(env.port, "/via", headers=[("Via", "1.0 fred")])
    assert seen(r.echo, "Via") == ["1.0 fred"]
    assert r.all("Via") == []


def test_hop_by_hop_headers_removed(env):
    r = raw(env.port, [
        "GET /hop HTTP/1.1",
        "Host: proxy.test",
        "Connection: keep-alive, X-Drop-Me, x-also-drop",
        "X-Drop-Me: 1",
        "X-Also-Drop: 2",
        "Keep-Alive: timeout=5, max=100",
        "Proxy-Connection: keep-alive",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "TE: trailers, deflate;q=0.5",
        "Trailer: X-Checksum",
        "Upgrade: websocket",
        "X-Keep: yes",
        "Connection: close",
    ])
    assert r.status == 200
    e = r.echo
    names = seen_names(e)
    for gone in ("connection", "x-drop-me", "x-also-drop", "keep-alive", "proxy-connection",
                 "proxy-authorization", "trailer", "upgrade"):
        assert gone not in names, (gone, e["headers"])
    assert "te" not in names          # hop-by-hop, "trailers" too (as Apache)
    assert seen(e, "X-Keep") == ["yes"]


def test_proxy_authorization_passed_on_only_with_chain_auth(env):
    auth = [("Proxy-Authorization", "Basic dXNlcjpwYXNz")]
    assert "proxy-authorization" not in seen_names(echo_of(env, "/pa", headers=auth))
    e = echo_of(env, "/pa", host="chain.test", headers=auth)
    assert seen(e, "Proxy-Authorization") == ["Basic dXNlcjpwYXNz"]


def test_te_trailers_dropped_when_connection_lists_te(env):
    # RFC 9110 10.1.4: a sender of TE also lists it in Connection (gRPC clients do)
    r = raw(env.port, ["POST /te HTTP/1.1", "Host: proxy.test", "Connection: TE",
                       "TE: trailers", "Content-Length: 2"], b"hi")
    e = r.echo
    assert "te" not in seen_names(e)
    assert "connection" not in seen_names(e)
    assert e["body_length"] == 2


def test_te_without_trailers_removed(env):
    e = echo_of(env, "/te", headers=[("TE", "gzip, deflate")])
    assert "te" not in seen_names(e)


def test_h2c_upgrade_request_forwarded_without_upgrade_headers(env):
    # what `curl --http2 http://...` sends: a plain HTTP/1.1 answer is the right reply
    r = raw(env.port, [
        "GET /h2c HTTP/1.1",
        "Host: proxy.test",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
        "X-After: 1",
    ])
    assert r.status == 200
    e = r.echo
    assert e["target"] == "/h2c"
    names = seen_names(e)
    for gone in ("connection", "upgrade", "http2-settings"):
        assert gone not in names, (gone, e["headers"])
    assert seen(e, "X-After") == ["1"]


def test_repeated_headers_order_and_name_case_kept(env):
    sent = [
        ("X-Multi", "a"),
        ("x-lower", "b"),
        ("X-Multi", "c"),
        ("X-MiXeD-CaSe", "d"),
        ("Accept", "*/*"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("ACCEPT-LANGUAGE", "fr, en;q=0.5"),
    ]
    r = raw(env.port, ["GET /order HTTP/1.1", "Host: proxy.test",
                       *(f"{n}: {v}" for n, v in sent), "Connection: close"])
    added = {"host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-server",
             "x-forwarded-proto", "x-forwarded-port"}
    got = [(n, v) for n, v in r.echo["headers"] if n.lower() not in added]
    assert got == sent


def test_header_values_forwarded_byte_for_byte(env):
    r = raw(env.port, ["GET /bytes HTTP/1.1", "Host: proxy.test",
                       "X-Latin: caf\xe9 cr\xe8me", "X-Spaces: a  b\tc",
                       "X-Quote: \"q\", 'p'", "Connection: close"])
    e = r.echo
    assert seen(e, "X-Latin") == ["caf\xe9 cr\xe8me"]
    assert seen(e, "X-Spaces") == ["a  b\tc"]
    assert seen(e, "X-Quote") == ["\"q\", 'p'"]


def test_request_body_forwarded(env):
    body = bytes(range(256)) * 40
    r = fetch(env.port, "/post", method="POST", body=body,
              headers=[("Content-Type", "application/octet-stream")])
    e = r.echo
    assert (e["method"], e["body_length"]) == ("POST", len(body))
    assert seen(e, "Content-Length") == [str(len(body))]
    assert e["body_sha256"] == hashlib.sha256(body).hexdigest()


# =======================================================================================
# the response


def test_backend_status_and_reason_relayed(env):
    r = raw(env.port, ["GET /missing HTTP/1.1", "Host: proxy.test",
                       "X-Echo-Status: 404", "Connection: close"])
    assert (r.version, r.status, r.reason) == ("HTTP/1.1", 404, "Not Found")
    assert r.echo["target"] == "/missing"         # the backend's body, not our error page
    r = raw(env.port, ["GET /raw/x HTTP/1.1", "Host: proxy.test", "Connection: close"])
    assert (r.version, r.status, r.reason) == ("HTTP/1.1", 299, "Quite Fine Thanks")
    assert r.one("X-Raw") == "yes"
    assert r.body == b"raw!"


def test_response_hop_by_hop_headers_removed(env):
    r = fetch(env.port, "/resp-hop", headers=[
        ("X-Echo-Header", "Connection: X-Secret"),
        ("X-Echo-Header", "X-Secret: internal"),
        ("X-Echo-Header", "Keep-Alive: timeout=5"),
        ("X-Echo-Header", "Proxy-Connection: keep-alive"),
        ("X-Echo-Header", "Upgrade: h2c"),
        ("X-Echo-Header", "Trailer: X-Checksum"),
        ("X-Echo-Header", "X-Stays: 1"),
    ])
    assert r.status == 200
    for gone in ("X-Secret", "Keep-Alive", "Proxy-Connection", "Upgrade", "Trailer"):
        assert r.all(gone) == [], (gone, r.headers)
    assert r.all("Connection") == []
    assert r.all("X-Stays") == ["1"]


def test_response_header_order_and_case_kept(env):
    sent = [("X-B", "2"), ("x-a", "1"), ("X-B", "3"), ("Link", "</a.css>; rel=preload"),
            ("Link", "</b.js>; rel=preload")]
    r = raw(env.port, ["GET /resp-order HTTP/1.1", "Host: proxy.test", "Connection: close",
                       *(f"X-Echo-Header: {n}: {v}" for n, v in sent)])
    names = {n.lower() for n, _ in sent}
    assert [h for h in r.headers if h[0].lower() in names] == sent


def test_repeated_set_cookie_kept_separate(env):
    cookies = ["a=1; Path=/", "b=2, with comma; Path=/x", "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]
    lines = ["GET /cookies HTTP/1.1", "Host: proxy.test", "Connection: close"]
    lines += [f"X-Echo-Header: Set-Cookie: {c}" for c in cookies]
    r = raw(env.port, lines)
    assert r.all("Set-Cookie") == cookies
    r = fetch(env.port, "/cookies", headers=[("X-Echo-Header", f"Set-Cookie: {c}")
                                             for c in cookies])
    assert r.all("Set-Cookie") == cookies


def test_reverse_rewrites_location_and_content_location(env):
    backend = env.echoes["main"].url
    public = f"http://proxy.test:{env.port}"
    r = fetch(env.port, "/rev/old", host=f"proxy.test:{env.port}", headers=[
        ("X-Echo-Status", "302"),
        ("X-Echo-Header", f"Location: {backend}/internal/new/place?a=1&b=%2F"),
        ("X-Echo-Header", f"Content-Location: {backend}/internal/doc.json"),
    ])
    assert r.status == 302
    assert r.echo["target"] == "/internal/old"
    assert r.all("Location") == [f"{public}/rev/new/place?a=1&b=%2F"]
    assert r.all("Content-Location") == [f"{public}/rev/doc.json"]
    # URI too, and the backend URL is compared case-insensitively
    r = fetch(env.port, "/rev/old", host=f"proxy.test:{env.port}", headers=[
        ("X-Echo-Status", "303"),
        ("X-Echo-Header", f"Location: {backend.upper()}/INTERNAL/Up"),
        ("X-Echo-Header", f"URI: {backend}/internal/u"),
    ])
    assert r.all("Location") == [f"{public}/rev/Up"]
    assert r.all("URI") == [f"{public}/rev/u"]


def test_reverse_location_for_http10_client_without_host(env):
    backend = env.echoes["main"].url
    r = raw(env.port, ["GET /rev/a HTTP/1.0", "X-Echo-Status: 302",
                       f"X-Echo-Header: Location: {backend}/internal/b"])
    assert r.status == 302
    assert r.all("Location") == ["http://proxy.test/rev/b"]


@pytest.mark.parametrize("host", ["proxy.test@evil.example", "evil.example/proxy.test"])
def test_reverse_never_builds_a_location_from_an_invalid_host(env, host):
    # RFC 9112 3.2: a Host with an invalid value is a 400; it must not become the
    # authority of a rewritten Location (an open redirect to evil.example)
    backend = env.echoes["main"].url
    r = fetch(env.port, "/rev/a", host=host, headers=[
        ("X-Echo-Status", "302"), ("X-Echo-Header", f"Location: {backend}/internal/b")])
    assert r.status == 400, (r.status, r.all("Location"))
    assert r.all("Location") == []


def test_reverse_leaves_foreign_locations_alone(env):
    r = fetch(env.port, "/rev/x", headers=[
        ("X-Echo-Status", "301"),
        ("X-Echo-Header", "Location: http://elsewhere.example/internal/x"),
    ])
    assert r.all("Location") == ["http://elsewhere.example/internal/x"]


def test_reverse_location_through_curl(env):
    backend = env.echoes["main"].url
    out = subprocess.run(
        ["curl", "-si", "--max-time", "5", "-H", "Host: proxy.test",
         "-H", "X-Echo-Status: 301",
         "-H", f"X-Echo-Header: Location: {backend}/internal/next?q=1",
         "-H", f"X-Echo-Header: Content-Location: {backend}/internal/next.html",
         f"http://127.0.0.1:{env.port}/rev/prev"],
        capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    head = out.stdout.partition(b"\r\n\r\n")[0].decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.1 301 Moved Permanently"
    locations = [l.split(":", 1)[1].strip() for l in lines[1:]
                 if l.lower().startswith("location:")]
    assert locations == ["http://proxy.test/rev/next?q=1"]
    content_locations = [l.split(":", 1)[1].strip() for l in lines[1:]
                         if l.lower().startswith("content-location:")]
    assert content_locations == ["http://proxy.test/rev/next.html"]


def test_cookie_domain_and_path_rewritten_and_nothing_else(env):
    cookies = [
        # name=value and other attributes mention the internal names: left alone
        ("sid=backend.local/internal/; Domain=backend.local; Path=/internal/; HttpOnly; "
         "Comment=/internal/ on backend.local",
         "sid=backend.local/internal/; Domain=www.example.com; Path=/rev/; HttpOnly; "
         "Comment=/internal/ on backend.local"),
        # prefix matches: the whole value is replaced; domain case-insensitive
        ("b=2; path=/internal/deep/er; DOMAIN=Backend.Local.Example",
         "b=2; path=/rev/; DOMAIN=www.example.com"),
        # no match: untouched
        ("c=3; Domain=other.example; Path=/public/", "c=3; Domain=other.example; Path=/public/"),
        ("d=4; Path=/Internal/", "d=4; Path=/Internal/"),      # path is case-sensitive
    ]
    r = fetch(env.port, "/rev/login", headers=[
        ("X-Echo-Header", f"Set-Cookie: {c}") for c, _ in cookies])
    assert r.all("Set-Cookie") == [want for _, want in cookies]


def test_backend_server_header_passes_through(env):
    r = fetch(env.port, "/srv", headers=[("X-Echo-Header", "Server: Microsoft-IIS/10.0")])
    assert r.all("Server") == ["Microsoft-IIS/10.0"]


def test_proxy_names_itself_when_the_backend_does_not(env):
    r = fetch(env.port, "/srv")
    assert r.echo["target"] == "/srv"
    assert r.all("Server") == ["twistproxy"]


def test_own_404_says_server_twistproxy(env):
    r = fetch(env.port, "/admin")
    assert_proxy_404(r)
    assert r.all("Server") == ["twistproxy"]


def test_server_tokens_off(quiet):
    r = fetch(quiet.port, "/gone", host="quiet.test")
    assert_proxy_404(r)
    assert r.all("Server") == []
    assert r.all("X-Frame-Options") == ["DENY"]
    r = fetch(quiet.port, "/x", host="quiet.test")
    assert r.echo["target"] == "/x"
    assert r.all("Server") == []
    r = fetch(quiet.port, "/x", host="quiet.test",
              headers=[("X-Echo-Header", "Server: Apache-Coyote/1.1")])
    assert r.all("Server") == ["Apache-Coyote/1.1"]


def test_request_header_actions_vhost_then_route(env):
    e = echo_of(env, "/route/a", host="hdrs.test",
                headers=[("X-Debug", "1"), ("X-Add", "one"), ("X-Req-Vhost", "client")])
    assert e["target"] == "/route/a"
    assert "x-debug" not in seen_names(e)
    assert seen(e, "X-Add") == ["one", "two"]
    assert seen(e, "X-Req-Vhost") == ["v2"]           # route's set runs after the vhost's
    assert seen(e, "X-Route-Set") == ["r"]
    # another route of the vhost: only the vhost's actions
    e = echo_of(env, "/plain", host="hdrs.test",
                headers=[("X-Debug", "1"), ("X-Req-Vhost", "client")])
    assert "x-debug" not in seen_names(e)
    assert seen(e, "X-Req-Vhost") == ["v1"]
    assert "x-route-set" not in seen_names(e)


def test_request_header_unset_strips_spoofed_forwarded_for_only(env):
    # The Apache idiom `RequestHeader unset X-Forwarded-For` drops what the client
    # claimed; mod_proxy then adds the real client address (ProxyAddHeaders On).
    e = echo_of(env, "/strip", host="strip.test",
                headers=[("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "evil.example")])
    assert seen(e, "X-Forwarded-For") == ["127.0.0.1"]
    assert seen(e, "X-Forwarded-Host") == ["strip.test"]
    assert seen(e, "X-Forwarded-Server") == ["strip.test"]


def test_response_header_actions_vhost_and_route(env):
    r = fetch(env.port, "/route/b", host="hdrs.test", headers=[
        ("X-Echo-Header", "X-Powered-By: ASP.NET"),
        ("X-Echo-Header", "Cache-Control: public, max-age=600"),
        ("X-Echo-Header", "X-Frame-Options: ALLOWALL"),
        ("X-Echo-Header", "X-Added: 0"),
    ])
    assert r.status == 200
    assert r.all("X-Powered-By") == []
    assert r.all("Cache-Control") == ["no-store"]
    assert r.all("X-Frame-Options") == ["SAMEORIGIN"]
    assert r.all("X-Vhost") == ["hdrs"]
    assert r.all("X-Added") == ["0", "1"]
    # a backend's own error response is still a proxied response: all actions apply
    r = fetch(env.port, "/route/c", host="hdrs.test", headers=[
        ("X-Echo-Status", "500"), ("X-Echo-Header", "X-Powered-By: ASP.NET")])
    assert r.status == 500
    assert r.echo["target"] == "/route/c"
    assert r.all("X-Vhost") == ["hdrs"]
    assert r.all("X-Added") == ["1"]
    assert r.all("X-Powered-By") == []
    # not on another vhost
    r = fetch(env.port, "/plain", headers=[("X-Echo-Header", "X-Powered-By: ASP.NET")])
    assert r.all("X-Powered-By") == ["ASP.NET"]
    assert r.all("X-Frame-Options") == []


def test_always_header_actions_on_own_404(env):
    for path in ("/closed", "/closed/x"):
        r = fetch(env.port, path, host="hdrs.test")
        assert_proxy_404(r)
        assert r.all("X-Frame-Options") == ["SAMEORIGIN"]
        assert r.all("X-Vhost") == []                      # not `always`


def test_always_header_actions_on_502(env):
    r = fetch(env.port, "/dead/x", host="hdrs.test")
    assert r.status == 502
    assert r.one("Content-Type") == "text/html; charset=utf-8"
    assert r.all("X-Frame-Options") == ["SAMEORIGIN"]
    assert r.all("X-Route-Always") == ["yes"]
    assert r.all("X-Vhost") == []
    assert r.all("X-Route-Normal") == []
    assert r.all("Server") == ["twistproxy"]


# =======================================================================================
# Max-Forwards


def test_options_max_forwards_zero_answered_by_proxy(env):
    r = fetch(env.port, "/mf", method="OPTIONS", headers=[("Max-Forwards", "0")])
    assert r.status == 200
    assert r.one("Allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
    assert r.all("Content-Type") != ["application/json"]
    assert r.body == b""


def test_trace_max_forwards_zero_answered_by_proxy(env):
    r = fetch(env.port, "/mf?x=1", method="TRACE",
              headers=[("Max-Forwards", "0"), ("X-Probe", "p")])
    assert r.status == 200
    assert r.one("Content-Type") == "message/http"
    assert r.body.startswith(b"TRACE /mf?x=1 HTTP/1.1\r\n")
    assert b"X-Probe: p\r\n" in r.body


@pytest.mark.parametrize("method, value, expected", [
    ("OPTIONS", "5", "4"),
    ("OPTIONS", "1", "0"),
    ("TRACE", "10", "9"),
])
def test_max_forwards_decremented(env, method, value, expected):
    e = echo_of(env, "/mf", method=method, headers=[("Max-Forwards", value)])
    assert e["method"] == method
    assert seen(e, "Max-Forwards") == [expected]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "2, 3", "0x10"])
def test_max_forwards_not_a_number_is_400(env, value):
    r = fetch(env.port, "/mf", method="OPTIONS", headers=[("Max-Forwards", value)])
    assert r.status == 400
    assert b'"server"' not in r.body


# =======================================================================================
# access log

LOG_LINE = re.compile(
    r'^(?P<ip>\S+) - (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} '
    r'[+-]\d{4})\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<ua>(?:[^"\\]|\\.)*)" (?P<micros>\d+) '
    r'(?P<backend>\S+)$')


def log_lines(env: Env, marker: str, count: int = 1) -> list[re.Match]:
    lines = env.proxy.wait_for_access_lines(count, marker, timeout=5)
    matches = [LOG_LINE.match(l) for l in lines]
    assert all(matches), lines
    return matches


def test_access_log_lines(env):
    tag = uuid.uuid4().hex
    ok = fetch(env.port, f"/log/{tag}?q=1", headers=[
        ("Referer", "http://ref.example/page"), ("User-Agent", 'Test "Agent"/1.0')])
    missing = fetch(env.port, f"/admin/{tag}", headers=[("User-Agent", "curl/8")])
    slow = fetch(env.port, f"/slow/{tag}", headers=[("X-Echo-Delay", "0.3")])
    teapot = fetch(env.port, f"/iis/{tag}", host="iis.test",
                   headers=[("X-Echo-Status", "418")])
    head = fetch(env.port, f"/head/{tag}", method="HEAD")
    big = fetch(env.port, f"/big/{tag}", headers=[("X-Echo-Bytes", "70000"),
                                                  ("X-Echo-Chunked", "1")])
    bad = fetch(env.port, f"/bad/{tag}", method="OPTIONS", headers=[("Max-Forwards", "x")])

    (m,) = log_lines(env, f"/log/{tag}")
    assert m["ip"] == "127.0.0.1"
    assert m["request"] == f"GET /log/{tag}?q=1 HTTP/1.1"
    assert m["status"] == "200"
    assert int(m["bytes"]) == len(ok.body)
    assert m["referer"] == "http://ref.example/page"
    assert m["ua"] == r'Test \"Agent\"/1.0'
    assert m["backend"] == env.echoes["main"].url

    (m,) = log_lines(env, f"/admin/{tag}")
    assert (m["status"], m["referer"], m["ua"], m["backend"]) == ("404", "-", "curl/8", "-")
    assert int(m["bytes"]) == len(missing.body)

    (m,) = log_lines(env, f"/slow/{tag}")
    assert m["status"] == "200" and slow.status == 200
    assert int(m["micros"]) >= 300_000          # covers the backend's 0.3 s
    assert (m["referer"], m["ua"]) == ("-", "-")

    (m,) = log_lines(env, f"/iis/{tag}")
    assert m["status"] == "418" and teapot.status == 418
    assert m["backend"] == env.echoes["iis"].url

    (m,) = log_lines(env, f"/head/{tag}")
    assert (m["request"], m["status"], m["bytes"]) == (f"HEAD /head/{tag} HTTP/1.1", "200", "-")
    assert head.body == b""

    (m,) = log_lines(env, f"/big/{tag}")
    assert len(big.body) == 70000
    assert (m["status"], m["bytes"]) == ("200", "70000")     # body bytes, not framing

    (m,) = log_lines(env, f"/bad/{tag}")
    assert (m["status"], m["backend"]) == ("400", "-")
    assert int(m["bytes"]) == len(bad.body)


def test_access_log_one_line_per_request_on_keep_alive(env):
    tag = uuid.uuid4().hex
    with Session(env.port) as c:
        for i in range(3):
            assert c.get(f"/ka/{tag}/{i}").status == 200
        assert c.get(f"/admin/{tag}").status == 404
    matches = log_lines(env, tag, count=4)
    time.sleep(1.2)                  # one more flush: nothing else may appear
    matches = log_lines(env, tag, count=4)
    assert [m["request"] for m in matches] == \
        [f"GET /ka/{tag}/{i} HTTP/1.1" for i in range(3)] + [f"GET /admin/{tag} HTTP/1.1"]
    assert [m["status"] for m in matches] == ["200", "200", "200", "404"]

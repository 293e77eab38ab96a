"""Errors end to end: backend failures, strict client parsing, limits, timeouts,
pipelining, HTTP/1.0, CONNECT and absolute-form, shutdown.

Real processes on loopback: the proxy and echo backends are subprocesses, misbehaving
backends are scripted sockets (RawBackend), clients are raw sockets, http.client and
curl. Every failure is checked twice: what the client gets, and the proxy's log line
naming the route, the backend and the cause.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from clients import HTTPClient, Response, exchange, fetch
from harness import Echo, Proxy, RawBackend, basic_config, free_port, read_head, wait_until

HOST = b"proxy.test"


# ---------------------------------------------------------------------------
# client-side helpers


def one(port: int, data: bytes) -> Response:
    """Send one raw request (it should say Connection: close or be an error)."""
    with HTTPClient(port) as c:
        c.send(data)
        return c.response()


def assert_error_page(status: int, r: Response, body: bytes, secrets=()) -> None:
    """The proxy's own error page: small HTML that names the status and nothing else."""
    ctype = r.header("content-type")
    assert ctype is not None and ctype.startswith("text/html"), ctype
    assert len(body) < 1024, body
    text = body.decode("utf-8")
    assert text.lstrip().lower().startswith("<!doctype html"), text
    assert str(status) in text, text
    lowered = text.lower()
    for leak in ("127.0.0.1", "localhost", "http://", "traceback", "exception", "error(",
                 "refused", "llhttp", "httptools", "twisted", "invalid response:",
                 "connection closed", "no answer within", "content-length",
                 "transfer-encoding", ".py", "vhost[", "route["):
        assert leak not in lowered, (leak, text)
    for secret in secrets:
        assert str(secret) not in text, (secret, text)


def req(path: str, *extra: str, version: str = "1.1", method: str = "GET",
        host: bytes | None = HOST, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/{version}".encode()]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [e.encode("latin-1") for e in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------
# misbehaving backends


def _drain(conn: socket.socket, seconds: float = 20.0) -> None:
    """Wait until the proxy closes its side (or a long while)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def _answer_with(payload: bytes):
    def handler(conn):
        read_head(conn)
        conn.sendall(payload)
        _drain(conn)
    return handler


def _silent(conn):
    read_head(conn)
    _drain(conn)


def _hang_up(conn):
    read_head(conn)          # the request arrives; then close without a byte


def _bystander(conn):        # must never be contacted
    _drain(conn, 1.0)


MARK_HEADER = b"X-Backend-Marker: leaked-header\r\n"
MARK_BODY = b"leaked-body"

BOGUS = {
    # name: (route path, response bytes, words one of which the log line's cause names)
    "garbage-status-line": (
        "/garbage/",
        b"THIS IS NOT HTTP\r\n" + MARK_HEADER + b"Content-Length: 11\r\n\r\n" + MARK_BODY,
        ("invalid",)),
    "cl-and-te": (
        "/clte/",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nTransfer-Encoding: chunked\r\n" + MARK_HEADER
        + b"\r\nb\r\n" + MARK_BODY + b"\r\n0\r\n\r\n",
        ("content-length", "transfer-encoding")),
    "two-content-lengths": (
        "/twocl/",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 5\r\n" + MARK_HEADER
        + b"\r\n" + MARK_BODY,
        ("content-length",)),
    "identical-content-lengths": (          # README: rejected rather than collapsed
        "/samecl/",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 11\r\n" + MARK_HEADER
        + b"\r\n" + MARK_BODY,
        ("content-length",)),
    "non-numeric-content-length": (
        "/badcl/",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n" + MARK_HEADER + b"\r\n" + MARK_BODY,
        ("content-length", "invalid character")),
    "unrequested-101": (
        "/up101/",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + MARK_HEADER + b"\r\n" + MARK_BODY,
        ("101", "upgrade")),
}


# ---------------------------------------------------------------------------
# the shared proxies


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    e = Env()
    e.echo = Echo("main")
    e.echo2 = Echo("other")
    e.silent = RawBackend(_silent)
    e.hangup = RawBackend(_hang_up)
    e.bystander = RawBackend(_bystander)
    e.bogus = {name: RawBackend(_answer_with(payload)) for name, (_, payload, _) in BOGUS.items()}
    e.dead_port = free_port()
    # route index -> (path, backend url); the log names routes by their index
    routes = [("/dead/", f"http://127.0.0.1:{e.dead_port}", ""),
              ("/slow/", e.silent.url, "timeout = 1"),
              ("/hangup/", e.hangup.url, "")]
    routes += [(path, e.bogus[name].url, "") for name, (path, _, _) in BOGUS.items()]
    routes.append(("/", e.echo.url, ""))
    e.where = {path: f"vhost[0].route[{i}]" for i, (path, _, _) in enumerate(routes)}
    text = "".join(f'\n[[vhost.route]]\npath = "{p}"\nurl = "{u}/"\n{x}\n'
                   for p, u, x in routes)
    extra = f"""
[[vhost]]
server_name = "other.test"
preserve_host = true

[[vhost.route]]
path = "/"
url = "{e.echo2.url}/"
"""
    server = "header_timeout = 1\nkeepalive_timeout = 1\n"
    e.proxy = Proxy(lambda ports: basic_config(text, ports[0], extra=extra, server=server), tmp)
    e.port = e.proxy.port
    small = """
limit_request_line = 100
limit_request_fieldsize = 100
limit_request_fields = 5
"""
    e.small = Proxy(lambda ports: basic_config(
        f'[[vhost.route]]\npath = "/"\nurl = "{e.echo.url}/"\n', ports[0], server=small),
        tmp, name="small.toml")
    e.small_port = e.small.port
    yield e
    e.proxy.stop()
    e.small.stop()
    for b in [e.silent, e.hangup, e.bystander, *e.bogus.values()]:
        b.stop()
    e.echo.stop()
    e.echo2.stop()


def backend_line(env, path: str, backend_port: int, status: int) -> str:
    return env.proxy.wait_for_line(f"{env.where[path]}: backend http://127.0.0.1:{backend_port}:",
                    f"-> {status}")


# ---------------------------------------------------------------------------
# backend failures


def test_backend_refuses_503(env):
    r = fetch(env.port, "/dead/thing")
    assert r.status == 503, r
    assert_error_page(503, r, r.body, secrets=(env.dead_port,))
    line = backend_line(env, "/dead/", env.dead_port, 503)
    assert "refused" in line


def test_connection_goes_on_after_503(env):
    """A 503 is a complete response: the next request on the same keep-alive
    connection is read and answered."""
    with HTTPClient(env.port) as c:
        c.send(req("/dead/first"))
        r = c.response()
        assert r.status == 503, r
        c.send(req("/after-503"))
        try:
            r = c.response()
        except (EOFError, socket.timeout) as e:
            raise AssertionError(f"the request after a 503 was never answered: {e!r}")
        assert r.status == 200 and r.json()["target"] == "/after-503"


def test_connection_goes_on_after_502(env):
    with HTTPClient(env.port) as c:
        c.send(req("/hangup/first"))
        r = c.response()
        assert r.status == 502, r
        c.send(req("/after-502"))
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/after-502"


def test_head_503_has_no_body(env):
    with HTTPClient(env.port) as c:
        c.send(req("/dead/head", "Connection: close", method="HEAD"))
        r = c.response("HEAD")
        assert r.status == 503, r
        closed, extra = c.wait_close()
        assert closed and extra == b"", extra


def test_backend_silent_504(env):
    t0 = time.monotonic()
    r = fetch(env.port, "/slow/thing")
    assert r.status == 504, r
    assert time.monotonic() - t0 < 10
    assert_error_page(504, r, r.body, secrets=(env.silent.port,))
    line = backend_line(env, "/slow/", env.silent.port, 504)
    assert any(w in line.lower() for w in ("timed out", "timeout", "no answer")), line


def test_backend_closes_without_response_502(env):
    r = fetch(env.port, "/hangup/thing")
    assert r.status == 502, r
    assert_error_page(502, r, r.body, secrets=(env.hangup.port,))
    line = backend_line(env, "/hangup/", env.hangup.port, 502)
    assert "closed" in line and "without" in line, line


@pytest.mark.parametrize("name", list(BOGUS))
def test_invalid_backend_response_502(env, name):
    path, _, causes = BOGUS[name]
    backend = env.bogus[name]
    r, _, _ = exchange(env.port, req(path + "x", "Connection: close"))
    assert r.status == 502, r
    assert r.header("x-backend-marker") is None, r
    assert r.header("upgrade") is None, r
    assert MARK_BODY not in r.body
    assert_error_page(502, r, r.body, secrets=(backend.port,))
    line = backend_line(env, path, backend.port, 502)
    assert any(c in line.lower() for c in causes), line


def test_invalid_backend_response_502_with_curl(env):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    backend = env.bogus["garbage-status-line"]
    out = subprocess.run(
        ["curl", "-s", "-S", "--max-time", "10", "-H", "Host: proxy.test",
         "-D", "-", f"http://127.0.0.1:{env.port}/garbage/curl"],
        capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), head
    assert b"leaked" not in out.stdout
    assert str(backend.port).encode() not in body
    backend_line(env, "/garbage/", backend.port, 502)


# ---------------------------------------------------------------------------
# strict client parsing: 400 and close


STRICT = {
    "cl-and-te": req("/strict/cl-te", "Content-Length: 5", "Transfer-Encoding: chunked",
                     method="POST", body=b"0\r\n\r\n"),
    "differing-content-lengths": req("/strict/two-cl", "Content-Length: 5",
                                     "Content-Length: 6", method="POST", body=b"hello!"),
    "identical-content-lengths": req("/strict/same-cl", "Content-Length: 5",
                                     "Content-Length: 5", method="POST", body=b"hello"),
    "non-numeric-content-length": req("/strict/bad-cl", "Content-Length: 5x", method="POST",
                                      body=b"hello"),
    "obs-fold": req("/strict/obs-fold", "X-Folded: one", " two"),
    "bare-lf": b"GET /strict/bare-lf HTTP/1.1\nHost: proxy.test\nX-A: b\n\n",
    "space-before-colon": req("/strict/space-colon", "X-Space : yes"),
    "invalid-header-token": req("/strict/bad-token", "X-Bad{Name}: yes"),
    "te-not-ending-chunked": req("/strict/te-chunked-gzip", "Transfer-Encoding: chunked, gzip",
                                 method="POST", body=b"0\r\n\r\n"),
    "te-gzip-only": req("/strict/te-gzip", "Transfer-Encoding: gzip", method="POST",
                        body=b"abc"),
    "http11-without-host": req("/strict/no-host", host=None),
    "two-differing-hosts": req("/strict/two-hosts", "Host: other.test"),
    "two-identical-hosts": req("/strict/two-same-hosts", "Host: proxy.test"),
    # RFC 9112 3.2: a Host field with an invalid value also gets a 400
    "host-with-space": req("/strict/host-space", host=b"proxy test"),
    "host-with-path": req("/strict/host-path", host=b"proxy.test/evil"),
    "fragment": req("/strict/frag#top"),
    "fragment-after-query": req("/strict/frag-q?a=1#top"),
}


@pytest.mark.parametrize("name", list(STRICT))
def test_malformed_request_400_and_close(env, name):
    data = STRICT[name]
    path = data.split(b" ", 2)[1].split(b"#")[0].split(b"?")[0].decode()
    r, closed, extra = exchange(env.port, data)
    assert r.status == 400, r
    assert r.header("connection") == "close", r
    assert_error_page(400, r, r.body)
    assert closed and extra == b"", (closed, extra)
    line = env.proxy.wait_for_line(": 400 ", path)
    assert line


def test_strict_control_valid_requests_pass(env):
    """The same shapes, well formed, are forwarded (so the 400s above are not blanket)."""
    with HTTPClient(env.port) as c:
        c.send(req("/strict-ok/chunked", "Transfer-Encoding: chunked", method="POST",
                   body=b"5\r\nhello\r\n0\r\n\r\n"))
        r = c.response()
        assert r.status == 200 and r.json()["body_length"] == 5
        c.send(req("/strict-ok/length", "Content-Length: 5", "X-Tab:\tvalue ",
                   method="POST", body=b"hello"))
        r = c.response()
        assert r.status == 200 and r.json()["body_length"] == 5
        assert r.json()["target"] == "/strict-ok/length"


# ---------------------------------------------------------------------------
# limits


def test_request_line_over_default_limit_414(env):
    r, closed, _ = exchange(env.port, req("/" + "a" * 9000))
    assert r.status == 414, r
    assert_error_page(414, r, r.body)
    assert closed
    env.proxy.wait_for_line(": 414 ")


def test_request_line_at_default_limit_passes(env):
    path = "/" + "a" * (8190 - len("GET  HTTP/1.1") - 1)
    assert len(f"GET {path} HTTP/1.1") == 8190
    r = one(env.port, req(path, "Connection: close"))
    assert r.status == 200 and r.json()["target"] == path


def test_header_field_over_default_limit_431(env):
    r, closed, _ = exchange(env.port, req("/limits/big-field", "X-Big: " + "b" * 9000))
    assert r.status == 431, r
    assert_error_page(431, r, r.body)
    assert closed
    env.proxy.wait_for_line(": 431 ", "/limits/big-field")


def test_too_many_header_fields_431(env):
    fields = [f"X-F{i}: v" for i in range(100)]            # + Host = 101 fields
    r, closed, _ = exchange(env.port, req("/limits/many", *fields))
    assert r.status == 431, r
    assert_error_page(431, r, r.body)
    assert closed
    env.proxy.wait_for_line(": 431 ", "/limits/many")


def test_default_limits_not_too_tight(env):
    fields = [f"X-F{i}: v" for i in range(98)] + ["Connection: close"]   # 100 fields
    r = one(env.port, req("/limits/hundred", *fields))
    assert r.status == 200, r
    field = "X-Big: " + "b" * (8190 - len("X-Big: "))
    r = one(env.port, req("/limits/field-at-limit", field, "Connection: close"))
    assert r.status == 200, r


def test_configured_request_line_limit(env):
    # limit_request_line = 100 in the second proxy
    r = one(env.small_port, req("/small/line-ok", "Connection: close"))
    assert r.status == 200, r
    r, closed, _ = exchange(env.small_port, req("/small/line-" + "z" * 200))
    assert r.status == 414, r
    assert_error_page(414, r, r.body)
    assert closed
    env.small.wait_for_line(": 414 ")


def test_configured_request_line_limit_counts_the_whole_line(env):
    # LimitRequestLine (and etc/twistproxy.toml) bound the request *line*: method,
    # target and version; a 101-byte line is over a limit of 100
    head = "GET  HTTP/1.1"
    ok = "/ok" + "a" * (100 - len(head) - 3)
    assert len(f"GET {ok} HTTP/1.1") == 100
    r = one(env.small_port, req(ok, "Connection: close"))
    assert r.status == 200, r
    over = "/over" + "a" * (101 - len(head) - 5)
    assert len(f"GET {over} HTTP/1.1") == 101
    r, closed, _ = exchange(env.small_port, req(over))
    assert r.status == 414, r
    assert closed


def test_configured_field_size_limit(env):
    # limit_request_fieldsize = 100: the field line "Name: value"
    ok = "X-Field: " + "f" * (100 - len("X-Field: "))
    r = one(env.small_port, req("/small/field-ok", ok, "Connection: close"))
    assert r.status == 200, r
    over = ok + "f"
    r, closed, _ = exchange(env.small_port, req("/small/field-over", over))
    assert r.status == 431, r
    assert_error_page(431, r, r.body)
    assert closed
    env.small.wait_for_line(": 431 ", "/small/field-over")


def test_configured_field_count_limit(env):
    # limit_request_fields = 5: Host and four more pass; Host and five more do not
    r = one(env.small_port, req("/small/five", "X-A: 1", "X-B: 2", "X-C: 3",
                                "Connection: close"))
    assert r.status == 200, r
    r, closed, _ = exchange(env.small_port, req("/small/six", "X-A: 1", "X-B: 2", "X-C: 3",
                                                "X-D: 4", "X-E: 5"))
    assert r.status == 431, r
    assert closed
    env.small.wait_for_line(": 431 ", "/small/six")


# ---------------------------------------------------------------------------
# pipelining


def test_pipelined_requests_answered_in_order(env):
    data = (req("/pipe/1", "X-Echo-Delay: 0.3") + req("/pipe/2", "X-Echo-Delay: 0.1")
            + req("/pipe/3", "Connection: close"))
    with HTTPClient(env.port) as c:
        c.send(data)
        targets = [c.response().json()["target"] for _ in range(3)]
        closed, extra = c.wait_close()
    assert targets == ["/pipe/1", "/pipe/2", "/pipe/3"]
    assert closed and extra == b""


def test_bad_request_pipelined_after_good_one(env):
    data = (req("/pipe/good", "X-Echo-Delay: 0.2")
            + req("/pipe/bad", "Content-Length: 1", "Content-Length: 2", method="POST")
            + req("/pipe/never"))
    with HTTPClient(env.port) as c:
        c.send(data)
        first = c.response()
        assert first.status == 200, first
        assert first.json()["target"] == "/pipe/good"
        second = c.response()
        assert second.status == 400, second
        assert second.header("connection") == "close"
        closed, extra = c.wait_close()
    assert closed and extra == b"", extra
    env.proxy.wait_for_line(": 400 ", "/pipe/bad")
    assert "/pipe/never" not in env.proxy.log()
    assert "/pipe/never" not in env.proxy.access_log()


# ---------------------------------------------------------------------------
# timeouts


def test_stalled_request_head_408_and_close(env):
    with HTTPClient(env.port) as c:
        c.send(b"GET /stall/head HTTP/1.1\r\nHost: proxy.test\r\nX-Half: ")
        t0 = time.monotonic()
        r = c.response()
        assert r.status == 408, r
        assert r.header("connection") == "close"
        assert_error_page(408, r, r.body)
        closed, extra = c.wait_close()
        assert closed and extra == b""
        assert time.monotonic() - t0 < 8
    # the 408 is logged like any other answer (Apache puts it in the access log)
    wait_until(lambda: env.proxy.access_lines(" 408 ", "/stall/head")
               or env.proxy.log_lines(" 408 ", "/stall/head"), what="a log line for the 408")


def test_trickled_request_head_408(env):
    """header_timeout bounds the whole head, not the gap between bytes (slowloris)."""
    with HTTPClient(env.port) as c:
        t0 = time.monotonic()
        data = b"GET /stall/trickle HTTP/1.1\r\nHost: proxy.test\r\nX-Slow: " + b"s" * 40
        got = b""
        for i in range(len(data)):
            try:
                c.send(data[i:i + 1])
            except OSError:
                break
            c.sock.settimeout(0.2)
            try:
                got += c.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if got:
                break
            if time.monotonic() - t0 > 8:
                break
        c.buf = bytearray(got)
        c.sock.settimeout(5)
        r = c.response()
        assert r.status == 408, r
        assert time.monotonic() - t0 < 8
        closed, _ = c.wait_close()
        assert closed


def test_slow_backend_not_cut_by_client_timeouts(env):
    """A backend slower than header_timeout and keepalive_timeout (1 s) is waited for
    (its route's timeout applies), and the connection stays usable afterwards."""
    with HTTPClient(env.port) as c:
        c.send(req("/slow-echo/1", "X-Echo-Delay: 1.6"))
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/slow-echo/1"
        c.send(req("/slow-echo/2"))
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/slow-echo/2"


def test_silent_client_is_closed(env):
    with HTTPClient(env.port) as c:
        t0 = time.monotonic()
        closed, data = c.wait_close(8.0)
        assert closed, "a client that sends nothing must be disconnected"
        assert data == b"", data          # nothing was asked: nothing is answered
        assert time.monotonic() - t0 < 8


def test_idle_keepalive_connection_closed(env):
    """keepalive_timeout = 1 (the default is 5 s): an idle connection is closed after
    about a second, well before the default could have closed it."""
    with HTTPClient(env.port) as c:
        c.send(req("/ka/first"))
        assert c.response().json()["target"] == "/ka/first"
        time.sleep(0.3)
        c.send(req("/ka/second"))               # well inside keepalive_timeout = 1
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/ka/second"
        t0 = time.monotonic()
        closed, extra = c.wait_close(3.5)       # the default 5 s would not have closed it
        waited = time.monotonic() - t0
    assert closed and extra == b"", (waited, extra)
    assert 0.5 < waited < 3.5, waited


# ---------------------------------------------------------------------------
# HTTP/1.0 clients


def test_http10_closes_unless_keepalive_asked(env):
    r, closed, extra = exchange(env.port, req("/h10/plain", version="1.0", host=None))
    assert r.status == 200, r
    assert r.json()["target"] == "/h10/plain"
    assert (r.header("connection") or "").lower() != "keep-alive"
    assert closed and extra == b""

    r, closed, extra = exchange(env.port, req("/h10/with-host", version="1.0"))
    assert r.status == 200 and closed and extra == b""


def test_http10_keepalive_when_asked(env):
    with HTTPClient(env.port) as c:
        c.send(req("/h10/ka1", "Connection: keep-alive", version="1.0"))
        r = c.response()
        assert r.status == 200, r
        assert (r.header("connection") or "").lower() == "keep-alive"
        assert r.header("content-length") is not None
        assert r.json()["target"] == "/h10/ka1"
        c.send(req("/h10/ka2", "Connection: keep-alive", version="1.0"))
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/h10/ka2"
        c.send(req("/h10/ka3", version="1.0"))      # no keep-alive asked: closed after
        r = c.response()
        assert r.status == 200 and r.json()["target"] == "/h10/ka3"
        closed, extra = c.wait_close()
        assert closed and extra == b""


def test_http10_keepalive_with_unknown_length_closes(env):
    """A body of unknown length (chunked from the backend) cannot be chunked to a 1.0
    client: it is delimited by the close, keep-alive asked for or not."""
    r, closed, extra = exchange(env.port, req("/h10/chunked", "Connection: keep-alive",
                                              "X-Echo-Chunked: 1", version="1.0"))
    assert r.status == 200, r
    assert r.header("transfer-encoding") is None
    assert (r.header("connection") or "").lower() == "close"
    assert r.json()["target"] == "/h10/chunked"
    assert closed


# ---------------------------------------------------------------------------
# CONNECT and absolute-form


def test_connect_without_forward_proxy_405(env):
    target = f"127.0.0.1:{env.bystander.port}"
    with HTTPClient(env.port) as c:
        c.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        r = c.response()
        assert r.status == 405, r
        assert r.header("allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS", r
        assert_error_page(405, r, r.body, secrets=(env.bystander.port,))
    env.proxy.wait_for_line(": 405 ", "CONNECT")
    time.sleep(0.2)
    assert env.bystander.accepted == 0


def test_absolute_form_routed_by_path_never_forwarded(env):
    target = f"http://127.0.0.1:{env.bystander.port}/abs/one?q=1"
    r = one(env.port, f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\n"
                      f"Connection: close\r\n\r\n".encode())
    assert r.status == 200, r
    seen = r.json()
    assert seen["server"] == "main"
    assert seen["target"] == "/abs/one?q=1"          # origin-form towards the backend
    time.sleep(0.2)
    assert env.bystander.accepted == 0


def test_absolute_form_authority_acts_as_host(env):
    # vhost "other.test" (preserve_host) is chosen by the authority, not the Host header
    r = one(env.port, b"GET http://other.test/abs/two HTTP/1.1\r\nHost: proxy.test\r\n"
                      b"Connection: close\r\n\r\n")
    assert r.status == 200, r
    seen = r.json()
    assert seen["server"] == "other"
    assert seen["target"] == "/abs/two"
    hdrs = {}
    for n, v in seen["headers"]:
        hdrs.setdefault(n.lower(), []).append(v)
    assert hdrs["host"] == ["other.test"], hdrs
    assert hdrs.get("x-forwarded-host", ["other.test"]) == ["other.test"], hdrs


# ---------------------------------------------------------------------------
# shutdown


def test_sigterm_while_idle_exits_zero(tmp_path, env):
    p = Proxy(lambda ports: basic_config(
        f'[[vhost.route]]\npath = "/"\nurl = "{env.echo.url}/"\n', ports[0]), tmp_path)
    port = p.port
    # idle, but running: one request answered first, so start-up is over
    r = one(port, req("/before-stop", "Connection: close"))
    assert r.status == 200
    t0 = time.monotonic()
    assert p.stop() == 0, p.log()
    assert time.monotonic() - t0 < 5


def test_sigterm_with_idle_keepalive_client_exits_zero(tmp_path, env):
    p = Proxy(lambda ports: basic_config(
        f'[[vhost.route]]\npath = "/"\nurl = "{env.echo.url}/"\n', ports[0]), tmp_path)
    port = p.port
    try:
        with HTTPClient(port) as c:
            c.send(req("/before-stop"))
            assert c.response().status == 200
            t0 = time.monotonic()
            assert p.stop() == 0, p.log()
            assert time.monotonic() - t0 < 5
            closed, extra = c.wait_close(2.0)
            assert closed and extra == b""
    finally:
        p.stop()

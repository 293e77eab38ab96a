"""Backend response framing end to end: a close-delimited body cut by a reset (plain and
TLS) stays visibly cut, a doubled `chunked` never reaches the client, and response
heads are bounded per line and in all (response_field_size, response_head_size).

The proxy and an echo backend are subprocesses; the misbehaving backends are RawBackend
threads scripted by the request path (plain sockets, or Python's ssl for the TLS one,
with certificates from trustme). Clients are http.client and raw sockets. The memory
tests each get a fresh proxy, so that its peak RSS (VmHWM) is their own.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme

from harness import Echo, Proxy, RawBackend, basic_config, free_port, read_head

MIB = 1 << 20
FIELD = 8192              # response_field_size's default (Apache's responsefieldsize)
HEAD = 65536              # response_head_size's default

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# tokens the tests hand to a backend script: set when the client has seen what it needs
GO: dict[str, threading.Event] = {}
# what a backend script saw of its own sending: "closed" when the proxy hung up on it
SEEN: dict[str, str] = {}


def _go(token: str) -> threading.Event:
    return GO.setdefault(token, threading.Event())


def _rst(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), not a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _stream(conn, token: str, first: bytes, block: bytes, total: int) -> None:
    """Send `first`, then `block` until `total` bytes or the proxy hangs up."""
    sent = 0
    try:
        conn.sendall(first)
        while sent < total:
            conn.sendall(block)
            sent += len(block)
        SEEN[token] = f"all {sent} sent"
    except OSError:
        SEEN[token] = "closed"


def _target(head: bytes) -> tuple[str, dict, str]:
    target = head.split(b" ", 2)[1].decode("latin-1")
    parts = urlsplit(target)
    tok = next((p for p in parts.query.split("&") if p and "=" not in p), "")
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}, tok


def plain_backend(conn: socket.socket) -> None:
    conn.settimeout(30)
    head = read_head(conn)
    if not head:
        return
    path, q, token = _target(head)
    if path == "/close-delimited":
        # HTTP/1.0 style: no Content-Length, no chunking; the body ends at close
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 1000)
        _go(token).wait(10)
        if q.get("end") == "reset":
            _rst(conn)
        else:
            conn.close()
    elif path == "/te":
        lines = {"two-lines": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                 "list": b"Transfer-Encoding: chunked, chunked\r\n",
                 "gzip-then-chunked": b"Transfer-Encoding: gzip, chunked\r\n"
                                      b"Transfer-Encoding: chunked\r\n",
                 "chunked-not-last": b"Transfer-Encoding: chunked, gzip\r\n",
                 "chunked-with-params": b"Transfer-Encoding: chunked;x=1\r\n"}[q["te"]]
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        if q["te"] in ("chunked-not-last", "chunked-with-params"):
            conn.close()             # those bodies are read until close
        else:
            conn.recv(1)             # keep-alive: wait for the proxy to close
    elif path == "/line":
        # one header line of exactly n bytes ("Set-Cookie: " + value), in one send
        n = int(q["n"])
        line = b"Set-Cookie: " + b"c" * (n - len(b"Set-Cookie: "))
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\nok")
    elif path == "/status":
        reason = b"R" * (int(q["n"]) - len(b"HTTP/1.1 200 "))
        conn.sendall(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\nok")
    elif path == "/lines":
        # `count` header lines of `size` bytes each (+ CRLF), sent in small pieces
        count, size = int(q["count"]), int(q["size"])
        one = b"X-Filler: " + b"f" * (size - len(b"X-Filler: ")) + b"\r\n"
        data = b"HTTP/1.1 200 OK\r\n" + one * count + \
            b"Content-Length: 2\r\nConnection: close\r\n\r\nok"
        for i in range(0, len(data), 1000):
            conn.sendall(data[i:i + 1000])
    elif path == "/huge":
        # endless header: many lines, or a single line, until the proxy hangs up
        if q["kind"] == "lines":
            block = (b"X-Filler: " + b"f" * 88 + b"\r\n") * (MIB // 100)
        else:
            block = b"v" * MIB
        first = b"HTTP/1.1 200 OK\r\n" + (b"" if q["kind"] == "lines" else b"Set-Cookie: ")
        _go(token).set()             # the test may start its other client now
        _stream(conn, token, first, block, int(q["mib"]) * MIB)


class TLSBackend:
    """An HTTPS backend answering close-delimited, then closing with or without TLS's
    close_notify (`end=notify` / `end=cut`) once the test says so."""

    def __init__(self, folder: Path):
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(folder / "backend.pem"))
        leaf.private_key_pem.write_to_path(str(folder / "backend.key"))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(folder / "backend.pem"), str(folder / "backend.key"))
        self.raw = RawBackend(self._serve)
        self.url = f"https://127.0.0.1:{self.raw.port}"

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        head = read_head(tls)
        if b"\r\n\r\n" not in head:
            return
        _, q, token = _target(head)
        tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"t" * 1000)
        _go(token).wait(10)
        if q.get("end") == "notify":
            try:
                tls.unwrap()         # close_notify, then the TCP close
            except (ssl.SSLError, OSError):
                pass
        # otherwise: the TCP connection closes under TLS, with no close_notify
        conn.close()

    def stop(self):
        self.raw.stop()


def config_for(port: int, raw: RawBackend, wide: RawBackend, member: RawBackend,
               tls: TLSBackend, echo: Echo) -> str:
    return basic_config(f"""
  [[vhost.route]]
  path = "/member/"
  url = "balancer://farm/"

  [[vhost.route]]
  path = "/tls/"
  url = "{tls.url}/"
  ca_file = "ca.pem"

  [[vhost.route]]
  path = "/wide/"
  url = "{wide.url}/"
  response_field_size = 16384
  response_head_size = 262144

  [[vhost.route]]
  path = "/echo/"
  url = "{echo.url}/"

  [[vhost.route]]
  path = "/"
  url = "{raw.url}/"
""", port, extra=f"""
[balancer.farm]

  [[balancer.farm.member]]
  url = "{member.url}"
  response_field_size = 16384
""")


class Setup:
    def __init__(self, tmp: Path, raw, wide, member, tls, echo):
        self.port = free_port()
        self.raw, self.tls, self.echo = raw, tls, echo
        self.proxy = Proxy(config_for(self.port, raw, wide, member, tls, echo), tmp)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    folder = tmp_path_factory.mktemp("framing")
    # the same script behind three workers: default limits, larger ones on a route
    # (/wide/) and on a balancer member (/member/)
    raw, wide, member = (RawBackend(plain_backend) for _ in range(3))
    tls, echo = TLSBackend(folder), Echo("framing")
    yield folder, raw, wide, member, tls, echo
    for b in (raw, wide, member):
        b.stop()
    tls.stop()
    echo.stop()


@pytest.fixture(scope="module")
def env(backends):
    s = Setup(*backends)
    yield s
    s.proxy.stop()
    assert "Traceback" not in s.proxy.log(), s.proxy.log()[-3000:]


@pytest.fixture
def fresh(backends, tmp_path):
    """A proxy of its own, for a test that measures the proxy's peak memory."""
    folder = backends[0]
    (tmp_path / "ca.pem").write_bytes((folder / "ca.pem").read_bytes())
    s = Setup(tmp_path, *backends[1:])
    yield s
    s.proxy.stop()
    assert "Traceback" not in s.proxy.log(), s.proxy.log()[-3000:]


def token() -> str:
    return f"t{time.monotonic_ns()}"


def client(port: int, timeout: float = 5.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def get(port: int, target: str, timeout: float = 5.0
        ) -> tuple[http.client.HTTPResponse, bytes]:
    """GET with http.client on a connection of its own: (the response, its body)."""
    c = client(port, timeout)
    try:
        c.request("GET", target)
        resp = c.getresponse()
        return resp, resp.read()
    finally:
        c.close()


def raw_get(port: int, target: str, timeout: float = 5.0) -> tuple[bytes, bool]:
    """A raw HTTP/1.1 GET asking for Connection: close: (all bytes received, whether the
    proxy closed within `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n"
                  .encode())
        return _to_close(s)


def _to_close(s: socket.socket) -> tuple[bytes, bool]:
    out = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return out, True
            out += data
    except ConnectionResetError:
        return out, True
    except socket.timeout:
        return out, False


def cut_get(port: int, target: str, tok: str) -> tuple[bytes, bool]:
    """GET `target` from a backend that waits for `tok` before ending its body: once the
    head and some body have reached the client, let the backend end it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        got = b""
        while b"x" * 1000 not in got and b"t" * 1000 not in got:
            data = s.recv(65536)
            if not data:
                break
            got += data
        _go(tok).set()
        rest, closed = _to_close(s)
        return got + rest, closed


def access_line(proxy: Proxy, marker: str) -> str:
    """The one access-log line holding `marker`, once it is there."""
    (line,) = proxy.wait_for_access_lines(1, marker)
    return line


def wait_error_line(proxy: Proxy, marker: str) -> str:
    """The log line saying why a request holding `marker` got a 50x."""
    return proxy.wait_for_line(marker, "-> 50")


# ---------------------------------------------------------------------------------------
# 2. a close-delimited body cut by a reset stays visibly cut


# (what the backend does, the target, the body byte it sends, the detail logged)
CUTS = {"reset": ("/close-delimited?end=reset", b"x", "reset"),
        "tls-without-close-notify": ("/tls/cd?end=cut", b"t",
                                     "reset, or TLS closed without close_notify")}


@pytest.mark.parametrize("how", CUTS)
def test_close_delimited_body_cut_by_backend_is_not_finished_with_last_chunk(env, how):
    target, byte, detail = CUTS[how]
    tok = token()
    raw, closed = cut_get(env.port, f"{target}&{tok}", tok)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.startswith(b"3e8\r\n" + byte * 1000 + b"\r\n")
    assert not body.endswith(b"0\r\n\r\n"), "the cut body was finished with the last chunk"
    assert closed, "the client connection was kept after a cut body"
    # the access log shows what was sent; the error log says why it was cut
    line = access_line(env.proxy, tok)
    assert re.search(r'" 200 1000 ', line), line
    url = env.tls.url if how.startswith("tls") else env.raw.url
    wait_error_line(env.proxy, f"backend {url}: connection closed before a complete "
                               f"response ({detail})")


def test_close_delimited_body_reset_by_backend_raises_incomplete_read_in_http_client(env):
    tok = token()
    c = client(env.port)
    c.request("GET", f"/close-delimited?end=reset&{tok}")
    resp = c.getresponse()
    assert resp.status == 200
    _go(tok).set()               # the head is here: now the backend resets
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    c.close()


@pytest.mark.parametrize("target,byte", [("/close-delimited?end=fin", b"x"),
                                         ("/tls/cd?end=notify", b"t")])
def test_close_delimited_body_ended_by_clean_close_is_complete(env, target, byte):
    """The guard for the above: a FIN (after TLS's close_notify, for a TLS backend) ends
    a close-delimited body, and the client gets it whole with the last chunk, on a
    connection that stays open."""
    tok = token()
    c = client(env.port)
    c.request("GET", f"{target}&{tok}")
    resp = c.getresponse()
    _go(tok).set()
    assert (resp.status, resp.read()) == (200, byte * 1000)
    c.request("GET", "/echo/after")
    assert c.getresponse().status == 200   # the same client connection
    c.close()


# ---------------------------------------------------------------------------------------
# 3. response framing: chunked applied more than once


TE_VARIANTS = ["two-lines", "list", "gzip-then-chunked", "chunked-not-last",
               "chunked-with-params"]


@pytest.mark.parametrize("te", TE_VARIANTS)
def test_backend_applying_chunked_twice_gets_the_client_a_502(env, te):
    # http.client hangs on a relayed "chunked, chunked" (until the timeout here)
    resp, body = get(env.port, f"/te?te={te}&{token()}")
    assert resp.status == 502, (resp.status, resp.getheaders(), body[:200])


@pytest.mark.parametrize("te", TE_VARIANTS)
def test_backend_applying_chunked_twice_never_reaches_the_client_raw(env, te):
    tok = token()
    raw, closed = raw_get(env.port, f"/te?te={te}&{tok}")
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 502 "), raw[:300]
    assert head.count(b"chunked") <= 1, head
    detail = {"two-lines": "chunked, chunked", "list": "chunked, chunked",
              "gzip-then-chunked": "gzip, chunked, chunked", "chunked-not-last": "chunked, gzip",
              "chunked-with-params": "chunked;x=1"}[te]
    wait_error_line(env.proxy, f"Transfer-Encoding '{detail}' applies chunked more than once")


# ---------------------------------------------------------------------------------------
# 3. response head limits


def test_header_line_of_response_field_size_is_relayed(env):
    resp, body = get(env.port, f"/line?n={FIELD}&{token()}")
    assert (resp.status, body) == (200, b"ok")
    assert len(resp.getheader("Set-Cookie")) == FIELD - len("Set-Cookie: ")


LINE_TOO_LONG = f"a response header line longer than {FIELD} bytes (response_field_size)"
OVER = {"header-line": (f"/line?n={FIELD + 1}", LINE_TOO_LONG),
        "status-line": (f"/status?n={FIELD + 1}", LINE_TOO_LONG),
        # 50 lines of 2000 bytes, arriving in pieces: each line is fine, the head is not
        "head": ("/lines?count=50&size=2000",
                 f"a response head larger than {HEAD} bytes (response_head_size)")}


@pytest.mark.parametrize("what", OVER)
def test_response_head_over_a_limit_gets_502_and_the_cause_logged(env, what):
    target, cause = OVER[what]
    resp, _ = get(env.port, f"{target}&{token()}")
    assert (resp.status, resp.getheader("Set-Cookie")) == (502, None)
    wait_error_line(env.proxy, f"backend {env.raw.url}: {cause}")


def test_ten_megabyte_set_cookie_gets_502(env):
    resp, _ = get(env.port, f"/line?n={10 * MIB}&{token()}")
    assert (resp.status, resp.getheader("Set-Cookie")) == (502, None)


@pytest.mark.parametrize("prefix", ["/wide/", "/member/"])
def test_worker_with_larger_response_field_size_relays_a_longer_line(env, prefix):
    """response_field_size set on a route (/wide/) and on a balancer member (/member/)."""
    resp, body = get(env.port, f"{prefix}line?n=16000&{token()}")
    assert (resp.status, body) == (200, b"ok")
    assert len(resp.getheader("Set-Cookie")) == 16000 - len("Set-Cookie: ")
    assert get(env.port, f"{prefix}line?n=16385&{token()}")[0].status == 502


def test_response_head_just_under_response_head_size_is_relayed(env):
    resp, body = get(env.port, f"/lines?count=60&size=1000&{token()}")
    assert (resp.status, body) == (200, b"ok")
    assert len(resp.getheader("X-Filler")) > 60 * 990


def test_route_with_larger_response_head_size_relays_a_larger_head(env):
    assert get(env.port, f"/wide/lines?count=50&size=2000&{token()}")[0].status == 200


@pytest.mark.parametrize("kind,mib", [("lines", 200), ("line", 100)])
def test_endless_response_head_gets_502_with_bounded_memory(fresh, kind, mib):
    """200 MB of header lines, or one 100 MB line: the client gets 502, the backend
    connection is closed, the proxy's peak memory stays near its idle size, and other
    clients are answered meanwhile."""
    proxy = fresh.proxy
    assert get(fresh.port, "/echo/warm")[0].status == 200
    before = proxy.peak_rss_kib()
    tok = token()
    result = {}

    def huge():
        result["status"] = get(fresh.port, f"/huge?kind={kind}&mib={mib}&{tok}", 60)[0].status

    t = threading.Thread(target=huge, daemon=True)
    t.start()
    assert _go(tok).wait(10)
    assert get(fresh.port, "/echo/meanwhile", 60)[0].status == 200
    t.join(60)
    deadline = time.monotonic() + 10
    while tok not in SEEN and time.monotonic() < deadline:
        time.sleep(0.05)
    grew = proxy.peak_rss_kib() - before
    print(f"peak RSS before {before} KiB, growth {grew} KiB")
    assert result.get("status") == 502, result
    assert SEEN.get(tok) == "closed", SEEN.get(tok, "the backend is still sending")
    assert grew < 16 * 1024, f"peak RSS grew by {grew} KiB"
    wait_error_line(proxy, f"backend {fresh.raw.url}: " + (
        "a response head larger than" if kind == "lines" else "a response header line longer"))

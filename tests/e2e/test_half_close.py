"""A client's FIN and the proxy's own early answers, end to end (issue 14, sections 1, 2).

Section 1: a client that half-closes (`printf ... | nc -N`, shutdown(SHUT_WR) after its
request) means "nothing more to send", not "gone": what it sent is answered in order,
then the connection closes with FIN, never RST. A FIN inside a body is a truncated
request (400). `abort_on_close = true` makes a FIN abandon what waits for the backend.
A client that really goes (RST) aborts its backend exchange. Every request gets one
access-log line; one that got no status line is logged as 499.

Section 2: an answer sent before the client finished its upload (400, 403, 503, a
backend's 413) is followed by a lingering close, so the client reads it instead of a
reset while it is still sending.
"""

from __future__ import annotations

import http.client
import socket
import struct
import subprocess
import threading
import time

import pytest

from harness import Echo, Proxy, RawBackend, basic_config, free_port, read_head

# what the scripted backends saw, by request target
SEEN: dict[str, str] = {}


def _target(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("latin-1") if b" " in head else "?"


def slow_backend(conn: socket.socket) -> None:
    """Answers 200 "late" half a second after the request head, unless its connection
    is closed first (then records "closed" and never answers)."""
    head = read_head(conn)
    target = _target(head)
    conn.settimeout(0.5)
    try:
        if conn.recv(1) == b"":
            SEEN[target] = "closed"
            return
    except socket.timeout:
        pass
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
    SEEN[target] = "answered"


def body_recorder(conn: socket.socket) -> None:
    """Reads a Content-Length body: records "complete", or "eof" if the connection
    closed before it was all there."""
    head = read_head(conn)
    target = _target(head)
    top, _, got = head.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in top.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    n = len(got)
    conn.settimeout(10)
    while n < length:
        data = conn.recv(65536)
        if not data:
            SEEN[target] = "eof"
            return
        n += len(data)
    SEEN[target] = "complete"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def early_413(conn: socket.socket) -> None:
    """Reads the head and a little body, answers 413 and closes, as a backend with a
    body limit does."""
    read_head(conn)
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n"
                 b"Connection: close\r\n\r\ntoo big")


@pytest.fixture(scope="module")
def routes():
    """The backends, and the routes to them that every proxy here uses."""
    echo = Echo("site")
    slow, recorder, refuser = RawBackend(slow_backend), RawBackend(body_recorder), \
        RawBackend(early_413)
    closed_port = free_port()          # nothing listens there: 503
    yield f"""
  [[vhost.route]]
  path = "/slow/"
  url = "{slow.url}/slow/"
  max = 1
  [[vhost.route]]
  path = "/record/"
  url = "{recorder.url}/record/"
  [[vhost.route]]
  path = "/refuse-413/"
  url = "{refuser.url}/"
  [[vhost.route]]
  path = "/down/"
  url = "http://127.0.0.1:{closed_port}/"
  [[vhost.route]]
  path = "/"
  url = "{echo.url}/"
"""
    echo.stop()
    for b in (slow, recorder, refuser):
        b.stop()


def _proxy(tmp, routes: str, name: str, server: str = "", extra: str = ""):
    port = free_port()
    proxy = Proxy(basic_config(routes, port, server=server, extra=extra), tmp, name=name)
    proxy.port = port
    return proxy


@pytest.fixture(scope="module")
def env(tmp_path_factory, routes):
    """The defaults, and a forward-proxy vhost that admits no one (403)."""
    proxy = _proxy(tmp_path_factory.mktemp("half_close"), routes, "default.toml", extra="""
[[vhost]]
server_name = "forward.test"
proxy_requests = true
proxy_allow = ["10.0.0.0/8"]
""")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def aborting(tmp_path_factory, routes):
    proxy = _proxy(tmp_path_factory.mktemp("abort_on_close"), routes, "abort.toml",
                   server="abort_on_close = true")
    yield proxy
    proxy.stop()


def half_closed(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, shutdown(SHUT_WR), read until the proxy closes. A reset raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)      # ConnectionResetError here is the bug
            if not chunk:
                return out
            out += chunk


def split_responses(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each Content-Length-framed response in `raw`."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        out.append((head, rest[:length]))
        raw = rest[length:]
    return out


def access_lines(proxy, text: str, count: int = 1) -> list[str]:
    """The access-log lines containing `text`, once there are `count` of them (and a
    moment later, so that more would be seen too)."""
    proxy.wait_for_access_lines(count, text, timeout=5)
    time.sleep(0.2)
    return proxy.access_lines(text)


def wait_seen(target: str, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while target not in SEEN and time.monotonic() < deadline:
        time.sleep(0.05)
    return SEEN.get(target)


def unique(prefix: str) -> str:
    return f"{prefix}{time.monotonic_ns()}"


# ---------------------------------------------------------------------------------------
# 1. the client's FIN after complete requests


def test_nc_half_close_gets_the_whole_answer_not_a_reset(env):
    """printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -N: nc sends FIN at the end of its input
    and prints what comes back. It used to print nothing (the proxy reset the
    connection) and the request left no log line."""
    target = unique("/nc-")
    out = subprocess.run(f"printf 'GET {target} HTTP/1.0\\r\\n\\r\\n' | nc -N 127.0.0.1 "
                         f"{env.port}", shell=True, capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    [(head, body)] = split_responses(out.stdout)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in head
    assert f'"target": "{target}"'.encode() in body
    assert len(access_lines(env, f"GET {target} HTTP/1.0\" 200 ")) == 1


def test_shutdown_after_request_answered_then_fin(env):
    target = unique("/shut-")
    raw = half_closed(env.port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    [(head, body)] = split_responses(raw)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and target.encode() in body


def test_pipelined_requests_then_fin_all_answered_in_order(env):
    """Three requests and FIN in one write: three answers, in order, then FIN."""
    base = unique("/pipe-")
    data = b"".join(f"GET {base}/{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for i in range(3))
    responses = split_responses(half_closed(env.port, data))
    assert [b"200 OK" in h.split(b"\r\n")[0] for h, _ in responses] == [True] * 3
    assert [f'"target": "{base}/{i}"'.encode() in b for i, (_, b) in
            enumerate(responses)] == [True] * 3
    # the first two keep the connection (the last may announce the close: that depends
    # on whether the FIN was read before its head went out)
    assert [b"Connection: close" in h for h, _ in responses[:2]] == [False, False]
    assert len(access_lines(env, base, 3)) == 3


def test_fin_while_the_backend_is_slow_still_answered(env):
    """FIN while the backend takes its time: the backend exchange goes on (HAProxy's
    default, abortonclose off), the answer arrives."""
    target = unique("/slow/wait-")
    raw = half_closed(env.port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    [(head, body)] = split_responses(raw)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"late"
    assert wait_seen(target) == "answered"


def test_fin_mid_body_is_400_and_the_backend_never_gets_a_whole_request(env):
    """A FIN 10 kB into a 100 kB body is a truncated request: 400 and close, and the
    backend sees its connection closed, not a complete request."""
    target = unique("/record/cut-")
    raw = half_closed(env.port, f"POST {target} HTTP/1.1\r\nHost: a\r\n"
                                f"Content-Length: 100000\r\n\r\n".encode() + b"y" * 10_000)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert wait_seen(target) == "eof"
    assert len(access_lines(env, f"POST {target} HTTP/1.1\" 400 ")) == 1


def test_fin_mid_head_is_400_after_earlier_answers(env):
    target = unique("/whole-")
    raw = half_closed(env.port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode() +
                      b"GET /cut HTTP/1.1\r\nHo")
    (head1, body1), (head2, _) = split_responses(raw)
    assert head1.startswith(b"HTTP/1.1 200 OK\r\n") and target.encode() in body1
    assert head2.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_abort_on_close_fin_abandons_the_backend_exchange(aborting):
    """abort_on_close = true: the FIN while waiting for the backend aborts the exchange
    (the backend sees its connection closed, or never gets the request), the client
    gets a clean close and no answer, and the request is logged as 499."""
    target = unique("/slow/abort-")
    raw = half_closed(aborting.port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert raw == b""
    assert wait_seen(target, timeout=1.5) in (None, "closed")   # it answers after 0.5 s
    assert len(access_lines(aborting, f"GET {target} HTTP/1.1\" 499 - ")) == 1


def test_reset_while_waiting_aborts_the_exchange_frees_the_connection_and_logs_499(env):
    """A client that is really gone (RST) aborts its backend exchange; the backend
    connection is given up (the route allows one: the next request gets it), and the
    request still gets its access-log line."""
    target = unique("/slow/reset-")
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    time.sleep(0.2)                   # the proxy has passed it on
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                         # RST
    assert wait_seen(target) == "closed"
    assert len(access_lines(env, f"GET {target} HTTP/1.1\" 499 - ")) == 1
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    c.request("GET", unique("/slow/next-"))
    r = c.getresponse()
    assert (r.status, r.read()) == (200, b"late")
    c.close()


# ---------------------------------------------------------------------------------------
# 2. early answers to an upload are read, not lost in a reset

UPLOAD = 16 * 1024 * 1024


def paced_body(total: int, pieces: int = 40, pause: float = 0.07):
    """An upload that takes a few seconds, as one over a real network does."""
    piece = b"u" * (total // pieces)
    for _ in range(pieces):
        yield piece
        time.sleep(pause)


@pytest.mark.parametrize("path, host, status, body", [
    ("/down/x", "proxy.test", 503, None),                  # backend refuses: proxy's 503
    ("/refuse-413/x", "proxy.test", 413, b"too big"),      # the backend's own early 413
    ("http://origin.test/x", "origin.test", 403, None),    # forward proxy: not allowed
], ids=["proxy-503", "backend-413", "forward-403"])
def test_upload_refused_midway_the_client_reads_the_refusal(env, path, host, status, body):
    """http.client sends its whole body, then reads: the refusal sent while the body
    was still coming in must still be there to read. It used to be destroyed by a
    reset once the proxy stopped reading."""
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=20)
    c.request("POST", path, body=paced_body(UPLOAD),
              headers={"Host": host, "Content-Length": str(UPLOAD)})
    r = c.getresponse()
    got = r.read()
    assert r.status == status
    if body is not None:
        assert got == body
    else:
        assert f"{status}".encode() in got      # the proxy's error page
    assert r.getheader("Connection") == "close"
    c.close()


def test_malformed_chunk_midway_the_client_reads_the_400(env):
    """A bad chunk size early in a large chunked upload: 400, and the client, which goes
    on sending the rest of its body before reading, reads it instead of a reset."""
    s = socket.create_connection(("127.0.0.1", env.port), timeout=20)
    s.sendall(b"POST /bad HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"10\r\n0123456789abcdef\r\nZZ\r\n")
    block = b"w" * 65536
    for _ in range(UPLOAD // len(block)):
        s.sendall(block)                 # a reset shows up here as an OSError
    raw = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        raw += chunk
    s.close()
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert raw.endswith(b"</html>\n") or b"400" in raw.partition(b"\r\n\r\n")[2]


def test_a_client_that_never_stops_sending_is_cut_off(tmp_path):
    """Lingering is bounded: a client that uploads without end after its refusal has
    read the refusal, and is then disconnected (lingering_time), not read forever."""
    port = free_port()
    closed_port = free_port()
    proxy = Proxy(basic_config(f'[[vhost.route]]\npath = "/"\n'
                               f'url = "http://127.0.0.1:{closed_port}/"\n', port,
                               server='lingering_time = 1\nlingering_timeout = "500ms"'),
                  tmp_path)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000000\r\n\r\n")
        ended = threading.Event()

        def upload():
            block = b"v" * 65536
            try:
                while True:
                    s.sendall(block)
            except OSError:
                ended.set()

        t = threading.Thread(target=upload, daemon=True)
        t.start()
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert ended.wait(20), "the proxy kept reading a body without end"
        s.close()
    finally:
        proxy.stop()

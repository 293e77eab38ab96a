"""Bodies end to end: request and response framing, streaming with bounded memory,
backpressure both ways, 100-continue and other 1xx, truncation, bytes beyond a
declared length, and keep-alive reuse of the backend connection.

The proxy and the echo backend are subprocesses; scripted backends are RawBackend
handlers (plain sockets in threads); clients are http.client, raw sockets and curl.
One proxy is shared by the module; the memory tests each get a fresh proxy so that its
peak RSS (VmHWM) is their own.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from clients import Stream, connect, parse_head
from harness import Echo, Proxy, RawBackend, basic_config
from twistproxy.echo import pattern

HOST = "proxy.test"
MIB = 1 << 20
BIG = 50 * MIB
RSS_LIMIT_KIB = 64 * 1024


# ---------------------------------------------------------------------------------------
# HTTP on plain sockets (both for the clients and for the scripted backends)


def values(headers, name: str) -> list[str]:
    low = name.lower()
    return [v for n, v in headers if n.lower() == low]


def one(headers, name: str) -> str | None:
    found = values(headers, name)
    assert len(found) <= 1, f"{name} repeated: {found}"
    return found[0] if found else None


def read_body(st: Stream, headers) -> tuple[bytes, list]:
    """A request body as a server reads it."""
    te = one(headers, "Transfer-Encoding")
    if te is not None and te.lower().endswith("chunked"):
        return st.chunked()
    cl = one(headers, "Content-Length")
    return (st.exact(int(cl)) if cl else b""), []


def request_head(method: str, target: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", f"Host: {HOST}", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def send_chunked(sock: socket.socket, data: bytes, size: int = 7000,
                 trailers: bytes = b"") -> None:
    for i in range(0, len(data), size):
        piece = data[i:i + size]
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    sock.sendall(b"0\r\n" + trailers + b"\r\n")


def expected_pattern_sha(n: int) -> str:
    block = pattern(64 * 1024)
    sha = hashlib.sha256()
    reps, rest = divmod(n, len(block))
    for _ in range(reps):
        sha.update(block)
    sha.update(block[:rest])
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------
# scripted backends


@dataclass
class BackendRequest:
    method: str
    target: str
    headers: list
    conn_id: int
    number: int          # 1 for the first request on its connection

    @property
    def name(self) -> str:
        return self.target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def keepalive_server(respond):
    """A RawBackend handler serving requests on one connection until EOF; `respond(sock,
    stream, req)` answers one request (reading its body itself) and returns False to
    close the connection."""
    ids = itertools.count(1)

    def handler(sock):
        conn_id = next(ids)
        st = Stream(sock)
        for number in itertools.count(1):
            try:
                head = st.until(b"\r\n\r\n")
            except EOFError:
                return
            first, headers = parse_head(head)
            method, target, _ = first.split(" ")
            if respond(sock, st, BackendRequest(method, target, headers, conn_id,
                                                number)) is False:
                return
    return handler


def json_response(obj, extra: bytes = b"") -> bytes:
    body = json.dumps(obj).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d"
            b"\r\n\r\n%s" % (extra, len(body), body))


def drain_until_eof(sock):
    while sock.recv(65536):
        pass
    return False


BODYLESS_ANSWERS = {
    "head-cl": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n",
    "head-chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\nContent-Length: 1234\r\n\r\n",
    "304": b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n",
}

CLOSE_DELIMITED = os.urandom(200_000)
RECORDS: dict[str, str] = {}     # target -> what the recording endpoint saw
DIES_DECLARED = 100_000
DIES_SENT = 40_000


def misc_respond(sock, st, req: BackendRequest):
    name = req.name
    if name == "expect-417":
        sock.sendall(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
        return drain_until_eof(sock)           # never reads the body
    if name == "expect-401":
        sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"t\"\r\n"
                     b"Content-Length: 6\r\n\r\ndenied")
        return drain_until_eof(sock)
    if name == "expect-continue":
        expect = values(req.headers, "Expect")
        if any(v.lower() == "100-continue" for v in expect):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, _ = read_body(st, req.headers)
        sock.sendall(json_response({"expect": expect, "length": len(body),
                                    "sha256": hashlib.sha256(body).hexdigest()}))
        return True
    if name == "early-413":
        time.sleep(0.5)            # let the body back up into every buffer on the way
        st.exact(64 * 1024)        # read a little of it, then refuse the rest
        sock.sendall(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                     b"Content-Length: 7\r\n\r\ntoo big")
        drained = len(st.buf)
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass
        RECORDS[req.target] = f"closed after {drained}"
        return False
    if name == "record-body":
        try:
            body, _ = read_body(st, req.headers)
        except EOFError:
            RECORDS[req.target] = "eof"
            return False
        RECORDS[req.target] = f"complete {len(body)}"
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True
    body, _ = read_body(st, req.headers)
    if name == "ok":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    elif name in BODYLESS_ANSWERS:
        sock.sendall(BODYLESS_ANSWERS[name])
    elif name == "close-delimited":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(CLOSE_DELIMITED), 50_000):
            sock.sendall(CLOSE_DELIMITED[i:i + 50_000])
            time.sleep(0.01)
        return False
    elif name == "trailers":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Other\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n"
                     b"0\r\nX-Checksum: abc123\r\nX-Other: 1\r\n\r\n")
    elif name == "big-cl":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        block, sent = b"b" * 65536, 0
        try:
            while sent < BIG:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            RECORDS[req.target] = "aborted"
            return False
        RECORDS[req.target] = "complete"
    elif name == "te-gzip":
        coded = gzip.compress(b"hello world")
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (len(coded), coded))
    elif name == "unsolicited-100":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
    elif name == "interim":
        sock.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\n"
                     b"Link: </style.css>; rel=preload; as=style\r\n"
                     b"Link: </app.js>; rel=preload; as=script\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
    elif name == "dies-cl":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % DIES_DECLARED)
        sock.sendall(b"x" * DIES_SENT)
        time.sleep(0.1)
        return False
    elif name == "dies-cl-big":
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * MIB))
        for _ in range(4):
            sock.sendall(b"x" * MIB)
        time.sleep(0.1)
        return False
    elif name == "dies-chunked":
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10):
            sock.sendall(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        time.sleep(0.1)
        return False
    else:
        sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    return True


def extra_respond(sock, st, req: BackendRequest):
    read_body(st, req.headers)
    conn = b"X-Backend-Conn: %d\r\n" % req.conn_id
    if req.name == "same-segment":
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 5\r\n\r\n"
                     b"helloEXTRA-BYTES-BEYOND-THE-DECLARED-LENGTH" % conn)
    elif req.name == "chunked-extra":
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\nEXTRA-BYTES-AFTER-THE-LAST-CHUNK" % conn)
    elif req.name == "late":
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 5\r\n\r\nhello" % conn)
        time.sleep(0.1)
        # looks like the next response: a proxy that reused this connection would take it
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
    else:
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % conn)
    return True


def ka_respond(sock, st, req: BackendRequest):
    body, trailers = read_body(st, req.headers)
    ids = b"X-Backend-Conn: %d\r\nX-Conn-Request: %d\r\n" % (req.conn_id, req.number)
    if req.name == "echo":
        sock.sendall(json_response({"length": len(body),
                                    "sha256": hashlib.sha256(body).hexdigest(),
                                    "te": values(req.headers, "Transfer-Encoding"),
                                    "cl": values(req.headers, "Content-Length")}, ids))
    elif req.name == "chunked":
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n"
                     b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n" % ids)
    elif req.name == "nocontent":
        sock.sendall(b"HTTP/1.1 204 No Content\r\n%s\r\n" % ids)
    else:           # "small", for GET and HEAD
        sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: 10\r\n\r\n%s"
                     % (ids, b"" if req.method == "HEAD" else b"0123456789"))
    return True


SLOW_STALL = 2.0


def slow_respond(sock, st, req: BackendRequest):
    """Reads the body slowly (a trickle) for SLOW_STALL seconds, then at full speed."""
    total = int(one(req.headers, "Content-Length"))
    sha = hashlib.sha256()
    got = 0
    stall_end = time.monotonic() + SLOW_STALL
    while got < total and time.monotonic() < stall_end:
        data = st.read_some(min(4096, total - got))
        sha.update(data)
        got += len(data)
        time.sleep(0.05)
    while got < total:
        data = st.read_some(min(MIB, total - got))
        sha.update(data)
        got += len(data)
    sock.sendall(json_response({"length": got, "sha256": sha.hexdigest()}))
    return True


# ---------------------------------------------------------------------------------------
# fixtures


def config_for(port: int, echo: Echo, raws: dict) -> str:
    """A route /NAME/ -> BACKEND/NAME/ for each of `raws` (RawBackends or Echoes), then
    everything else to `echo`."""
    routes = [f'[[vhost.route]]\npath = "/{p}/"\nurl = "{rb.url}/{p}/"\n'
              for p, rb in raws.items()]
    routes.append(f'[[vhost.route]]\npath = "/"\nurl = "{echo.url}/"\n')
    return basic_config("\n".join(routes), port)


@dataclass
class Setup:
    proxy: Proxy
    port: int
    echo: Echo
    raws: dict


@pytest.fixture(scope="module")
def backends():
    echo = Echo("bodies")
    raws = {"misc": RawBackend(keepalive_server(misc_respond)),
            "extra": RawBackend(keepalive_server(extra_respond)),
            "ka": RawBackend(keepalive_server(ka_respond)),
            "slow": RawBackend(keepalive_server(slow_respond)),
            "ka-echo": Echo("ka-echo")}       # an echo only the keep-alive test uses
    yield echo, raws
    for rb in raws.values():
        rb.stop()
    echo.stop()


@pytest.fixture(scope="module")
def env(backends, tmp_path_factory, each_reactor):
    echo, raws = backends
    proxy = Proxy(lambda ports: config_for(ports[0], echo, raws),
                  tmp_path_factory.mktemp("bodies"))
    yield Setup(proxy, proxy.port, echo, raws)
    # after every test of the module, whichever ran: the proxy is still up, and nothing
    # made it log an unhandled error
    assert proxy.proc.poll() is None, proxy.log()[-4000:]
    proxy.stop()
    proxy.assert_clean()


@pytest.fixture
def fresh(backends, tmp_path, each_reactor):
    """A proxy of its own, for a test that measures the proxy's peak memory."""
    echo, raws = backends
    proxy = Proxy(lambda ports: config_for(ports[0], echo, {"slow": raws["slow"]}), tmp_path)
    yield Setup(proxy, proxy.port, echo, raws)
    proxy.stop()
    proxy.assert_clean()


def client(port: int, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def echo_json(resp: http.client.HTTPResponse) -> dict:
    assert resp.status == 200, resp.status
    return json.loads(resp.read())


class RssSampler:
    """Samples the proxy's resident set size in a thread; `max_kib` is the largest seen."""

    def __init__(self, proxy: Proxy, interval: float = 0.02):
        self.proxy = proxy
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.max_kib = max(self.max_kib, self.proxy.rss_kib())
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def check(self, what: str) -> None:
        peak = self.proxy.peak_rss_kib()
        print(f"{what}: proxy RSS sampled max {self.max_kib} KiB, peak {peak} KiB")
        assert self.max_kib < RSS_LIMIT_KIB, \
            f"{what}: proxy RSS reached {self.max_kib} KiB (limit {RSS_LIMIT_KIB})"
        assert peak < RSS_LIMIT_KIB, \
            f"{what}: proxy peak RSS {peak} KiB (limit {RSS_LIMIT_KIB})"


def headers_dict_lower(echoed) -> dict:
    out: dict = {}
    for n, v in echoed["headers"]:
        out.setdefault(n.lower(), []).append(v)
    return out


# ---------------------------------------------------------------------------------------
# request bodies


def test_content_length_body_forwarded_with_its_length(env):
    body = os.urandom(300_000)
    c = client(env.port)
    c.request("POST", "/upload", body=body, headers={"Host": HOST,
                                                       "Content-Type": "x/y"})
    got = echo_json(c.getresponse())
    c.close()
    hdrs = headers_dict_lower(got)
    assert hdrs.get("content-length") == [str(len(body))]
    assert "transfer-encoding" not in hdrs
    assert got["body_length"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_body_rechunked_to_backend(env):
    data = os.urandom(500_000)

    def pieces():
        for i in range(0, len(data), 33_333):
            yield data[i:i + 33_333]

    c = client(env.port)
    c.request("PUT", "/chunked", body=pieces(), encode_chunked=True,
              headers={"Host": HOST, "Transfer-Encoding": "chunked"})
    got = echo_json(c.getresponse())
    c.close()
    hdrs = headers_dict_lower(got)
    assert hdrs.get("transfer-encoding") == ["chunked"]
    assert "content-length" not in hdrs
    assert got["body_length"] == len(data)
    assert got["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_chunked_upload_with_curl(env, tmp_path):
    data = os.urandom(3 * MIB + 17)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-H", f"Host: {HOST}",
         "-H", "Transfer-Encoding: chunked", "-H", "Expect:",
         "--data-binary", f"@{f}", f"http://127.0.0.1:{env.port}/curl-chunked"],
        capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert headers_dict_lower(got).get("transfer-encoding") == ["chunked"]
    assert got["body_length"] == len(data)
    assert got["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_request_trailers_forwarded(env):
    body = b"some body bytes " * 1000
    s = connect(env.port)
    s.sendall(request_head("POST", "/trailers", "Transfer-Encoding: chunked",
                           "Trailer: X-Sum, X-Note"))
    send_chunked(s, body, trailers=b"X-Sum: 0123abcd\r\nX-Note: last words\r\n")
    resp = Stream(s).response(interims=True)
    s.close()
    assert resp.status == 200
    got = json.loads(resp.body)
    assert got["body_length"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
    names = [n.lower() for n, _ in got["headers"]]
    assert ["X-Sum", "0123abcd"] in got["headers"], got["headers"]
    assert ["X-Note", "last words"] in got["headers"], got["headers"]
    # they came after the body, as trailers, not moved up into the head
    assert names.index("x-sum") > names.index("transfer-encoding")


def test_request_transfer_coding_before_chunked_kept_or_refused(env):
    """`Transfer-Encoding: gzip, chunked`: once the proxy takes the chunking off, the body
    is still gzip-coded. The backend must be told so (or the request refused), never
    handed the coded bytes as if they were the content."""
    coded = gzip.compress(b"hello world")
    s = connect(env.port)
    s.sendall(request_head("POST", "/te-gzip", "Transfer-Encoding: gzip, chunked"))
    send_chunked(s, coded)
    resp = Stream(s).response(interims=True)
    s.close()
    if resp.status in (400, 501):
        return
    assert resp.status == 200
    got = json.loads(resp.body)
    te = [c.strip().lower() for v in headers_dict_lower(got).get("transfer-encoding", [])
          for c in v.split(",")]
    assert te == ["gzip", "chunked"], \
        f"backend got Transfer-Encoding {te} for a gzip-coded body"


@pytest.mark.parametrize("framing", ["Content-Length: 0", "Transfer-Encoding: chunked"])
def test_empty_post(env, framing):
    s = connect(env.port)
    s.sendall(request_head("POST", "/empty", framing))
    if "chunked" in framing:
        s.sendall(b"0\r\n\r\n")
    resp = Stream(s).response(interims=True)
    s.close()
    assert resp.status == 200
    got = json.loads(resp.body)
    assert got["body_length"] == 0
    hdrs = headers_dict_lower(got)
    if "chunked" in framing:
        assert hdrs.get("transfer-encoding") == ["chunked"] or \
            hdrs.get("content-length") == ["0"], hdrs
    else:
        assert hdrs.get("content-length") == ["0"]
        assert "transfer-encoding" not in hdrs


def test_post_without_framing_has_no_body(env):
    s = connect(env.port)
    s.sendall(request_head("POST", "/noframing"))
    resp = Stream(s).response(interims=True)
    s.close()
    got = json.loads(resp.body)
    assert got["body_length"] == 0
    assert "transfer-encoding" not in headers_dict_lower(got)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
def test_bodyless_request_gets_no_framing_added(env, method):
    s = connect(env.port)
    s.sendall(request_head(method, "/nobody"))
    resp = Stream(s).response(interims=True)
    s.close()
    assert resp.status == 200
    got = json.loads(resp.body)
    assert got["method"] == method
    hdrs = headers_dict_lower(got)
    assert "content-length" not in hdrs, hdrs
    assert "transfer-encoding" not in hdrs, hdrs
    assert got["body_length"] == 0


# ---------------------------------------------------------------------------------------
# response bodies


def test_content_length_response_passed(env):
    n = 100_000
    c = client(env.port)
    c.request("GET", "/cl", headers={"Host": HOST, "X-Echo-Bytes": str(n)})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200
    assert r.getheader("Content-Length") == str(n)
    assert r.getheader("Transfer-Encoding") is None
    assert body == pattern(n)
    # and the connection is still usable
    c.request("GET", "/again", headers={"Host": HOST})
    assert echo_json(c.getresponse())["target"] == "/again"
    c.close()


def test_chunked_response_rechunked_to_http11_client(env):
    n = 300_000
    s = connect(env.port)
    s.sendall(request_head("GET", "/chunked-out", "X-Echo-Bytes: %d" % n,
                           "X-Echo-Chunked: 1"))
    st = Stream(s)
    resp = st.response(interims=True)
    assert resp.status == 200
    assert resp.framing == "chunked"
    assert resp.one("Content-Length") is None
    assert resp.body == pattern(n)
    # the client connection stays open for the next request
    s.sendall(request_head("GET", "/next"))
    assert json.loads(st.response(interims=True).body)["target"] == "/next"
    s.close()


@pytest.mark.parametrize("keepalive", [False, True])
def test_chunked_response_close_delimited_to_http10_client(env, keepalive):
    n = 300_000
    s = connect(env.port)
    extra = ["Connection: keep-alive"] if keepalive else []
    s.sendall(request_head("GET", "/for-1.0", "X-Echo-Bytes: %d" % n, "X-Echo-Chunked: 1",
                           *extra, version="1.0"))
    st = Stream(s)
    first, headers = parse_head(st.until(b"\r\n\r\n"))
    rest = st.to_close(timeout=3)        # the body ends when the proxy closes
    s.close()
    assert first.split(" ")[1] == "200"
    assert not values(headers, "Transfer-Encoding"), headers
    cl = one(headers, "Content-Length")
    assert cl is None or int(cl) == n
    assert [v.lower() for v in values(headers, "Connection")] in ([], ["close"])
    assert rest == pattern(n)


@pytest.mark.parametrize("version,extra", [
    ("1.0", "X-Echo-Chunked: 1"),        # close-delimited towards the client
    ("1.0", "X-Echo-Chunked: 0"),        # Content-Length, then close (no keep-alive)
    ("1.1", "Connection: close"),
])
def test_connection_closed_after_large_response(env, version, extra):
    """A response the proxy must end by closing the connection: the client sees the close
    promptly once the body is out (three rounds, as the proxy's write buffer may or may
    not be above its high-water mark when the response ends)."""
    n = MIB
    for _ in range(3):
        s = connect(env.port)
        s.sendall(request_head("GET", "/large-then-close", "X-Echo-Bytes: %d" % n, extra,
                               version=version))
        st = Stream(s)
        first, headers = parse_head(st.until(b"\r\n\r\n"))
        raw = st.to_close(timeout=3)
        s.close()
        assert first.split(" ")[1] == "200"
        assert (one(headers, "Connection") or "close").lower() == "close"
        assert raw == pattern(n)


def test_close_delimited_backend_response_chunked_to_http11_client(env):
    s = connect(env.port)
    st = Stream(s)
    s.sendall(request_head("GET", "/misc/close-delimited"))
    resp = st.response(interims=True)
    assert resp.status == 200
    assert resp.framing == "chunked", resp.headers
    assert resp.body == CLOSE_DELIMITED
    s.sendall(request_head("GET", "/misc/ok"))
    nxt = st.response(interims=True)
    assert (nxt.status, nxt.body) == (200, b"ok")
    s.close()


def test_close_delimited_backend_response_to_http10_client(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/close-delimited", version="1.0"))
    st = Stream(s)
    first, headers = parse_head(st.until(b"\r\n\r\n"))
    rest = st.to_close()
    s.close()
    assert first.split(" ")[1] == "200"
    assert not values(headers, "Transfer-Encoding")
    assert rest == CLOSE_DELIMITED


@pytest.mark.parametrize("name,method", [("head-cl", "HEAD"), ("head-chunked", "HEAD"),
                                         ("204", "GET"), ("304", "GET")])
def test_bodyless_response_despite_declared_length(env, name, method):
    s = connect(env.port)
    st = Stream(s)
    s.sendall(request_head(method, f"/misc/{name}"))
    resp = st.response(method, interims=True)
    assert resp.status == (200 if method == "HEAD" else int(name))
    assert resp.one("Transfer-Encoding") is None or method == "HEAD"
    if name == "204":
        assert resp.one("Content-Length") is None, "Content-Length in a 204"
    # nothing else may follow: the next response on this connection starts right here
    time.sleep(0.2)
    s.sendall(request_head("GET", "/misc/ok"))
    nxt = st.response(interims=True)
    assert (nxt.status, nxt.body) == (200, b"ok")
    assert st.buf == b""
    # and once more, so a backend connection left expecting a body would show
    s.sendall(request_head(method, f"/misc/{name}"))
    assert st.response(method, interims=True).status == resp.status
    s.sendall(request_head("GET", "/misc/ok"))
    assert st.response(interims=True).body == b"ok"
    s.close()


def test_response_trailers_forwarded(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/trailers", "TE: trailers"))
    resp = Stream(s).response(interims=True)
    s.close()
    assert resp.framing == "chunked"
    assert resp.body == b"hello world"
    assert ("X-Checksum", "abc123") in resp.trailers, resp.trailers
    assert ("X-Other", "1") in resp.trailers, resp.trailers


def test_response_transfer_coding_before_chunked_kept_or_refused(env):
    """A backend response with `Transfer-Encoding: gzip, chunked`: the client must be able
    to recover the content (the gzip coding declared to it, or removed by the proxy), or
    get a 502; never gzip bytes presented as the content itself."""
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/te-gzip", "TE: gzip"))
    resp = Stream(s).response(interims=True)
    s.close()
    if resp.status == 502:
        return
    assert resp.status == 200
    codings = [c.strip().lower() for c in (resp.one("Transfer-Encoding") or "").split(",")]
    body = resp.body
    if "gzip" in codings or (resp.one("Content-Encoding") or "").lower() == "gzip":
        body = gzip.decompress(body)
    assert body == b"hello world", \
        f"gzip-coded bytes passed off as the content (Transfer-Encoding {codings})"


# ---------------------------------------------------------------------------------------
# big bodies, memory, backpressure


def test_streamed_upload_50mib_bounded_memory(fresh):
    block = os.urandom(MIB)
    sha = hashlib.sha256()

    def body():
        for i in range(BIG // MIB):
            piece = i.to_bytes(4, "big") + block[4:]
            sha.update(piece)
            yield piece

    with RssSampler(fresh.proxy) as rss:
        c = client(fresh.port, timeout=30)
        c.request("POST", "/big-upload", body=body(),
                  headers={"Host": HOST, "Content-Length": str(BIG)})
        got = echo_json(c.getresponse())
        c.close()
    assert got["body_length"] == BIG
    assert got["body_sha256"] == sha.hexdigest()
    rss.check("50 MiB upload")


def test_streamed_download_50mib_bounded_memory(fresh):
    sha = hashlib.sha256()
    n = 0
    with RssSampler(fresh.proxy) as rss:
        c = client(fresh.port, timeout=30)
        c.request("GET", "/big-download", headers={"Host": HOST, "X-Echo-Bytes": str(BIG)})
        r = c.getresponse()
        assert r.status == 200
        while True:
            data = r.read(MIB)
            if not data:
                break
            n += len(data)
            sha.update(data)
        c.close()
    assert n == BIG
    assert sha.hexdigest() == expected_pattern_sha(BIG)
    rss.check("50 MiB download")


def test_slow_reading_client_backpressure(fresh):
    s = connect(fresh.port, timeout=10, rcvbuf=64 * 1024)
    st = Stream(s)
    sha = hashlib.sha256()
    with RssSampler(fresh.proxy) as rss:
        s.sendall(request_head("GET", "/slow-client", "X-Echo-Bytes: %d" % BIG))
        first, headers = parse_head(st.until(b"\r\n\r\n"))
        assert first.split(" ")[1] == "200"
        assert int(one(headers, "Content-Length")) == BIG
        st.hash_exact(MIB, sha)
        time.sleep(2.5)                  # the client stops reading
        rss.check("client paused")       # the proxy must not have read ahead into memory
        st.hash_exact(BIG - MIB, sha)
    s.close()
    assert sha.hexdigest() == expected_pattern_sha(BIG)
    rss.check("slow client, after")


def test_fast_upload_to_slow_reading_backend(fresh):
    block = os.urandom(MIB)
    sha = hashlib.sha256()
    total = 30 * MIB

    def body():
        for i in range(total // MIB):
            piece = i.to_bytes(4, "big") + block[4:]
            sha.update(piece)
            yield piece

    slow = fresh.raws["slow"]
    with RssSampler(fresh.proxy) as rss:
        c = client(fresh.port, timeout=30)
        started = time.monotonic()
        c.request("POST", "/slow/upload", body=body(),
                  headers={"Host": HOST, "Content-Length": str(total)})
        resp = c.getresponse()
        got = json.loads(resp.read())
        c.close()
    assert resp.status == 200
    assert time.monotonic() - started >= SLOW_STALL * 0.9, "the backend was not slow?"
    assert slow.accepted >= 1
    assert got == {"length": total, "sha256": sha.hexdigest()}
    rss.check("upload to a slow backend")


# ---------------------------------------------------------------------------------------
# Expect: 100-continue and other interim responses


def test_expect_100_continue_end_to_end(env):
    body = os.urandom(300_000)
    s = connect(env.port)
    st = Stream(s)
    s.sendall(request_head("POST", "/misc/expect-continue", "Content-Length: %d" % len(body),
                           "Expect: 100-continue"))
    # the client holds its body back until it sees the 100 (a 5 s socket timeout)
    first, _ = parse_head(st.until(b"\r\n\r\n"))
    assert first.startswith("HTTP/1.1 100"), first
    s.sendall(body)
    resp = st.response(interims=True)
    s.close()
    assert resp.status == 200
    assert resp.interims == []            # just the one 100
    got = json.loads(resp.body)
    assert [v.lower() for v in got["expect"]] == ["100-continue"]
    assert got["length"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_with_curl(env, tmp_path):
    data = os.urandom(2 * MIB)
    f = tmp_path / "body.bin"
    f.write_bytes(data)
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "20", "--expect100-timeout", "10",
         "-H", f"Host: {HOST}", "-H", "Expect: 100-continue", "--data-binary", f"@{f}",
         f"http://127.0.0.1:{env.port}/misc/expect-continue"],
        capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert b"< HTTP/1.1 100 Continue" in out.stderr, out.stderr.decode(errors="replace")
    assert time.monotonic() - started < 8, "curl waited out its expect100 timeout"
    got = json.loads(out.stdout)
    assert got["length"] == len(data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("status", [417, 401])
def test_expect_final_response_without_reading_body(env, status):
    s = connect(env.port)
    st = Stream(s)
    s.sendall(request_head("POST", f"/misc/expect-{status}", "Content-Length: 300000",
                           "Expect: 100-continue"))
    resp = st.response(interims=True)
    assert resp.interims == [], "a 100 Continue was sent although the backend refused"
    assert resp.status == status
    if status == 401:
        assert resp.body == b"denied"
        assert resp.one("WWW-Authenticate") == 'Basic realm="t"'
    # the body was never sent nor read: the proxy must not wait for it on this connection
    assert (resp.one("Connection") or "").lower() == "close", resp.headers
    assert st.to_close(timeout=4) == b""
    s.close()


def test_interim_responses_relayed_to_http11_client(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/interim"))
    resp = Stream(s).response(interims=True)
    s.close()
    assert [st for st, _ in resp.interims] == [102, 103]
    links = values(resp.interims[1][1], "Link")
    assert links == ["</style.css>; rel=preload; as=style",
                     "</app.js>; rel=preload; as=script"]
    assert (resp.status, resp.body) == (200, b"final")


def test_unsolicited_100_not_relayed(env):
    """A 100 Continue the client did not ask for (no Expect) is not passed on."""
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/unsolicited-100"))
    resp = Stream(s).response(interims=True)
    s.close()
    assert resp.interims == []
    assert (resp.status, resp.body) == (200, b"final")


def test_interim_responses_not_sent_to_http10_client(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/interim", version="1.0"))
    raw = Stream(s).to_close()
    s.close()
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert b"HTTP/1.1 10" not in raw
    assert raw.endswith(b"\r\n\r\nfinal")


def test_client_gone_mid_download_cancels_backend(env):
    """The client closes after 1 MiB of a 50 MiB response: the proxy drops the backend
    connection instead of pulling the rest through (or keeping it)."""
    target = f"/misc/big-cl?{time.monotonic_ns()}"
    s = connect(env.port)
    s.sendall(request_head("GET", target))
    st = Stream(s)
    st.until(b"\r\n\r\n")
    st.exact(MIB)
    s.close()
    deadline = time.monotonic() + 5
    while target not in RECORDS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert RECORDS.get(target) == "aborted", RECORDS.get(target, "backend still sending")


# ---------------------------------------------------------------------------------------
# truncation, bytes beyond the length, reuse


def test_backend_dies_mid_body_content_length(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/dies-cl"))
    raw = Stream(s).to_close(timeout=5)
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    first, headers = parse_head(head)
    assert first.split(" ")[1] == "200"
    assert one(headers, "Content-Length") == str(DIES_DECLARED)
    assert len(body) < DIES_DECLARED       # closed before the declared length arrived
    assert body == b"x" * len(body)


def test_backend_dies_mid_body_while_client_is_behind(env):
    """The backend dies while the proxy still has data queued for a client that reads
    slowly: once that data is out, the client must still see the connection close."""
    s = connect(env.port, rcvbuf=32 * 1024)
    s.sendall(request_head("GET", "/misc/dies-cl-big"))
    time.sleep(0.5)             # the backend has sent 4 of its 8 MiB and closed by now
    raw = Stream(s).to_close(timeout=5)
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert one(parse_head(head)[1], "Content-Length") == str(8 * MIB)
    assert len(body) == 4 * MIB


def test_backend_dies_mid_body_chunked(env):
    s = connect(env.port)
    s.sendall(request_head("GET", "/misc/dies-chunked"))
    raw = Stream(s).to_close(timeout=5)
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    first, headers = parse_head(head)
    assert first.split(" ")[1] == "200"
    assert (one(headers, "Transfer-Encoding") or "").lower() == "chunked"
    assert b"x" * 1000 in body
    assert b"\r\n0\r\n" not in body and not body.startswith(b"0\r\n"), \
        "the truncated body was finished with the last chunk"


def test_backend_refuses_upload_early(env):
    """The backend answers 413 after a little of a large body, without Expect: the
    client gets the 413, and the proxy closes the backend connection rather than
    keeping it (the backend reads on until its peer closes)."""
    target = f"/misc/early-413?{time.monotonic_ns()}"
    total = 64 * MIB
    s = connect(env.port, timeout=10)
    errors = []

    def upload():
        try:
            s.sendall(request_head("POST", target, "Content-Length: %d" % total))
            block = b"z" * MIB
            for _ in range(total // MIB):
                s.sendall(block)
        except OSError as e:      # the proxy may stop reading once it has answered
            errors.append(e)

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    resp = Stream(s).response(interims=True)
    assert (resp.status, resp.body) == (413, b"too big")
    deadline = time.monotonic() + 4
    while target not in RECORDS and time.monotonic() < deadline:
        time.sleep(0.05)
    s.close()
    t.join(5)
    assert target in RECORDS, "the proxy never closed the backend connection"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_client_dies_mid_upload(env, framing):
    """The client goes away halfway through its body: the backend sees its connection
    close, never a complete request."""
    target = f"/misc/record-body?{framing}-{time.monotonic_ns()}"
    s = connect(env.port)
    if framing == "length":
        s.sendall(request_head("POST", target, "Content-Length: 100000") + b"y" * 10_000)
    else:
        s.sendall(request_head("POST", target, "Transfer-Encoding: chunked") +
                  b"2710\r\n" + b"y" * 10_000 + b"\r\n" + b"2710\r\n" + b"y" * 5000)
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 5
    while target not in RECORDS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert RECORDS.get(target) == "eof", RECORDS.get(target, "the backend still waits")


@pytest.mark.parametrize("when", ["same-segment", "late", "chunked-extra"])
def test_bytes_beyond_content_length_not_forwarded(env, when):
    rb = env.raws["extra"]
    s = connect(env.port)
    st = Stream(s)
    before = rb.accepted
    s.sendall(request_head("GET", f"/extra/{when}"))
    first = st.response(interims=True)
    assert (first.status, first.body) == (200, b"hello")
    time.sleep(0.3)
    assert st.buf == b""
    s.setblocking(False)
    try:
        stray = s.recv(65536)
    except BlockingIOError:
        stray = b""
    s.setblocking(True)
    s.settimeout(5)
    assert stray == b"", f"bytes beyond the response reached the client: {stray[:100]!r}"
    s.sendall(request_head("GET", "/extra/ok"))
    nxt = st.response(interims=True)
    s.close()
    assert (nxt.status, nxt.body) == (200, b"ok")
    assert nxt.one("X-Backend-Conn") != first.one("X-Backend-Conn"), \
        "the backend connection that sent extra bytes was reused"
    assert rb.accepted > before


def test_keepalive_reuses_one_backend_connection(env):
    rb = env.raws["ka"]
    before = rb.accepted
    c = client(env.port)
    conns, numbers = set(), []
    for i in range(20):
        kind = i % 6
        if kind == 0:
            c.request("GET", "/ka/small", headers={"Host": HOST})
            r = c.getresponse()
            assert r.read() == b"0123456789"
        elif kind == 1:
            body = os.urandom(20_000 + i)
            c.request("POST", "/ka/echo", body=body, headers={"Host": HOST})
            r = c.getresponse()
            got = json.loads(r.read())
            assert (got["length"], got["sha256"]) == (len(body),
                                                      hashlib.sha256(body).hexdigest())
        elif kind == 2:
            body = os.urandom(30_000)
            c.request("POST", "/ka/echo", body=iter([body[:1000], body[1000:]]),
                      encode_chunked=True,
                      headers={"Host": HOST, "Transfer-Encoding": "chunked"})
            r = c.getresponse()
            got = json.loads(r.read())
            assert got["te"] == ["chunked"]
            assert got["sha256"] == hashlib.sha256(body).hexdigest()
        elif kind == 3:
            c.request("GET", "/ka/chunked", headers={"Host": HOST})
            r = c.getresponse()
            assert r.read() == b"abcdefg"
        elif kind == 4:
            c.request("HEAD", "/ka/small", headers={"Host": HOST})
            r = c.getresponse()
            assert r.read() == b""
        else:
            c.request("DELETE", "/ka/nocontent", headers={"Host": HOST})
            r = c.getresponse()
            assert r.status == 204
            r.read()
        assert r.status in (200, 204), (i, r.status)
        assert not r.will_close, f"request {i}: the proxy closed the client connection"
        conns.add(r.getheader("X-Backend-Conn"))
        numbers.append(int(r.getheader("X-Conn-Request")))
    c.close()
    assert rb.accepted - before == 1, f"{rb.accepted - before} backend connections"
    assert len(conns) == 1
    assert numbers == list(range(numbers[0], numbers[0] + 20))


def test_keepalive_reuse_with_echo_backend(env):
    """20 requests with bodies both ways on one client connection: still one backend
    connection (the echo process's established sockets, looked at after each one)."""
    echo = env.raws["ka-echo"]
    c = client(env.port)
    seen = []
    for i in range(20):
        body = os.urandom(1000 * i)
        c.request("POST", f"/ka-echo/{i}", body=body,
                  headers={"Host": HOST, "X-Echo-Chunked": str(i % 2)})
        r = c.getresponse()
        got = echo_json(r)
        assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert not r.will_close
        seen.append(tuple(established_peers(echo.port)))
    c.close()
    assert all(len(peers) == 1 for peers in seen), seen
    assert len(set(seen)) == 1, f"the backend connection changed: {seen}"


def established_peers(port: int) -> list[str]:
    """Remote ends of the established TCP connections whose local port is `port`."""
    out = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            out.append(remote)
    return out

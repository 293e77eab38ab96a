"""The client side of the end-to-end tests, written once.

- `Response`: what came back (status, headers in order as received, body, and for raw
  reads the interim responses, trailers and how the body was framed).
- `Stream`: a socket with a read buffer, for both sides of a raw exchange: heads,
  exact byte counts, chunked bodies, "until the peer closes"; `Stream.response()`
  parses one response.
- `HTTPClient`: one raw HTTP/1.1 client connection to the proxy (keep-alive and
  pipelining: it reads responses one by one and keeps every byte it received).
- `Session` and `fetch()`: http.client, for tests that do not care about the bytes.
- `PKI`: a trustme CA and the leaves a test asks for, written into one folder (where
  the proxy's configuration goes, so relative paths resolve there).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import trustme

HOST = "proxy.test"


# ---------------------------------------------------------------------------
# responses


class Response:
    def __init__(self, status: int, headers: list, body: bytes = b"", reason: str = "",
                 version: str = "HTTP/1.1"):
        self.status = status
        self.headers = headers            # [(name, value)] in order, as received
        self.body = body
        self.reason = reason
        self.version = version
        self.trailers: list = []
        self.interims: list = []          # [(status, headers)] skipped 1xx (see Stream)
        self.framing = ""                 # "length", "chunked", "close" or "none"

    def all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for n, v in self.headers if n.lower() == low]

    def header(self, name: str) -> str | None:
        """Every value of `name` joined with ", ", or None."""
        values = self.all(name)
        return ", ".join(values) if values else None

    def one(self, name: str) -> str | None:
        """The value of a header that must not repeat, or None."""
        values = self.all(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    @property
    def echo(self) -> dict:
        """The echo backend's report; fails if the answer did not come from an echo."""
        assert self.one("Content-Type") == "application/json", \
            f"not an echo answer: {self.status} {self.headers} {self.body[:200]!r}"
        return json.loads(self.body)

    @property
    def server(self) -> str | None:
        """The backend that answered: a scripted backend's X-Member, or the echo's name."""
        member = self.header("X-Member")
        if member is not None:
            return member
        try:
            return json.loads(self.body)["server"]
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def conn(self) -> int | None:
        """A scripted backend's X-Conn: which of its connections answered."""
        v = self.header("X-Conn")
        return int(v) if v is not None else None

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:200]!r}>"


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(first line, [(name, value)]) of a message head (with or without its CRLFCRLF)."""
    lines = head.split(b"\r\n")
    headers = []
    for raw in lines[1:]:
        if raw:
            name, _, value = raw.partition(b":")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return lines[0].decode("latin-1"), headers


def request_bytes(method: str, target: str, headers=(), body: bytes | None = None,
                  host: str | None = HOST, version: str = "1.1") -> bytes:
    """A request as bytes; `headers` is [(name, value)] or a dict; a body gets a
    Content-Length unless the headers frame it."""
    if isinstance(headers, dict):
        headers = list(headers.items())
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    framed = any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers)
    if body is not None and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# ---------------------------------------------------------------------------
# a socket with a read buffer


class Stream:
    """Buffered reads from a socket; EOFError when the peer closed before enough came.
    `raw` keeps every byte received, for assertions on exactly what was sent."""

    def __init__(self, sock: socket.socket, buf: bytes = b""):
        self.sock = sock
        self.buf = bytearray(buf)
        self.raw = bytearray(buf)

    def more(self, most: int = 256 * 1024) -> None:
        data = self.sock.recv(most)
        if not data:
            raise EOFError(f"connection closed; unparsed: {bytes(self.buf[:300])!r}")
        self.buf += data
        self.raw += data

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    send = sendall

    def until(self, sep: bytes) -> bytes:
        """Everything up to and including `sep`."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            start = max(0, len(self.buf) - len(sep) + 1)
            self.more()

    def line(self) -> bytes:
        """One line, with its CRLF."""
        return self.until(b"\r\n")

    def head(self) -> bytes:
        """A message head, with its blank line."""
        return self.until(b"\r\n\r\n")

    def read_some(self, most: int) -> bytes:
        if not self.buf:
            self.more(most)
        out = bytes(self.buf[:most])
        del self.buf[:most]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def hash_exact(self, n: int, sha) -> None:
        have = 0
        while have < n:
            data = self.read_some(min(256 * 1024, n - have))
            sha.update(data)
            have += len(data)

    def wait_close(self, timeout: float = 5.0) -> tuple[bool, bytes]:
        """Read until the peer closes (True) or `timeout` passes (False); returns what
        arrived meanwhile (and was buffered before)."""
        deadline = time.monotonic() + timeout
        data, self.buf = bytes(self.buf), bytearray()
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, data
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(256 * 1024)
                except socket.timeout:
                    return False, data
                except ConnectionResetError:
                    return True, data
                if not chunk:
                    return True, data
                self.raw += chunk
                data += chunk
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass

    def to_close(self, timeout: float = 5.0) -> bytes:
        """Everything until the peer closes; fails if it does not within `timeout`."""
        closed, data = self.wait_close(timeout)
        assert closed, f"the connection was not closed within {timeout}s; got {len(data)} bytes"
        return data

    def until_eof(self) -> bytes:
        """Everything until the peer closes (blocking, at the socket's own timeout)."""
        out = bytes(self.buf)
        self.buf.clear()
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                return out
            self.raw += data
            out += data

    read_to_eof = until_eof

    def chunked(self) -> tuple[bytes, list[tuple[str, str]]]:
        """A chunked body and its trailer fields."""
        parts = []
        while True:
            size = int(self.line().split(b";")[0].strip(), 16)
            if size == 0:
                break
            parts.append(self.exact(size))
            assert self.exact(2) == b"\r\n", "chunk not followed by CRLF"
        trailers = []
        while True:
            raw = self.line()
            if raw == b"\r\n":
                break
            name, _, value = raw[:-2].partition(b":")
            trailers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return b"".join(parts), trailers

    def response(self, method: str = "GET", interims: bool = False,
                 close_timeout: float = 5.0) -> Response:
        """The next response. With `interims`, 1xx responses other than 101 are collected
        in `.interims` and the final one is returned; otherwise a 1xx is returned as it
        is. A body with neither length nor chunking is read until the close (which must
        come within `close_timeout`). A 2xx to CONNECT has no body."""
        method = method.upper()
        seen = []
        while True:
            first, headers = parse_head(self.head())
            parts = first.split(" ", 2)
            version, status = parts[0], int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
            if interims and 100 <= status < 200 and status != 101:
                seen.append((status, headers))
                continue
            break
        r = Response(status, headers, b"", reason, version)
        r.interims = seen
        te = r.header("Transfer-Encoding")
        cl = r.one("Content-Length")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200 or \
                (method == "CONNECT" and 200 <= status < 300):
            r.framing = "none"
        elif te is not None:
            assert te.lower().replace(" ", "").endswith(",chunked") or \
                te.lower() == "chunked", te
            r.framing = "chunked"
            r.body, r.trailers = self.chunked()
        elif cl is not None:
            r.framing = "length"
            r.body = self.exact(int(cl))
        else:
            r.framing = "close"
            r.body = self.to_close(close_timeout)
        return r

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0,
            rcvbuf: int | None = None) -> socket.socket:
    """A client socket to the proxy (a small receive buffer, when asked, is set before
    the connect so that the window is small from the start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


class HTTPClient(Stream):
    """One raw client connection to the proxy: send bytes, read responses one by one
    (so pipelined and unasked-for responses are seen as they came)."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1",
                 rcvbuf: int | None = None):
        super().__init__(connect(port, host, timeout, rcvbuf))
        self.timeout = timeout

    def request(self, method: str, target: str, headers=(), body: bytes | None = None,
                host: str | None = HOST) -> None:
        self.sendall(request_bytes(method, target, headers, body, host))

    def call(self, method: str, target: str, headers=(), body: bytes | None = None,
             host: str | None = HOST) -> Response:
        self.request(method, target, headers, body, host)
        return self.response(method)

    def get(self, target: str, *headers: tuple[str, str]) -> Response:
        return self.call("GET", target, headers)

    def closed_by_proxy(self, timeout: float = 3.0) -> bool:
        return self.wait_close(timeout)[0]

    def closes(self, timeout: float = 10.0) -> bool:
        """Whether the proxy closes the connection (within `timeout`) without sending
        anything more."""
        closed, extra = self.wait_close(timeout)
        return closed and not extra


def message(*lines: str, body: bytes = b"") -> bytes:
    """A message head written line by line (CRLFs and the blank line added), then `body`."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ask(port: int, data: bytes, method: str = "GET", timeout: float = 10.0) -> Response:
    """Send raw bytes on a new connection; the first response (the connection is then
    closed by us, whatever the proxy would do)."""
    with HTTPClient(port, timeout=timeout) as c:
        c.sendall(data)
        return c.response(method)


def exchange(port: int, data: bytes, method: str = "GET", wait: float = 5.0
             ) -> tuple[Response, bool, bytes]:
    """Send raw bytes on a new connection; return the response, whether the proxy then
    closed the connection (within `wait` seconds), and any bytes that followed."""
    with HTTPClient(port) as c:
        c.sendall(data)
        r = c.response(method)
        closed, extra = c.wait_close(wait)
        return r, closed, extra


# ---------------------------------------------------------------------------
# http.client


class Session:
    """One keep-alive http.client connection to the proxy."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = HOST,
                 context: ssl.SSLContext | None = None):
        if context is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        else:
            self.conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                    context=context)
        self.conn.connect()
        self.sock = self.conn.sock        # to tell whether the connection was replaced
        self.host = host

    def request(self, method: str, path: str = "/", headers=None, body: bytes | None = None
                ) -> Response:
        h = {"Host": self.host}
        h.update(headers or {})
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        return Response(r.status, r.getheaders(), data, r.reason)

    def get(self, path: str = "/", headers=None, method: str = "GET") -> Response:
        return self.request(method, path, headers)

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fetch(port: int, path: str = "/", headers=None, *, host: str | None = HOST,
          method: str = "GET", body: bytes | None = None, timeout: float = 15.0,
          address: str = "127.0.0.1") -> Response:
    """One request on a connection of its own, through http.client; the target is sent
    as given, `headers` is a dict or [(name, value)] (sent in order, repeats kept)."""
    c = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            c.putheader("Host", host)
        for name, value in (headers.items() if isinstance(headers, dict) else headers or ()):
            c.putheader(name, value)
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        data = r.read()
        return Response(r.status, r.getheaders(), data, r.reason)
    finally:
        c.close()


# ---------------------------------------------------------------------------
# certificates


class PKI:
    """A trustme CA (its certificate in ca.pem) and leaves NAME.pem / NAME.key issued
    by it (or by another CA) into `folder`."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))

    def leaf(self, name: str, *identities: str, ca=None, **kw) -> "PKI":
        cert = (ca or self.ca).issue_cert(*identities, common_name=identities[0], **kw)
        cert.cert_chain_pems[0].write_to_path(str(self.dir / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(self.dir / f"{name}.key"))
        return self

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def client_context(self, trust: bool = True) -> ssl.SSLContext:
        """A client context that trusts ca.pem (or nothing more than the default)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if trust:
            ctx.load_verify_locations(self.path("ca.pem"))
        return ctx

    def server_context(self, name: str) -> ssl.SSLContext:
        """A server context presenting leaf `name`."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.path(f"{name}.pem"), self.path(f"{name}.key"))
        return ctx

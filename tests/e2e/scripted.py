"""Scripted backends that count what they see, and the lab that starts them.

A `Tracker` keeps every request a scripted backend received (with the connection it
came on and its place there); behaviours (`serve`, `kill_second_request`,
`close_idle_after`, ...) script how a backend answers or misbehaves, one thread per
accepted connection. Shared by the pool, backend-safety and outage tests.
"""

from __future__ import annotations

import random
import socket
import threading
import time


from clients import HTTPClient, Response
from harness import Echo, Lab as BaseLab, Proxy, RawBackend, basic_config

REASONS = {100: "Continue", 200: "OK", 401: "Unauthorized", 404: "Not Found"}


# ---------------------------------------------------------------------------
# scripted backends


class BReq:
    """A request as a scripted backend received it."""

    def __init__(self, method: str, target: str, headers: list, cid: int, nth: int):
        self.method = method
        self.target = target
        self.headers = headers            # [(name, value)] as received
        self.cid = cid                    # which backend connection (1, 2, ... by accept)
        self.nth = nth                    # the how-manieth request on that connection
        self.body: bytes | None = None    # None: not read (yet)

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def __repr__(self):
        return f"<BReq {self.method} {self.target} conn={self.cid}#{self.nth}>"


class Wire:
    """One accepted backend connection: read requests, write responses."""

    def __init__(self, sock: socket.socket, cid: int, tracker: "Tracker"):
        self.sock = sock
        self.cid = cid
        self.tracker = tracker
        self.buf = b""
        self.n = 0

    def _fill(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)          # socket.timeout propagates
        if not chunk:
            raise EOFError
        self.buf += chunk

    def head(self, timeout: float | None = 30.0) -> BReq | None:
        """The next request head, or None when the proxy closed the connection.
        Raises socket.timeout when no request came within `timeout`."""
        try:
            while b"\r\n\r\n" not in self.buf:
                self._fill(timeout)
        except (EOFError, ConnectionResetError):
            return None
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        self.n += 1
        req = BReq(method, target, headers, self.cid, self.n)
        self.tracker.record(req)
        return req

    def _take(self, n: int, timeout: float) -> bytes:
        while len(self.buf) < n:
            self._fill(timeout)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self, timeout: float) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill(timeout)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def body(self, req: BReq, timeout: float = 30.0) -> bytes:
        te = (req.header("transfer-encoding") or "").lower()
        cl = req.header("content-length")
        data = b""
        if "chunked" in te:
            while True:
                size = int(self._line(timeout).split(b";")[0], 16)
                if not size:
                    while self._line(timeout):
                        pass
                    break
                data += self._take(size, timeout)
                self._line(timeout)
        elif cl is not None:
            data = self._take(int(cl), timeout)
        req.body = data
        return data

    def request(self, timeout: float | None = 30.0, answer_100: bool = True) -> BReq | None:
        """A whole request; an `Expect: 100-continue` is answered first if asked."""
        req = self.head(timeout)
        if req is None:
            return None
        if answer_100 and (req.header("expect") or "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            self.body(req)
        except (EOFError, ConnectionResetError):
            return None
        return req

    def reply(self, req: BReq, status: int = 200, body: bytes = b"ok",
              headers=(), close: bool = False) -> None:
        hdrs = [("X-Conn", str(self.cid)), ("X-Nth", str(req.nth))]
        if req.header("x-seq") is not None:
            hdrs.append(("X-Seq", req.header("x-seq")))
        hdrs += list(headers)
        if close:
            hdrs.append(("Connection", "close"))
        hdrs.append(("Content-Length", str(len(body))))
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Whatever')}\r\n" + \
            "".join(f"{n}: {v}\r\n" for n, v in hdrs) + "\r\n"
        self.sock.sendall(head.encode("latin-1") + (b"" if req.method == "HEAD" else body))

    def wait_eof(self, timeout: float = 30.0) -> bool:
        """Read (and drop) until the proxy closes: True, or `timeout` passes: False."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self._fill(left)
            except (EOFError, ConnectionResetError):
                return True
            except socket.timeout:
                return False


class Tracker:
    """Counts one backend's connections and keeps every request it received."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.closed: set[int] = set()       # connections whose handler has finished
        self.requests: list[BReq] = []
        self.wires: dict[int, Wire] = {}

    def handler(self, behaviour):
        def run(sock):
            with self.lock:
                self.accepted += 1
                cid = self.accepted
                self.open += 1
                self.max_open = max(self.max_open, self.open)
            wire = Wire(sock, cid, self)
            self.wires[cid] = wire
            try:
                behaviour(wire)
            finally:
                with self.lock:
                    self.open -= 1
                    self.closed.add(cid)
        return run

    def record(self, req: BReq) -> None:
        with self.lock:
            self.requests.append(req)

    def seen(self, seq: str) -> list[BReq]:
        """The requests carrying `X-Seq: seq` (one per attempt)."""
        with self.lock:
            return [r for r in self.requests if r.header("x-seq") == seq]

    def wait(self, predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()


def serve(delay: float = 0.0, answer_100: bool = True):
    """A plain keep-alive backend: answers every request with 200 (after `delay`, or
    the request's X-Delay header) and keeps the connection until the proxy closes it."""
    def behaviour(w: Wire):
        while True:
            req = w.request(answer_100=answer_100)
            if req is None:
                return
            pause = float(req.header("x-delay") or delay)
            if pause:
                time.sleep(pause)
            w.reply(req)
    return behaviour


def kill_second_request(how: str = "close"):
    """Answers the first request on each connection; on the second one (a kept-alive
    connection being reused) it behaves like a server that has just timed the
    connection out: "close" reads the head and closes without a byte, "partial" sends
    the start of a status line first, "silent" reads the head and answers nothing
    (not even 100 Continue) until the proxy gives up on the connection."""
    def behaviour(w: Wire):
        req = w.request()
        if req is None:
            return
        w.reply(req)
        req = w.head()
        if req is None:
            return
        if how == "partial":
            w.sock.sendall(b"HTTP/1.1 20")
        elif how == "silent":
            w.wait_eof(30.0)
    return behaviour


def close_idle_after(low: float, high: float, answer_100: bool = True, race: float = 0.0):
    """Closes a connection that stays idle for a random `low`..`high` seconds after a
    response, like a backend with a very short keep-alive timeout. With `race` > 0,
    that fraction of requests arriving on a kept-alive connection find it closing:
    the head is read and the connection closed without a byte (the close and the
    request crossed on the wire)."""
    rnd = random.Random(7)

    def behaviour(w: Wire):
        while True:
            try:
                req = w.head(timeout=rnd.uniform(low, high) if w.n else 30.0)
            except socket.timeout:
                return                       # idle too long: close (RawBackend closes)
            if req is None:
                return
            if req.nth > 1 and rnd.random() < race:
                return
            if answer_100 and (req.header("expect") or "").lower() == "100-continue":
                w.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                w.body(req)
            except (EOFError, ConnectionResetError):
                return
            w.reply(req)
    return behaviour


class Unaccepting:
    """A backend that never accepts: listening with backlog 0, its accept queue already
    filled by connections of our own, so the kernel drops further SYNs and a connect
    neither succeeds nor is refused: it times out."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.fillers = []
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.1)

    def connect_hangs(self) -> bool:
        """The set-up check: a connect of our own neither succeeds nor is refused."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.3).close()
            return False
        except socket.timeout:
            return True
        except OSError:
            return False

    def stop(self):
        for s in self.fillers + [self.sock]:
            s.close()


def one(port: int, method: str, path: str, headers=(), body: bytes | None = None
        ) -> Response:
    with HTTPClient(port, timeout=15.0) as c:
        return c.call(method, path, headers, body)


def timed(fn, *args, **kw):
    t = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t


def in_threads(n: int, target) -> list:
    """Run target(i) in n threads started together; returns their results (or the
    exception each raised)."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(10)
            results[i] = target(i)
        except Exception as e:          # noqa: BLE001 - reported by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# ---------------------------------------------------------------------------
# configuration and the per-test set-up


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def route(path: str, url: str, **params) -> str:
    lines = ["[[vhost.route]]", f'path = "{path}"', f'url = "{url}"']
    lines += [f"{k} = {_toml(v)}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


class Lab(BaseLab):
    """What one test starts (see harness.Lab): backends that count what they see."""

    def backend(self, behaviour, listen: bool = True) -> RawBackend:
        """A Tracker-counted backend; with listen=False it refuses connections until
        its start()."""
        tracker = Tracker()
        b = self.raw(tracker.handler(behaviour), listen=listen)
        b.tracker = tracker
        return b

    def late(self, behaviour) -> RawBackend:
        return self.backend(behaviour, listen=False)

    def unaccepting(self) -> Unaccepting:
        return self.add(Unaccepting())

    def echo(self) -> Echo:
        return super().echo("pool-echo")

    def proxy(self, routes: str, extra: str = "", server: str = "",
              name: str = "proxy.toml") -> Proxy:
        return super().proxy(lambda ports: basic_config(routes, ports[0], extra=extra,
                                                        server=server), name=name)


def lab_fixture(tmp_path):
    """The body of a test module's `lab` fixture: a Lab, closed after the test."""
    lab = Lab(tmp_path)
    yield lab
    lab.close()

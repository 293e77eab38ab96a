"""Backend connections kept for reuse: one pool per worker (a backend URL and its params).

Owns connecting (lazily, on demand), the mod_proxy worker limits (`max` connections at
once, `acquire` wait for a free one, idle ones above `smax` closed once older than
`ttl`, `disablereuse`, `keepalive`), the idle list (most recently used first, so a
quiet period lets the oldest age out), and dropping connections the backend closed
while idle, so a dead connection is never handed out: the reactor notices most
closes at once, and for requests that must not be sent twice a connection is peeked
at before reuse, for a FIN the reactor has not read yet (Apache's
ap_proxy_is_socket_connected). An exchange asking for a
connection is told `backend_connected(conn, reused)` or `backend_connect_failed(why)`.
"""

from __future__ import annotations

import socket
from collections import deque

from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout
from twisted.internet.protocol import ClientFactory

from twisted.logger import Logger

from .outages import Outage, summary_interval
from .wire.backend import BackendConnection


log = Logger(namespace="twistproxy")


class _Connect(ClientFactory):
    """One connection attempt on behalf of one exchange."""

    noisy = False

    def __init__(self, pool, exchange):
        self.pool = pool
        self.exchange = exchange

    def buildProtocol(self, addr):
        conn = _PooledConnection(self.pool, self.exchange)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector, reason):
        pool = self.pool
        pool.failed += 1
        pool.opening -= 1
        if isinstance(reason.value, ConnectTimeout):
            why = "connect timed out"
        elif isinstance(reason.value, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = reason.getErrorMessage()
        pool.connect_failed(why)
        self.exchange.backend_connect_failed(why)
        pool._serve_waiters()


class _PooledConnection(BackendConnection):
    def __init__(self, pool, exchange):
        super().__init__(pool)
        self._waiting = exchange

    def connectionMade(self):
        super().connectionMade()
        self.sni = getattr(self._waiting, "sni", None)
        pool = self.pool
        pool.opening -= 1
        pool.open += 1
        pool.created += 1
        pool.error_time = 0.0
        if pool.keepalive:
            try:
                self.transport.setTcpKeepAlive(True)
            except Exception:
                pass
        ex, self._waiting = self._waiting, None
        ex.backend_connected(self, False)


_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)   # Windows has none; the socket is non-blocking


def still_open(conn: BackendConnection) -> bool:
    """A non-blocking peek at an idle connection's socket: False when the backend has
    closed or reset it, or sent bytes nobody asked for. Over TLS a pending record may
    be a session ticket (application data in TLS 1.3), so only an alert record (0x15,
    close_notify before the FIN) counts."""
    sock = getattr(conn.transport, "socket", None)    # TLS wrappers forward it
    if sock is None:
        return True                     # not a socket (tests): nothing to peek at
    try:
        data = sock.recv(1, _PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if not data:
        return False
    return getattr(conn.pool, "tls", False) and data[0] != 0x15


class Pool:
    """Connections to one backend worker."""

    def __init__(self, reactor, host: str, port: int, tls: bool = False,
                 connect_timeout: float = 60.0, reuse: bool = True, tls_options=None,
                 max: int | None = None, smax: int | None = None, ttl: float | None = None,
                 acquire: float | None = None, keepalive: bool = False, name: str = "",
                 timeout: float = 60.0, ping: float = 0.0, params=None,
                 upgrades: frozenset = frozenset(), retry: float = 60.0,
                 ignore_errors: bool = True):
        self.reactor = reactor
        self.name = name or f"{host}:{port}"
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.reuse = reuse
        self.tls_options = tls_options
        self.max = max
        self.smax = smax if smax is not None else max
        self.ttl = ttl
        self.acquire_timeout = acquire
        self.keepalive = keepalive
        self.timeout = timeout            # backend silence before 504 (worker `timeout`)
        self.ping = ping
        self.params = params              # the WorkerParams it was defined with
        self.upgrades = upgrades          # protocols a client may Upgrade to here
        default = 443 if tls else 80
        shown = f"[{host}]" if ":" in host else host
        self.hostport = (shown if port == default else f"{shown}:{port}").encode("idna")
        self.idle: deque[BackendConnection] = deque()     # oldest left, newest right
        self.waiters: deque = deque()                     # [exchange, timer] in order
        self.open = 0          # established, idle or busy
        self.opening = 0       # connects under way
        self.created = 0
        self.reused = 0
        self.failed = 0
        self.stale = 0         # idle connections found closed by the peek before reuse
        # Apache's error state for a standalone worker, which is off by default there
        # (implicit status I): with ignore_errors false, a refused or timed-out connect
        # answers 503 at once for `retry` seconds, without connecting
        self.retry = retry
        self.ignore_errors = ignore_errors or retry <= 0
        self.error_time = 0.0
        self.error_cause = ""
        self.outage = Outage(f"backend {self.name}", summary_interval(retry),
                             reactor.seconds, reactor.callLater)

    # -- counts --------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        return self.open - len(self.idle)

    def stats(self) -> dict:
        return {"open": self.open, "idle": len(self.idle), "busy": self.busy,
                "opening": self.opening, "waiting": len(self.waiters),
                "created": self.created, "reused": self.reused, "failed": self.failed,
                "stale": self.stale}

    def __repr__(self):
        counts = " ".join(f"{k}={v}" for k, v in self.stats().items())
        return f"<Pool {self.name} {counts}>"

    # -- handing out ------------------------------------------------------------------------

    def acquire(self, exchange, sni: str | None = None, check_open: bool = False) -> None:
        """`sni`: the TLS server name when it is not the backend's own host
        (preserve_host); connections are only reused for the same name. With
        `check_open`, an idle connection is peeked at before it is handed out."""
        exchange.sni = sni
        if self.error_time and self.reactor.seconds() < self.error_time + self.retry:
            exchange.backend_connect_failed(f"in error state ({self.error_cause}); "
                                            f"tried again {self.retry:g}s after it began")
            return
        conn = self._take_idle(sni, check_open)
        if conn is not None:
            self.reused += 1
            exchange.backend_connected(conn, True)
        elif self.max is None or self.open + self.opening < self.max:
            self._connect(exchange)
        else:
            timer = None
            if self.acquire_timeout is not None:
                timer = self.reactor.callLater(self.acquire_timeout, self._waited_too_long,
                                               exchange)
            self.waiters.append([exchange, timer, check_open])

    def connect_failed(self, why: str) -> None:
        now = self.reactor.seconds()
        if not self.ignore_errors and (not self.error_time or
                                       now >= self.error_time + self.retry):
            self.error_time = now              # a new error period, also after the last
            self.error_cause = why
            log.warn("backend {name}: in error state for {retry:g}s: {why}",
                     name=self.name, retry=self.retry, why=why)

    def acquire_fresh(self, exchange) -> None:
        """A new connection, never an idle one (after a stale keep-alive failure).
        It may exceed `max` by the one it replaces, which is closing."""
        self._connect(exchange)

    def cancel(self, exchange) -> None:
        """The exchange no longer wants a connection (its client went away)."""
        for entry in self.waiters:
            if entry[0] is exchange:
                self.waiters.remove(entry)
                if entry[1] is not None and entry[1].active():
                    entry[1].cancel()
                return

    def _take_idle(self, sni: str | None = None,
                   check_open: bool = False) -> BackendConnection | None:
        idle = self.idle
        ttl = self.ttl
        now = self.reactor.seconds() if ttl is not None else 0.0
        if idle and idle[-1].sni != sni:
            # another TLS server name: look further back, leave the others idle
            for conn in reversed(idle):
                if conn.sni == sni:
                    idle.remove(conn)
                    idle.append(conn)
                    break
            else:
                return None
        while idle:
            conn = idle.pop()
            if not (conn.connected_ok and conn.reusable):
                continue
            if ttl is not None and now - conn.idle_since > ttl:
                conn.reusable = False
                conn.hang_up()          # too old to trust: Apache's ttl
                continue
            if check_open and not still_open(conn):
                self.stale += 1
                conn.reusable = False
                conn.hang_up()
                continue
            return conn
        return None

    def _connect(self, exchange) -> None:
        self.opening += 1
        factory = _Connect(self, exchange)
        if self.tls:
            sni = getattr(exchange, "sni", None) or self.host
            self.reactor.connectSSL(self.host, self.port, factory, self.tls_options(sni),
                                    timeout=self.connect_timeout)
        else:
            self.reactor.connectTCP(self.host, self.port, factory, timeout=self.connect_timeout)

    def _waited_too_long(self, exchange) -> None:
        for entry in self.waiters:
            if entry[0] is exchange:
                self.waiters.remove(entry)
                break
        exchange.backend_connect_failed(
            f"no free connection within acquire={self.acquire_timeout:g}s "
            f"(max={self.max} busy)")

    def _serve_waiters(self) -> None:
        """A connection slot or an idle connection became free: the first waiter gets it."""
        while self.waiters:
            exchange, timer, check_open = self.waiters[0]
            conn = self._take_idle(getattr(exchange, "sni", None), check_open)
            if conn is None and self.open + self.opening >= (self.max or 0):
                return
            self.waiters.popleft()
            if timer is not None and timer.active():
                timer.cancel()
            if conn is not None:
                self.reused += 1
                exchange.backend_connected(conn, True)
            else:
                self._connect(exchange)

    # -- giving back ------------------------------------------------------------------------

    def release(self, conn: BackendConnection) -> None:
        """The exchange is done with it: keep it for the next request, or close it."""
        conn.exchange = None
        if conn.paused:
            conn.resume()
        if self.reuse and conn.reusable and conn.connected_ok:
            conn.idle_since = self.reactor.seconds()
            self.idle.append(conn)
        else:
            conn.reusable = False
            conn.hang_up()
        if self.waiters:
            self._serve_waiters()

    def lost(self, conn: BackendConnection) -> None:
        """The connection closed (either side): it no longer counts."""
        self.open -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.waiters:
            self._serve_waiters()

    def sweep(self) -> None:
        """Pool maintenance: idle connections above `smax` older than `ttl` are closed."""
        if self.ttl is None:
            return
        keep = self.smax if self.smax is not None else 0
        now = self.reactor.seconds()
        while len(self.idle) > keep and now - self.idle[0].idle_since > self.ttl:
            conn = self.idle.popleft()
            conn.reusable = False
            conn.hang_up()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, deque()
        for conn in idle:
            conn.reusable = False
            conn.hang_up()

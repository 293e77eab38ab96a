"""Backend connections kept for reuse, one pool per backend origin.

Owns connecting (lazily, on demand), the idle list (most recently used first, so a
quiet period lets the oldest ones age out), and dropping connections the backend
closed while idle, so a dead connection is never handed out. The exchange that asks
for a connection is told `backend_connected(conn)` or `backend_connect_failed(why)`.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError, TimeoutError as ConnectTimeout
from twisted.internet.protocol import ClientFactory

from .wire.backend import BackendConnection


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
        self.pool.failed += 1
        self.pool.opening -= 1
        if isinstance(reason.value, ConnectTimeout):
            why = "connect timed out"
        elif isinstance(reason.value, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = reason.getErrorMessage()
        self.exchange.backend_connect_failed(why)


class _PooledConnection(BackendConnection):
    def __init__(self, pool, exchange):
        super().__init__(pool)
        self._waiting = exchange

    def connectionMade(self):
        super().connectionMade()
        pool = self.pool
        pool.opening -= 1
        pool.open += 1
        pool.created += 1
        ex, self._waiting = self._waiting, None
        ex.backend_connected(self, False)


class Pool:
    """Connections to one backend (scheme, host, port)."""

    def __init__(self, reactor, host: str, port: int, tls: bool = False,
                 connect_timeout: float = 60.0, reuse: bool = True, tls_options=None):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.reuse = reuse
        self.tls_options = tls_options
        default = 443 if tls else 80
        shown = f"[{host}]" if ":" in host else host
        self.hostport = (shown if port == default else f"{shown}:{port}").encode("idna")
        self.idle: list[BackendConnection] = []
        self.open = 0
        self.opening = 0
        self.created = 0
        self.reused = 0
        self.failed = 0

    def __repr__(self):
        return (f"<Pool {self.host}:{self.port} open={self.open} idle={len(self.idle)} "
                f"busy={self.open - len(self.idle)} created={self.created} "
                f"reused={self.reused} failed={self.failed}>")

    def acquire(self, exchange) -> None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.connected_ok and conn.reusable:
                self.reused += 1
                exchange.backend_connected(conn, True)
                return
        self.acquire_fresh(exchange)

    def acquire_fresh(self, exchange) -> None:
        """A new connection, never an idle one (after a stale keep-alive failure)."""
        self.opening += 1
        factory = _Connect(self, exchange)
        if self.tls:
            self.reactor.connectSSL(self.host, self.port, factory, self.tls_options(),
                                    timeout=self.connect_timeout)
        else:
            self.reactor.connectTCP(self.host, self.port, factory, timeout=self.connect_timeout)

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

    def lost(self, conn: BackendConnection) -> None:
        self.open -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.reusable = False
            conn.hang_up()

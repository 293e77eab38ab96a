"""A byte tunnel between a client connection and a backend connection.

Owns what happens once an upgrade (WebSocket's 101) or a CONNECT has succeeded: bytes
are copied both ways without being looked at, each side's full transport pauses the
other side's reading (never a buffer), one side's FIN is passed on as a half-close,
either side's close closes the other, and an idle tunnel is closed after
`tunnel_timeout`. The two protocols hand their bytes and events to it; it plugs in
where their exchange was, so their flow-control producers drive it unchanged.
"""

from __future__ import annotations

from twisted.logger import Logger

from ..wire.deadline import Deadline
from ..wire.direct import writer_for

log = Logger(namespace="twistproxy.tunnel")


class Tunnel:
    __slots__ = ("client", "backend", "timeout", "deadline", "last_activity", "clock",
                 "up", "down", "closed", "client_eof", "backend_eof", "on_close", "where",
                 "request", "_to_client", "_to_backend")

    def __init__(self, reactor, client, backend, timeout: float, where: str = "",
                 on_close=None):
        self.client = client            # a ClientConnection
        self.backend = backend          # a protocol with .transport (BackendConnection)
        self.timeout = timeout
        self.clock = reactor
        self.deadline = Deadline(reactor)
        self.last_activity = reactor.seconds()
        self.up = 0                     # bytes client -> backend
        self.down = 0                   # bytes backend -> client
        self.closed = False
        self.client_eof = False
        self.backend_eof = False
        self.on_close = on_close
        self.where = where
        self.request = None             # logged when the tunnel closes, like Apache
        # straight to the socket when nothing is queued, as the HTTP exchange wrote
        self._to_client = writer_for(client.transport)
        self._to_backend = writer_for(backend.transport)

    def start(self, from_client: bytes = b"", from_backend: bytes = b"") -> None:
        """Bytes either side sent past the handshake go first."""
        client_t, backend_t = self.client.transport, self.backend.transport
        client_t.resumeProducing()
        backend_t.resumeProducing()
        if from_backend:
            self.from_backend(from_backend)
        if from_client:
            self.from_client(from_client)
        self.deadline.set(self.timeout, self._idle_check)

    # -- bytes ---------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.closed:
            return
        self.up += len(data)
        self.last_activity = self.clock.seconds()
        self._to_backend(data)

    def from_backend(self, data: bytes) -> None:
        if self.closed:
            return
        self.down += len(data)
        self.last_activity = self.clock.seconds()
        self._to_client(data)

    # -- flow control: each side's full transport pauses the other side ------------------
    # (called by the client's _ResponseFlow and the backend's RequestFlow producers)

    def client_paused(self) -> None:
        if not self.closed:
            self.backend.transport.pauseProducing()

    def client_resumed(self) -> None:
        if not self.closed:
            self.backend.transport.resumeProducing()

    def backend_full(self) -> None:
        if not self.closed:
            self.client.transport.pauseProducing()

    def backend_drained(self) -> None:
        if not self.closed:
            self.client.transport.resumeProducing()

    # -- endings --------------------------------------------------------------------------

    def client_half_closed(self) -> None:
        """The client sent FIN: pass it on, keep the other direction open."""
        self.client_eof = True
        if self.backend_eof:
            self.close()
        else:
            _half_close(self.backend.transport)

    def backend_half_closed(self) -> None:
        self.backend_eof = True
        if self.client_eof:
            self.close()
        else:
            _half_close(self.client.transport)

    def client_gone(self) -> None:
        self.close()

    def backend_gone(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline.cancel()
        req = self.request
        if req is not None:
            # one access-log line for the whole tunnel: its duration, the bytes sent down.
            # Before the close: a half-closed transport's loseConnection() ends it at
            # once, and the client connection logs what it has not seen logged
            req.sent = self.down
            self.client.log(req)
        for t in (self.client.transport, self.backend.transport):
            t.unregisterProducer()
            t.loseConnection()
        if self.on_close is not None:
            self.on_close(self)

    def _idle_check(self) -> None:
        if self.closed:
            return
        idle = self.clock.seconds() - self.last_activity
        if idle < self.timeout:
            self.deadline.set(self.timeout - idle, self._idle_check)
            return
        log.info("{where}: tunnel idle for {t:g}s: closing ({up} bytes up, {down} down)",
                 where=self.where, t=self.timeout, up=self.up, down=self.down)
        self.close()


def _half_close(transport) -> None:
    # nothing more will be written this way, so its flow-control producer can go; while
    # Twisted held it paused, a drained buffer would resume it instead of sending FIN
    transport.unregisterProducer()
    try:
        transport.loseWriteConnection()
    except (AttributeError, NotImplementedError):
        transport.loseConnection()

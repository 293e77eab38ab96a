"""The backend-facing HTTP/1.1 connection: one request at a time, response parsed strictly.

Owns a TCP (or TLS) connection to one backend: writing a request head, parsing the
response with httptools (llhttp), telling the current exchange what arrived, and
deciding whether the connection can be reused. It never pipelines, so any byte that
arrives while no request is outstanding means the connection cannot be trusted.
What the exchange is told: backend_interim, backend_head, backend_body,
backend_complete, backend_invalid, backend_lost.
"""

from __future__ import annotations

import httptools
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..headers import transfer_codings
from .deadline import Deadline
from .direct import writer_for

_BODYLESS_STATUS = (204, 304)
_CONNECTION_AUTH = (b"ntlm", b"negotiate")     # schemes that authenticate a connection


@implementer(IPushProducer)
class RequestFlow:
    """Registered on the backend transport: its buffer filling pauses the client's reading."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def pauseProducing(self):
        ex = self.conn.exchange
        if ex is not None:
            ex.backend_full()

    def resumeProducing(self):
        ex = self.conn.exchange
        if ex is not None:
            ex.backend_drained()

    def stopProducing(self):
        pass


class BackendConnection(Protocol):
    def __init__(self, pool):
        self.pool = pool
        self.tunnel = None          # once a 101 made this connection a byte tunnel
        self.upgrade_requested = False
        self._switching = False
        self.sni = None             # the TLS server name it was opened with, if not the host
        self.deadline = None
        self.exchange = None
        self.uses = 0
        self.reusable = True
        self.connected_ok = False
        self.idle_since = 0.0
        self.paused = False
        self.got_bytes = False
        # the current response offers NTLM/Negotiate: the connection gets authenticated
        self.offers_connection_auth = False
        self._done = True
        self._complete_pending = False
        self._head_method = False
        self._close_delimited = False
        self._in_body = False
        self._headers: list = []
        self._trailers: list | None = None
        self._reason = b""
        self._interim = False
        # llhttp is at a message boundary after a complete response, so the next
        # request's response can go to the same parser (not after HEAD: see below)
        self._parser_ready = False

    # -- connection life -------------------------------------------------------

    def connectionMade(self):
        self.connected_ok = True
        self.deadline = Deadline(self.pool.reactor)
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.transport.registerProducer(RequestFlow(self), True)
        self._write = writer_for(self.transport)

    def connectionLost(self, reason=None):
        self.connected_ok = False
        if self.deadline is not None:
            self.deadline.cancel()
        if self.tunnel is not None:
            self.exchange = None
            self.tunnel.backend_gone()
            self.pool.lost(self)
            return
        self.reusable = False
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            if self._in_body and self._close_delimited and not self._done:
                self._done = True
                ex.backend_complete(self, None)      # a body delimited by the close
            else:
                ex.backend_lost(self, reason)
        self.pool.lost(self)

    # -- requests ----------------------------------------------------------------

    def begin(self, exchange, head: bytes, is_head: bool, upgrade: bool = False) -> None:
        """Send a request head; the exchange then streams the body with write()."""
        self.exchange = exchange
        self.upgrade_requested = upgrade
        self._switching = False
        self.uses += 1
        self.got_bytes = False
        self._done = False
        self._head_method = is_head
        self._close_delimited = False
        self._in_body = False
        if not self._parser_ready:
            self.parser = httptools.HttpResponseParser(self)
        self._parser_ready = False
        self.write(head)

    def write(self, data: bytes) -> None:
        self._write(data)

    def pause(self):
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resume(self):
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def close(self):
        self.reusable = False
        self.exchange = None
        self.hang_up()

    def hang_up(self) -> None:
        """Close once buffered data is out; unregister first, or a paused producer
        would be resumed by the drained buffer instead of the connection closing."""
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def readConnectionLost(self):
        """Half-close (only in tunnel mode, where this protocol provides it)."""
        if self.tunnel is not None:
            self.tunnel.backend_half_closed()

    def writeConnectionLost(self):
        pass

    def dataReceived(self, data: bytes):
        if self.tunnel is not None:
            self.tunnel.from_backend(data)
            return
        ex = self.exchange
        if ex is None or self._done:
            # nothing was asked: a backend talking out of turn cannot be reused
            self.reusable = False
            self.hang_up()
            return
        self.got_bytes = True
        client = ex.conn
        client.cork()            # what this read produces goes out in one send
        try:
            self._feed(ex, data)
        finally:
            client.uncork()

    def _feed(self, ex, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self._switching:
                # 101: the rest of this read already belongs to the other protocol
                self._done = True
                self.reusable = False
                self.exchange = None
                ex.backend_upgraded(self, self._reason, self._headers, data[e.args[0]:])
                return
            if not self._complete_pending:
                self.reusable = False
                self._done = True
                self.exchange = None
                ex.backend_invalid(self, "a 101 response or upgrade that was not asked for")
                return
        except httptools.HttpParserError as e:
            self.reusable = False
            if not self._complete_pending:
                self._done = True
                self.exchange = None
                why = "a 101 Switching Protocols that was not asked for" \
                    if isinstance(e.__context__, _Unexpected101) else f"invalid response: {e}"
                ex.backend_invalid(self, why)
                return
        if self._complete_pending:
            self._complete_pending = False
            self.exchange = None
            ex.backend_complete(self, self._trailers)

    # httptools callbacks

    def on_message_begin(self):
        if self._done:
            self.reusable = False
            return
        self._headers = []
        self._trailers = None
        self._reason = b""
        self._in_body = False
        self.offers_connection_auth = False

    def on_status(self, rsn: bytes):
        self._reason += rsn

    def on_header(self, name: bytes, value: bytes):
        if self._done:
            return
        if self._in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self):
        if self._done:
            return
        p = self.parser
        status = p.get_status_code()
        if status == 101 and self.upgrade_requested:
            self._switching = True       # llhttp stops right after this head
            return
        if 100 <= status < 200:
            self._interim = True
            if status == 101:
                raise _Unexpected101()
            self.exchange.backend_interim(status, self._reason, self._headers)
            return
        self._interim = False
        self._in_body = True
        length = None
        chunked = False
        coded = False
        for n, v in self._headers:
            # the lengths of b"content-length" and b"transfer-encoding" spare a lower()
            k = len(n)
            if k == 14 and n.lower() == b"content-length":
                length = int(v)
            elif k == 17 and n.lower() == b"transfer-encoding":
                coded = True
            elif k == 16 and n.lower() == b"www-authenticate" and \
                    v.split(b" ", 1)[0].strip().lower() in _CONNECTION_AUTH:
                self.offers_connection_auth = True
        codings = transfer_codings(self._headers) if coded else []
        if codings:
            # llhttp has framed the body by them: chunked last, else read until close.
            # Codings before chunked (gzip, ...) describe the body and travel with it.
            # (llhttp refuses Content-Length with Transfer-Encoding.)
            chunked = codings[-1] == b"chunked"
            codings = codings[:-1] if chunked else codings
            length = None
        if not p.should_keep_alive():
            self.reusable = False
        bodyless = self._head_method or status in _BODYLESS_STATUS
        self._close_delimited = not bodyless and length is None and not chunked
        if self._close_delimited:
            self.reusable = False
        self.exchange.backend_head(status, self._reason, p.get_http_version(), self._headers,
                                   length, bodyless, b", ".join(codings))
        if self._head_method and not self._done:
            # llhttp cannot be told the response answers HEAD: end it here
            self._done = True
            self._complete_pending = True

    def on_body(self, data: bytes):
        if self._done:
            self.reusable = False       # bytes beyond what the response declared
            return
        self.exchange.backend_body(data)

    def on_message_complete(self):
        if self._done or self._switching:
            return
        if self._interim:
            self._interim = False
            return
        self._done = True
        self._complete_pending = True
        self._parser_ready = True


class _Unexpected101(Exception):
    pass

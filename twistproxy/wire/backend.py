"""The backend-facing HTTP/1.1 connection: one request at a time, response parsed strictly.

Owns a TCP (or TLS) connection to one backend: writing a request head, parsing the
response with httptools (llhttp), telling the current exchange what arrived, and
deciding whether the connection can be reused. It never pipelines, so any byte that
arrives while no request is outstanding means the connection cannot be trusted.
The response head is bounded (the worker's response_field_size per line and
response_head_size in all), since llhttp would otherwise keep an unfinished line whole.
What the exchange is told: backend_interim, backend_head, backend_body,
backend_complete, backend_invalid, backend_lost.
"""

from __future__ import annotations

from itertools import chain

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from ..config import WorkerParams
from ..headers import transfer_codings
from .deadline import Deadline
from .direct import writer_for

_BODYLESS_STATUS = (204, 304)
_CONNECTION_AUTH = (b"ntlm", b"negotiate")     # schemes that authenticate a connection
_DEFAULTS = WorkerParams()
_NOT_AT_START = b"?"      # stands for a read in which the head does not begin


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

    # slots, not a dict: past 30 attributes CPython's instance dicts lose their fast path
    __slots__ = ("_close_delimited", "_complete_pending", "_done", "_field_limit",
                 "_head_bytes", "_head_limit", "_head_method", "_headers", "_in_body",
                 "_interim", "_line", "_parser_ready", "_read", "_reason", "_switching",
                 "_trailers", "_write", "connected_ok", "deadline", "exchange",
                 "got_bytes", "idle_since", "offers_connection_auth", "parser", "paused",
                 "pool", "reusable", "sni", "tunnel", "upgrade_requested", "uses")

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
        params = pool.params or _DEFAULTS
        self._field_limit = params.response_field_size
        self._head_limit = params.response_head_size
        self._head_bytes = 0        # read since the request went out, until the final head
        self._read = b""            # the read being parsed, while it holds head bytes
        self._line = 0              # bytes of an unfinished head line, once that is measured
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
                if reason is None or reason.check(ConnectionDone):
                    ex.backend_complete(self, None)      # a body delimited by the close
                else:
                    # a reset, or TLS closed without close_notify: the body was cut
                    ex.backend_lost(self, reason)
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
        self._head_bytes = 0
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
            if self._in_body:
                self._feed(ex, data)
            else:
                self._head_bytes += len(data)
                if self._head_bytes <= self._field_limit:
                    self._feed(ex, data)     # the usual head: short, whole or not
                else:
                    self._feed_long_head(ex, data)
        finally:
            client.uncork()

    def _feed_long_head(self, ex, data: bytes) -> None:
        """More head bytes than a line may hold have been read (possibly body bytes
        after a short head). on_headers_complete then measures the head; a read that
        ends inside it is checked here, as llhttp keeps an unfinished line to itself."""
        self._read = data
        try:
            self._feed(ex, data)
        finally:
            self._read = b""         # not kept: an idle connection would hold the read
        if self._in_body or self.exchange is not ex or self._done:
            return
        nl = data.rfind(b"\n")
        if nl >= 0:
            self._line = len(data) - nl - 1
        elif self._head_bytes - len(data) > self._field_limit:
            self._line += len(data)  # measured since this regime began
        else:
            self._line = len(data)   # at least: earlier reads were not measured
        why = self._head_fault(self._line, self._head_bytes)
        if why:
            self.reusable = False
            self._done = True
            self.exchange = None
            ex.backend_invalid(self, why)

    def _head_fault(self, partial: int, size: int) -> str:
        """Why the head read so far breaks response_field_size or response_head_size.
        A line counts "Name: value" (the status line "HTTP/1.1 200 reason"); an
        unfinished one may hold the CR of its CRLF."""
        limit = self._field_limit
        if partial > limit + 1 or size > limit and (len(self._reason) + 13 > limit or any(
                len(n) + len(v) + 2 > limit for n, v in self._headers)):
            return f"a response header line longer than {limit} bytes (response_field_size)"
        if size > self._head_limit:
            return f"a response head larger than {self._head_limit} bytes (response_head_size)"
        return ""

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
                why = str(e.__context__) if isinstance(e.__context__, _Invalid) \
                    else f"invalid response: {e}"
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
        if self._read:
            self._check_head()
        p = self.parser
        status = p.get_status_code()
        if status == 101 and self.upgrade_requested:
            self._switching = True       # llhttp stops right after this head
            return
        if 100 <= status < 200:
            self._interim = True
            if self._read:
                self._read = _NOT_AT_START   # the final head after it must be measured
            if status == 101:
                raise _Invalid("a 101 Switching Protocols that was not asked for")
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
            if _chunked_again(codings, chunked):
                raise _Invalid("Transfer-Encoding %r applies chunked more than once, or not "
                               "last" % b", ".join(codings).decode("latin-1"))
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

    def _check_head(self) -> None:
        """More was read than a line may hold, but that may be body bytes after a short
        head (one search tells, when the head began this read); else measure it."""
        data = self._read
        if len(data) == self._head_bytes and \
                data.find(b"\r\n\r\n", 0, self._field_limit) >= 0:
            return
        h = self._headers
        why = self._head_fault(0, len(self._reason) + 17 + 4 * len(h) +
                               len(b"".join(chain.from_iterable(h))))
        if why:
            raise _Invalid(why)

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


def _chunked_again(codings: list, chunked: bool) -> bool:
    """Chunked named anywhere but as the single last coding (RFC 9112 §6.1: applied
    once): the client would undo it once more than llhttp did, or read it differently."""
    named = sum(1 for c in codings if c.split(b";", 1)[0].rstrip() == b"chunked")
    return named > chunked


class _Invalid(Exception):
    """Raised in a parser callback: the response is refused with this reason (502)."""

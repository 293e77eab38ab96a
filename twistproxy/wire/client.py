"""The client-facing HTTP/1.1 connection: parsing, ordering and framing of exchanges.

Owns one accepted connection: strict request parsing (httptools/llhttp), the limits
and timeouts that protect the proxy from slow or hostile clients, pipelined requests
answered in order, response framing towards the client, and the flow control of its
transport. It knows nothing about backends: `ctx.dispatch` decides what answers each
request (see handlers/reverse.py); this module only moves the bytes.
"""

from __future__ import annotations

import re
from collections import deque

import httptools
from OpenSSL.SSL import Error as TLSError
from twisted.internet.interfaces import (IHalfCloseableProtocol, IHandshakeListener,
                                         IPushProducer)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..authority import split_authority
from .deadline import Deadline
from .direct import writer_for
from .messages import error_body, reason, serialize_headers

log = Logger()

# Why reading from the client is paused (bits; reading resumes when none is set).
PAUSE_BACKEND_FULL = 1     # the backend cannot take the request body as fast
PAUSE_PIPELINE = 2         # a later request waits for the response to an earlier one
PAUSE_CLOSING = 4          # the connection is being closed

# Logged for a request that got no status line: the client closed first (nginx's 499)
STATUS_CLIENT_CLOSED = 499

# Host values already checked (authority.split_authority): most repeat
_valid_hosts: set[bytes] = set()
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
# Methods llhttp knows from RTSP only: not HTTP methods (RFC 9110 §9.1: 501)
_RTSP_METHODS = frozenset((b"DESCRIBE", b"ANNOUNCE", b"SETUP", b"PLAY", b"PAUSE",
                           b"TEARDOWN", b"GET_PARAMETER", b"SET_PARAMETER", b"REDIRECT",
                           b"RECORD", b"FLUSH"))
# a method token (RFC 9110 §5.6.2) and its space, at the start of a request line
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ").match

_CHUNK_END = b"\r\n"
# after these the request cannot be trusted to have been read right: close, as Apache
_CLOSE_AFTER = frozenset((400, 408, 413, 414, 431))
_LAST_CHUNK = b"0\r\n\r\n"


class Reject(Exception):
    """Raised inside parser callbacks to answer with `status` and close."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class Request:
    """One request as received, and the state of its response."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade",
                 "host", "has_body", "complete", "body", "exchange", "started",
                 "status", "sent", "backend", "head_sent", "chunked_out", "bodyless_out",
                 "local", "url_len", "trailers", "user", "in_body", "route", "referer",
                 "user_agent", "authorization", "logged")

    def __init__(self, started: float):
        self.started = started
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.upgrade = False
        self.host: bytes | None = None
        self.has_body = False
        self.complete = False
        self.body: list[bytes] | None = []   # body bytes before an exchange takes them
        self.exchange = None                 # what the body goes to, once dispatched
        self.status = 0
        self.sent = 0
        self.backend = ""
        self.head_sent = False
        self.chunked_out = False
        self.bodyless_out = False
        self.local: tuple | None = None       # (status, why) for a pre-decided answer
        self.url_len = 0
        self.trailers: list | None = None
        self.user = "-"
        self.in_body = False
        self.route = None                     # the route's runtime, once routed
        self.referer: bytes | None = None
        self.user_agent: bytes | None = None
        self.authorization: bytes | None = None   # NTLM/Negotiate pin the backend connection
        self.logged = False

    def header(self, lname: str) -> str | None:
        """Value of a header by lower-case name, repeated ones joined with ', '."""
        key = lname.encode("latin-1")
        values = [v for n, v in self.headers if n.lower() == key]
        return b", ".join(values).decode("latin-1") if values else None

    @property
    def request_line(self) -> bytes:
        return b"%s %s HTTP/%s" % (self.method, self.target, self.version)


@implementer(IPushProducer)
class _ResponseFlow:
    """Registered on the client transport: its buffer filling pauses the active source."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def pauseProducing(self):
        self.conn.writes_paused = True
        ex = self.conn.active_exchange()
        if ex is not None:
            ex.client_paused()

    def resumeProducing(self):
        self.conn.writes_paused = False
        ex = self.conn.active_exchange()
        if ex is not None:
            ex.client_resumed()

    def stopProducing(self):
        pass


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ClientConnection(Protocol):
    """Server side of one client connection. `ctx` supplies dispatch, limits, clock."""

    # slots, not a dict: past 30 attributes CPython's instance dicts lose their fast path
    __slots__ = ("_blank", "_chunk_head", "_corked", "_data", "_head_bytes", "_last",
                 "_linger_end", "_timer", "_timer_kind", "_upgrade_buf", "_write",
                 "closing", "ctx", "cur", "lingering", "listen", "listen_key",
                 "local_port", "parser", "paused", "peer_ip", "pinned", "queue",
                 "read_closed", "requests_served", "scheme", "tls_pending", "tunnel",
                 "upgrading", "write_closed", "writes_paused")

    def __init__(self, ctx, listen_key: str, scheme: bytes = b"http"):
        self.ctx = ctx
        self.listen_key = listen_key
        self.scheme = scheme
        self.listen = None
        self.queue: deque[Request] = deque()
        self.cur: Request | None = None
        self.paused = 0
        self.writes_paused = False
        self.closing = False
        self.lingering = False
        self.peer_ip = "-"
        self.local_port = 0
        self._timer = None               # a Deadline, once connected
        self._timer_kind = ""
        self._last: Request | None = None
        self.pinned: dict = {}            # pool -> backend connection (NTLM/Negotiate)
        self.tunnel = None                # once upgraded: bytes go to the tunnel
        self.read_closed = False          # the client sent FIN
        self.write_closed = False         # our FIN is out (lingering)
        self._linger_end = 0.0
        self.upgrading = False            # an Upgrade request awaits the backend's answer
        self._upgrade_buf: list[bytes] = []
        self._head_bytes = 0
        self._chunk_head = False
        self._blank = b""                 # CR/LF received between requests, so far
        self._data: bytes | None = None   # the chunk being parsed
        self._corked: list | None = None
        self._write = None
        self.requests_served = 0
        self.tls_pending = scheme == b"https"   # until the TLS handshake completes

    # -- connection life -------------------------------------------------------

    def connectionMade(self):
        t = self.transport
        self.peer_ip = t.getPeer().host
        self.local_port = t.getHost().port
        try:
            t.setTcpNoDelay(True)
        except Exception:
            pass
        self.parser = self._new_parser()
        self._write = writer_for(t)
        self._timer = Deadline(self.ctx.reactor)
        self.ctx.connection_made(self)
        t.registerProducer(_ResponseFlow(self), True)
        self._arm("header", self.ctx.server.header_timeout)

    def _new_parser(self):
        # any one-digit version passes llhttp: on_headers_complete answers 505 or 400
        p = httptools.HttpRequestParser(self)
        p.set_dangerous_leniencies(lenient_version=True)
        return p

    def connectionLost(self, reason=None):
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        # gone (reset, write error, abort): what is still queued is abandoned, and logged
        queue, self.queue = self.queue, deque()
        for req in queue:
            self._abandon(req)
        pinned, self.pinned = self.pinned, {}
        for bconn in pinned.values():
            bconn.close()
        if self.tls_pending and reason is not None and reason.check(TLSError):
            lc = self.ctx.listeners.get(self.listen_key)
            if lc is not None:
                lc.tls_failures += 1         # the handshake failed: a TLS error first
        self.ctx.connection_closed(self)

    def handshakeCompleted(self):
        """TLSMemoryBIOProtocol's call (IHandshakeListener), once per TLS connection."""
        self.tls_pending = False
        lc = self.ctx.listeners.get(self.listen_key)
        if lc is not None:
            lc.tls_handshakes += 1

    # -- writing ------------------------------------------------------------------------
    # While a backend's read is being relayed the connection is "corked": what the
    # exchange writes (head, body, last chunk) is joined and sent in one go.

    def out(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            self._write(data)

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked:
            self._write(corked[0] if len(corked) == 1 else b"".join(corked))

    def hang_up(self) -> None:
        """Close after what is buffered is sent. Our flow-control producer goes first:
        while Twisted holds it paused, a drained buffer resumes it instead of closing."""
        self.uncork()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- timers ------------------------------------------------------------------

    def _arm(self, kind: str, seconds: float):
        self._timer_kind = kind
        self._timer.set(seconds, self._timed_out)

    def _disarm(self):
        if self._timer is not None:
            self._timer.clear()

    def log(self, req: Request) -> None:
        """The request's one access-log line."""
        req.logged = True
        self.ctx.log_access(self, req)

    def _abandon(self, req: Request) -> None:
        """No (complete) answer will be sent: the exchange is aborted, the request logged
        with the status sent, or STATUS_CLIENT_CLOSED when none was."""
        if req.exchange is not None:
            exchange, req.exchange = req.exchange, None
            exchange.client_gone()       # a tunnel logs its request itself
        if not req.logged:
            if not req.status:
                req.status = STATUS_CLIENT_CLOSED
            self.log(req)

    def _timed_out(self):
        kind = self._timer_kind
        if kind == "linger":
            self._end_linger()
        elif kind == "header" and self.cur is not None and not self.cur.in_body:
            req = self.cur                # a request head begun and never finished
            if not req.method:
                req.method = b"-"
            self.ctx.log_rejected(self, req, 408, "request head not received within "
                                  f"{self.ctx.server.header_timeout:g}s")
            req.status = 408
            req.sent = self._send_bare(408)
            self.log(req)
            self.closing = True
            self.hang_up()
        elif not self.queue:              # idle, or connected and silent
            self.closing = True
            self.hang_up()

    # -- reading ------------------------------------------------------------------

    def dataReceived(self, data: bytes):
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.closing:
            if self.lingering:
                self._lingered()         # read and dropped
            return
        if self.upgrading:
            # bytes after an Upgrade request wait for the backend's 101 (or not)
            self._upgrade_buf.append(data)
            self._pause(PAUSE_PIPELINE)
            return
        cur = self.cur
        if cur is not None:
            if not cur.in_body:
                # httptools buffers an unfinished field itself: bound the whole head
                self._head_bytes += len(data)
                if self._head_bytes > self.ctx.head_limit:
                    self._fail(431, "request head too large")
                    return
            elif self._chunk_head:
                # after a chunk-size line, before its data: the trailer fields after the
                # last chunk are buffered the same way, so they are bounded like a head
                self._head_bytes += len(data)
                if self._head_bytes > self.ctx.head_limit:
                    self._fail(431, "request trailer fields too large")
                    return
        elif data[:1] in b"\r\n" or self._blank:
            data = self._blank_lines(data)
            if not data:
                return
        last = self._last
        self._data = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade(data[e.args[0]:])
        except httptools.HttpParserInvalidMethodError as e:
            # RFC 9110 §9.1: a method token we do not know is 501, anything else 400.
            # The request line starts this chunk unless a request began before it.
            if cur is None and self._last is last and _METHOD_TOKEN(data):
                self._fail(501, f"unknown method {data.split(b' ', 1)[0][:40]!r}")
            else:
                self._fail(400, f"malformed request: {e}")
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, Reject):
                self._fail(ctx.status, str(ctx))
            else:
                log.failure("request handling failed", failure=None)
                self._fail(500, f"internal error: {ctx!r}")
        except httptools.HttpParserError as e:
            cur = self.cur
            if cur is not None and cur.url_len and self.parser.get_method() in _RTSP_METHODS:
                # llhttp's answer to an RTSP method in an HTTP/x.y request line
                self._fail(501, f"unknown method {self.parser.get_method()!r}")
            else:
                self._fail(400, f"malformed request: {e}")
        self._data = None

    def _blank_lines(self, data: bytes) -> bytes:
        """Between requests: one empty line (CRLF) before a request line is ignored (RFC
        9112 §2.2); more, or a lone CR or LF, is 400 (llhttp would skip any run of them).
        Returns what follows, b"" when there is nothing more to parse yet."""
        rest = data.lstrip(b"\r\n")
        seen = self._blank + data[:len(data) - len(rest)]
        if not b"\r\n".startswith(seen) or (rest and seen == b"\r"):
            self._blank = b""
            self._fail(400, "more than one empty line, or a lone CR or LF, before a "
                            "request line")
            return b""
        self._blank = b"" if rest else seen
        return rest

    def _fail(self, status: int, why: str):
        """A request could not be parsed: answer after earlier responses, then close."""
        if self.closing:
            return           # answered and closing already (the rest of a read is parsed)
        self._pause(PAUSE_CLOSING)
        req = self.cur
        self.cur = None
        if req is not None and req.in_body:
            # the head was fine and the request is queued; its body is not
            if req.exchange is not None:
                req.exchange.client_gone()
                req.exchange = None
            req.keep_alive = False
            req.complete = True
            if req.head_sent:
                self.ctx.log_rejected(self, req, status, why)
                self.abort_response(req)
            elif self.queue and self.queue[0] is req:
                self.ctx.log_rejected(self, req, status, why)
                self.respond_error(req, status)
            else:
                req.local = (status, why)
            return
        req = req or Request(self.ctx.reactor.seconds())
        if not req.method:
            req.method = b"-"
        req.local = (status, why)
        req.keep_alive = False
        req.complete = True
        req.body = None
        self.queue.append(req)
        if len(self.queue) == 1:
            self._start(req)

    # httptools callbacks

    def on_message_begin(self):
        if self.closing:
            # an answer closed the connection within this read: what follows in it is
            # not another request to start (the parser cannot be stopped otherwise)
            raise Reject(400, "after the connection was closed")
        self._head_bytes = 0
        self.cur = Request(self.ctx.reactor.seconds())
        if self.queue:
            # a pipelined request: read no further until the earlier one is answered.
            # (Not paused otherwise, so a client that goes away is noticed at once.)
            self._pause(PAUSE_PIPELINE)
        if not self.queue:
            self._arm("header", self.ctx.server.header_timeout)

    def on_url(self, url: bytes):
        req = self.cur
        req.url_len += len(url)
        limit = self.ctx.server.limit_request_line
        # the whole line counts, as LimitRequestLine: method, target and " HTTP/x.y"
        if req.url_len + 13 > limit and \
                len(self.parser.get_method()) + 1 + req.url_len + 9 > limit:
            raise Reject(414, "request line too long")
        req.target = req.target + url if req.target else url

    def on_header(self, name: bytes, value: bytes):
        req = self.cur
        limits = self.ctx.server
        if req.in_body:              # trailer fields after a chunked body
            if req.trailers is None:
                req.trailers = []
            if len(name) + len(value) + 2 > limits.limit_request_fieldsize:
                raise Reject(431, f"trailer field {name[:40]!r} too long")
            req.trailers.append((name, value))
            if len(req.trailers) > limits.limit_request_fields:
                raise Reject(431, "too many trailer fields")
            return
        if len(name) + len(value) + 2 > limits.limit_request_fieldsize:
            raise Reject(431, f"header field {name[:40]!r} too long")
        req.headers.append((name, value))
        if len(req.headers) > limits.limit_request_fields:
            raise Reject(431, "too many header fields")

    def on_headers_complete(self):
        req = self.cur
        p = self.parser
        req.method = method = p.get_method()
        version = p.get_http_version()
        req.version = _VERSIONS.get(version)
        if req.version is None:
            req.version = version.encode("ascii")
            if version[0] == "0":     # HTTP/0.9, or a request line without a version
                raise Reject(400, f"HTTP/{version} request")
            raise Reject(505, f"HTTP/{version} is not supported")
        if req.version == b"1.0":
            # llhttp also takes RTSP/1.0 and ICE/1.0 request lines, reported as 1.0
            line = self._data
            if line is not None and (line.find(req.target + b" RTSP/") >= 0 or
                                     line.find(req.target + b" ICE/") >= 0):
                raise Reject(400, "not an HTTP request line")
            if method in _RTSP_METHODS:
                raise Reject(501, f"unknown method {method!r}")
        req.keep_alive = p.should_keep_alive()
        req.upgrade = p.should_upgrade()
        hosts = []
        for n, v in req.headers:
            ln = n.lower()
            if ln == b"host":
                hosts.append(v)
            elif ln == b"user-agent":
                req.user_agent = v            # for the access log
            elif ln == b"referer":
                req.referer = v
            elif ln == b"authorization":
                req.authorization = v
            elif ln == b"content-length" or ln == b"transfer-encoding":
                req.has_body = method != b"CONNECT"   # after CONNECT: tunnel bytes
        if len(hosts) > 1:
            raise Reject(400, "more than one Host header")
        if hosts:
            host = hosts[0]
            if host not in _valid_hosts:
                # empty is allowed (RFC 9112 §3.2), but not beside an absolute-form target
                if host and split_authority(host) is None:
                    raise Reject(400, "malformed Host header")
                if len(_valid_hosts) >= 1024:
                    _valid_hosts.clear()    # client-chosen: bounded
                _valid_hosts.add(host)
            req.host = host
        elif req.version == b"1.1":
            raise Reject(400, "HTTP/1.1 request without Host")
        req.in_body = True           # from here on, on_header means trailers
        req.complete = not req.has_body    # llhttp ends a bodyless request right here
        self._last = req
        self.queue.append(req)
        if len(self.queue) == 1:
            self._disarm()
            self._start(req)
        else:
            self._pause(PAUSE_PIPELINE)

    def on_body(self, data: bytes):
        self._chunk_head = False
        req = self.cur
        if req.exchange is not None:
            req.exchange.client_body(data)
        elif req.body is not None:
            req.body.append(data)

    def on_message_complete(self):
        req = self.cur
        self.cur = None
        if req is None or not req.has_body:
            return                   # bodyless: complete since its head
        req.complete = True
        if req.exchange is not None:
            req.exchange.client_body_end(req.trailers)
        elif self.queue and self.queue[0] is req and req.head_sent:
            self._finish(req)        # answered early; the rest of the body was dropped
            return

    def on_chunk_header(self):
        self._chunk_head = True      # until its data, or the end of the trailers
        self._head_bytes = 0

    def on_chunk_complete(self):
        self._chunk_head = False

    def _upgrade(self, rest: bytes):
        """llhttp stops at an Upgrade or CONNECT request; route it, or go on as HTTP."""
        req = self._last
        if req is not None and req.exchange is not None and \
                getattr(req.exchange, "take_upgrade", None) is not None and \
                req.exchange.take_upgrade():
            self.upgrading = True
            if rest:
                self._upgrade_buf.append(rest)
            return
        # Not tunnelled: carry on parsing what follows as the next request.
        self.parser = self._new_parser()
        if req is not None and req.has_body:
            self._fail(400, "a body on an Upgrade request that is not tunnelled")
            return
        if rest:
            self.dataReceived(rest)

    # -- flow control --------------------------------------------------------------

    def _pause(self, bit: int):
        if not self.paused and not self.lingering:
            self.transport.pauseProducing()
        self.paused |= bit

    def _resume(self, bit: int):
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and not self.closing and not self.read_closed:
                self.transport.resumeProducing()     # (after FIN it would read EOF again)

    def pause_reading(self):
        self._pause(PAUSE_BACKEND_FULL)

    def resume_reading(self):
        self._resume(PAUSE_BACKEND_FULL)

    def switch_protocols(self, req: Request, head: bytes, tunnel, status: int = 101) -> bytes:
        """101 from the backend (or 200 to a CONNECT): send the head, become a tunnel.
        Returns the bytes the client sent after its request, to be passed on first."""
        req.status = status
        req.head_sent = True
        self.out(head)
        self.uncork()                    # the head before any tunnelled byte
        self._disarm()
        self.tunnel = tunnel
        self.upgrading = False
        req.exchange = tunnel            # so the flow-control producer drives it
        tunnel.request = req             # logged when the tunnel closes
        early, self._upgrade_buf = b"".join(self._upgrade_buf), []
        self.paused = 0
        if self.read_closed:
            self.ctx.reactor.callLater(0, tunnel.client_half_closed)   # FIN came early
        return early

    def readConnectionLost(self):
        """The client sent FIN: it has nothing more to send, which is not "gone" (as in
        Apache and HAProxy). In a tunnel (or one being set up) it is passed on as a
        half-close; in HTTP what was received is answered, then the connection closes."""
        if self.read_closed:
            return
        self.read_closed = True
        if self.tunnel is not None:
            self.tunnel.client_half_closed()
        elif self.lingering:
            self.transport.loseConnection()    # all it sent is read: close in order
        elif not self.upgrading and not self.closing:
            self._input_ended()

    def writeConnectionLost(self):
        self.write_closed = True

    def _input_ended(self):
        """Every byte up to the client's FIN has been parsed."""
        if self.ctx.server.abort_on_close and self.queue:
            self._abandon_unanswered()
        elif self.cur is not None:
            self._fail(400, "request cut short by the client's FIN")
        elif self.queue:
            self.queue[-1].keep_alive = False    # answer in order, close after the last
        else:
            self._close(lingering=False)

    def _abandon_unanswered(self):
        """abort_on_close (HAProxy's option): the FIN abandons the requests whose
        response has not begun; one under way is completed, then the connection closes."""
        under_way = self.queue[0] if self.queue[0].head_sent and \
            self.queue[0] is not self.cur else None
        queue, self.queue = self.queue, deque()
        self.cur = None
        log.info("{peer}: FIN with abort_on_close: {n} request(s) abandoned",
                 peer=self.peer_ip, n=len(queue) - (under_way is not None))
        for req in queue:
            if req is not under_way:
                self._abandon(req)
        if under_way is not None:
            under_way.keep_alive = False
            self.queue.append(under_way)
        else:
            self._close(lingering=False)

    def pin(self, pool, bconn) -> None:
        """Keep this backend connection for this client connection's later requests:
        it was authenticated (NTLM/Negotiate), not the requests on it. It stays busy in
        its pool until either side closes."""
        bconn.exchange = None
        if bconn.paused:
            bconn.resume()
        self.pinned[pool] = bconn

    def active_exchange(self):
        return self.queue[0].exchange if self.queue else None

    # -- dispatch and responses ------------------------------------------------------

    def _start(self, req: Request):
        if req.local is not None:
            status, why = req.local
            self.ctx.log_rejected(self, req, status, why)
            self.respond_error(req, status)
            return
        self.ctx.dispatch(self, req)

    def attach(self, req: Request, exchange) -> list[bytes] | None:
        """An exchange takes the request body: returns what arrived before it."""
        req.exchange = exchange
        early, req.body = req.body, None
        return early

    def send_interim(self, req: Request, status: int, rsn: bytes, headers) -> None:
        if req.version != b"1.1" or req.head_sent:
            return
        self.out(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, rsn, serialize_headers(headers)))

    def send_head(self, req: Request, status: int, rsn: bytes, headers: list,
                  length: int | None, bodyless: bool = False, codings: bytes = b"") -> None:
        """Status line and headers; framing (length, chunked or close) chosen here."""
        req.status = status
        req.head_sent = True
        req.bodyless_out = bodyless
        extra = []
        if bodyless:
            pass
        elif length is not None:
            extra.append(b"Content-Length: %d\r\n" % length)
        elif req.version == b"1.1":
            req.chunked_out = True
            extra.append(b"Transfer-Encoding: %s, chunked\r\n" % codings if codings else
                         b"Transfer-Encoding: chunked\r\n")
        else:
            req.keep_alive = False       # an HTTP/1.0 client: the body ends at close
        if not req.complete or self.ctx.stopping:
            req.keep_alive = False   # answered before the body ended, or shutting down
        if not req.keep_alive:
            extra.append(b"Connection: close\r\n")
        elif req.version == b"1.0":
            extra.append(b"Connection: keep-alive\r\n")
        ctx = self.ctx
        has_date = has_server = False
        for n, _ in headers:
            k = len(n)               # spares a lower() for most names
            if k == 4 and n.lower() == b"date":
                has_date = True
            elif k == 6 and n.lower() == b"server":
                has_server = True
        if not has_date:
            extra.append(b"Date: %s\r\n" % ctx.http_date())
        if not has_server and ctx.server_header:
            extra.append(b"Server: %s\r\n" % ctx.server_header)
        if ctx.served_by_line:
            extra.append(ctx.served_by_line)
        self.out(b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status, rsn, serialize_headers(headers), b"".join(extra)))

    def send_body(self, req: Request, data: bytes) -> None:
        if not data or req.bodyless_out:
            return
        req.sent += len(data)
        if req.chunked_out:
            self.out(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.out(data)

    def end_response(self, req: Request, trailers=None) -> None:
        if req.chunked_out:
            if trailers:
                self.out(b"0\r\n%s\r\n" % serialize_headers(trailers))
            else:
                self.out(_LAST_CHUNK)
        req.exchange = None
        self.uncork()                    # the client has it all before our bookkeeping
        if req.complete:
            self._finish(req)
        elif not req.keep_alive:
            self._finish(req)
        # else: the rest of the request body is read and dropped, then _finish runs
        #       from on_message_complete

    def abort_response(self, req: Request) -> None:
        """The response cannot be completed: close so the client sees the truncation."""
        req.keep_alive = False
        req.exchange = None
        self.log(req)
        self.closing = True
        self._disarm()
        self.hang_up()

    def respond_error(self, req: Request, status: int, headers=(), body: bytes | None = None):
        """The proxy's own answer (error page, redirect, ...)."""
        if body is None:
            body = error_body(status) if status >= 400 and req.method != b"HEAD" else b""
            hdrs = [(b"Content-Type", b"text/html; charset=utf-8")] if body else []
        else:
            hdrs = []
        hdrs = self.ctx.error_headers(self, req, list(headers) + hdrs)
        if not req.complete or status in _CLOSE_AFTER:
            req.keep_alive = False
        req.exchange = None
        self.send_head(req, status, reason(status), hdrs, len(body) if body or
                       req.method != b"HEAD" else None, bodyless=req.method == b"HEAD")
        if body and req.method != b"HEAD":
            req.sent += len(body)
            self.out(body)
        self._finish(req)

    def _send_bare(self, status: int) -> int:
        """An error outside any exchange (the parser is lost): answer and close."""
        body = error_body(status)
        server = b"Server: %s\r\n" % self.ctx.server_header if self.ctx.server_header else b""
        self.out(b"HTTP/1.1 %d %s\r\nContent-Type: text/html; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\nDate: %s\r\n%s%s\r\n%s"
                             % (status, reason(status), len(body), self.ctx.http_date(),
                                server, self.ctx.served_by_line, body))
        return len(body)

    def _finish(self, req: Request):
        """The response is complete: log it, then go on with the next request or close."""
        if self.queue and self.queue[0] is req:
            self.queue.popleft()
        self.requests_served += 1
        req.logged = True                # self.log(req), inline on the hot path
        self.ctx.log_access(self, req)
        if not req.keep_alive or self.closing:
            # linger where the client may still be sending: an unread body, or input
            # after what the parser refused (_fail)
            self._close(lingering=not req.complete or bool(self.paused & PAUSE_CLOSING))
            return
        if self.upgrading:
            # the backend declined the upgrade: what the client sent since is HTTP
            self.upgrading = False
            self.parser = self._new_parser()
            buffered, self._upgrade_buf = b"".join(self._upgrade_buf), []
            self._resume(PAUSE_PIPELINE)
            if buffered or self.read_closed:
                self.ctx.reactor.callLater(0, self._replay, buffered)
        if self.queue:
            self._start(self.queue[0])
        if len(self.queue) <= 1:
            self._resume(PAUSE_PIPELINE)
        if not self.queue and self.cur is None:
            self._arm("idle", self.ctx.server.keepalive_timeout)

    def _replay(self, buffered: bytes):
        """What arrived behind a declined Upgrade request, parsed as HTTP at last."""
        if buffered:
            self.dataReceived(buffered)
        if self.read_closed and not self.closing and not self.upgrading and \
                self.tunnel is None:
            self._input_ended()

    def _close(self, lingering: bool):
        self.closing = True
        server = self.ctx.server
        if lingering and not self.read_closed and server.lingering_time > 0:
            # Lingering close (Apache's, nginx's lingering_close): the client may still
            # be sending what we did not read. Closing now would make our kernel answer
            # it with RST, which can destroy the answer before the client reads it. So:
            # send the answer, shut our side (FIN), and read and drop what comes, until
            # the client's FIN, lingering_timeout without a byte, or lingering_time.
            self.lingering = True
            self.paused = 0
            self.uncork()
            self.transport.resumeProducing()
            try:
                self.transport.unregisterProducer()
                self.transport.loseWriteConnection()
            except Exception:
                self.hang_up()
                return
            self._linger_end = self.ctx.reactor.seconds() + server.lingering_time
            self._arm("linger", min(server.lingering_timeout, server.lingering_time))
        else:
            self._disarm()
            self.hang_up()

    def _lingered(self):
        left = self._linger_end - self.ctx.reactor.seconds()
        if left <= 0:
            self._end_linger()
        else:
            self._arm("linger", min(self.ctx.server.lingering_timeout, left))

    def _end_linger(self):
        if self.write_closed:
            self.transport.loseConnection()      # the answer and our FIN are out
        else:
            self.transport.abortConnection()     # not read within lingering_time


class ClientFactory(Factory):
    """Builds ClientConnection for one listener."""

    noisy = False

    def __init__(self, ctx, listen_key: str, scheme: bytes = b"http", listen=None):
        self.ctx = ctx
        self.listen_key = listen_key
        self.scheme = scheme
        self.listen = listen            # its ListenConfig (None in some unit tests)

    def buildProtocol(self, addr):
        p = ClientConnection(self.ctx, self.listen_key, self.scheme)
        p.factory = self
        p.listen = self.listen
        return p

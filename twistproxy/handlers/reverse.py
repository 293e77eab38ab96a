"""The reverse-proxy exchange: one client request relayed to one backend and back.

Owns what happens between a routed request and its response: building the forwarded
head, streaming the body both ways with backpressure (each side's transport full
pauses the other side's reading, never a buffer), relaying 1xx, deciding whether
the backend connection can be reused or must stay with its client (NTLM/Negotiate),
one transparent retry on a stale keep-alive connection, and turning backend failures
into 502/503/504 with a log line.

Never sent twice: once a request head has been written to a connection, only an
idempotent request (RFC 9110 §9.2.2) may be sent again, on a new connection or to
another member; a POST or PATCH is sent again only when it provably never left
(the connect failed). A backend closing one connection unanswered is not a reason
to put a member in error state; a refused or timed-out connect is.
"""

from __future__ import annotations

from twisted.logger import Logger

from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import alsoProvides

from .. import headers as H
from ..balancer.attempt import cause_kind
from ..pool import still_open
from ..routing import split_host
from .tunnel import Tunnel
from ..wire.messages import serialize_headers

log = Logger(namespace="twistproxy.reverse")

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# How much request body is kept so that an idempotent request can be sent again after
# a stale keep-alive failure; a longer body is streamed without a copy, and not replayed.
REPLAY_LIMIT = 65536

_EXPECT_100 = b"Expect: 100-continue\r\n"
_CONNECTION_AUTH = (b"ntlm", b"negotiate")


def _allowed_upgrade(headers, allowed: frozenset) -> bytes:
    """The client's Upgrade protocol when this worker allows it (Apache's upgrade=)."""
    if not allowed:
        return b""
    for n, v in headers:
        if n.lower() == b"upgrade":
            token = v.split(b",")[0].strip()
            if "*" in allowed or token.lower().decode("latin-1") in allowed:
                return token
    return b""


def _loss_detail(reason, tls: bool = False) -> str:
    """Why a backend connection ended, when it says more than "closed" (TLS errors)."""
    if reason is None:
        return ""
    from twisted.internet.error import ConnectionDone, ConnectionLost
    if reason.check(ConnectionDone):
        return ""
    if reason.check(ConnectionLost):
        # not a clean close; Twisted reports a TLS EOF without close_notify so too
        return "reset, or TLS closed without close_notify" if tls else "reset"
    value = reason.value
    text = str(value) or value.__class__.__name__
    if value.__class__.__name__ == "Error" and value.args and isinstance(value.args[0], list):
        text = ", ".join(str(x[-1]) for x in value.args[0]) or text     # OpenSSL's list
    return f"TLS: {text}" if "SSL" in value.__class__.__module__ or "verif" in text.lower() \
        or "service_identity" in value.__class__.__module__ else text


class ReverseExchange:
    __slots__ = ("ctx", "conn", "req", "rt", "target", "pool", "backend_name", "member",
                 "bconn", "head", "early", "body_chunked", "body_sent", "body_done",
                 "response_started", "done", "last_activity", "timeout", "retried",
                 "received", "expect_continue", "replay", "holding", "pin",
                 "reused", "attempt", "member_failed", "sni", "upgrade", "idempotent")

    def __init__(self, ctx, conn, req, rt, target: bytes, pool, backend_name: str,
                 attempt=None):
        self.ctx = ctx
        self.conn = conn
        self.req = req
        self.rt = rt                      # the route's runtime (runtime.RouteRuntime)
        self.target = target
        self.pool = pool
        self.backend_name = backend_name
        self.attempt = attempt            # balancer.attempt.Attempt, for a balancer route
        self.member = attempt.member if attempt is not None else None   # busy while set
        self.bconn = None
        self.early = None                 # body received while no connection takes it
        self.body_chunked = False
        self.body_sent = 0
        self.body_done = False
        self.response_started = False
        self.done = False
        self.last_activity = 0.0
        self.timeout = pool.timeout
        self.retried = False
        self.received = 0
        self.expect_continue = False      # the client itself asked for 100-continue
        self.idempotent = req.method in _IDEMPOTENT
        self.replay = [] if self.idempotent else None
        self.holding = False              # body held back until the backend says 100
        self.pin = False
        self.reused = False
        self.member_failed = False        # failonstatus / failontimeout matched
        self.sni = None
        self.upgrade = b""                # the protocol asked for, when this worker allows it
        # Authorization: NTLM/Negotiate authenticates the backend connection, not the
        # request (IIS, also Kerberos with authPersistNonNTLM): never share it again
        auth = req.authorization
        if auth is not None and auth.split(b" ", 1)[0].lower() in _CONNECTION_AUTH:
            self.pin = True

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        req, conn = self.req, self.conn
        req.backend = self.backend_name
        if req.upgrade and req.method != b"CONNECT":
            self.upgrade = _allowed_upgrade(req.headers, self.pool.upgrades)
        self.head = self._build_head()
        self.early = conn.attach(req, self)
        if req.has_body and not req.complete:
            conn.pause_reading()     # until a backend connection takes the body
        pinned = conn.pinned.get(self.pool) if conn.pinned else None
        if pinned is not None:
            if pinned.connected_ok and pinned.reusable and \
                    (self.idempotent or still_open(pinned)):
                self.backend_connected(pinned, True)     # NTLM/Negotiate: same connection
                return
            del conn.pinned[self.pool]
            if pinned.connected_ok:
                pinned.close()           # found closed by the peek: not yet read
        self._acquire()

    def _acquire(self) -> None:
        # a non-idempotent request is never retried once written, so a pooled
        # connection is checked to be still open first (idempotent ones are retried)
        self.pool.acquire(self, self._sni(), check_open=not self.idempotent)

    def _build_head(self) -> bytes:
        req, rt = self.req, self.rt
        vh = rt.vhost
        # Apache's RequestHeader runs before mod_proxy adds X-Forwarded-*: an "unset"
        # of a spoofed X-Forwarded-For must not remove the one we add
        received = H.apply_actions(req.headers, rt.request_actions) \
            if rt.request_actions else req.headers
        hdrs, _host = H.request_to_backend(
            received, client_ip=self.conn.peer_ip,
            backend_hostport=self.pool.hostport, preserve_host=vh.preserve_host,
            add_headers=vh.add_headers, server_name=rt.server_name, via=vh.proxy_via,
            via_name=rt.via_name, client_version=req.version,
            proxy_chain_auth=vh.proxy_chain_auth, keep_upgrade=bool(self.upgrade),
            forwarded_proto=self.conn.scheme, forwarded_port=self.conn.local_port)
        if self.upgrade:
            hdrs.append((b"Connection", b"Upgrade"))
        framing = b""
        if req.has_body:
            codings = H.transfer_codings(req.headers)
            if codings:
                # llhttp accepted it, so chunked is last; any coding before it stays
                self.body_chunked = True
                framing = b"Transfer-Encoding: %s\r\n" % b", ".join(codings)
            else:
                for n, v in req.headers:
                    if n.lower() == b"content-length":
                        framing = b"Content-Length: %d\r\n" % int(v)
            for n, v in req.headers:
                if n.lower() == b"expect" and v.strip().lower() == b"100-continue":
                    self.expect_continue = True
                    break
        if self.rt.disablereuse:
            framing += b"Connection: close\r\n"
        # the blank line and any Expect are added per connection (see backend_connected)
        return b"%s %s HTTP/1.1\r\n%s%s" % (req.method, self.target,
                                            serialize_headers(hdrs), framing)

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """The response timer lives on the backend connection: cheap to move."""
        self.last_activity = self.ctx.reactor.seconds()
        self.bconn.deadline.set(seconds, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.done or self.bconn is None:
            return
        idle = self.ctx.reactor.seconds() - self.last_activity
        # while the client's socket is full we wait on the client, not the backend
        waiting_on_client = self.bconn.paused
        limit = self.ctx.server.timeout if waiting_on_client else self.timeout
        if idle < limit:
            self.bconn.deadline.set(max(limit - idle, 0.01), self._check_timeout)
        elif waiting_on_client:
            log.info("{where}: client {peer} read nothing for {limit:g}s: closing",
                     where=self.rt.where, peer=self.conn.peer_ip, limit=limit)
            self.client_gone()
            self.conn.abort_response(self.req)
        else:
            if self.attempt is not None and self.attempt.balancer.config.failontimeout:
                self.member_failed = True
            self._fail(504, f"no answer within {self.timeout:g}s")

    def _disarm(self) -> None:
        if self.bconn is not None:
            self.bconn.deadline.clear()

    # -- backend connection -------------------------------------------------------------------

    def backend_connected(self, bconn, reused: bool) -> None:
        if self.done:
            self.pool.release(bconn)
            return
        self.bconn = bconn
        self.reused = reused
        req = self.req
        # ping: on a reused connection, hold the body back until the backend answers
        # 100 (or anything), so a dead connection costs a retry, not the request
        ping = self.pool.ping if reused and req.has_body and not self.body_sent else 0.0
        expect = self.expect_continue or ping
        bconn.begin(self, self.head + (_EXPECT_100 + b"\r\n" if expect else b"\r\n"),
                    req.method == b"HEAD", upgrade=bool(self.upgrade))
        if ping:
            self.holding = True
            self.last_activity = self.ctx.reactor.seconds()
            bconn.deadline.set(ping, self._ping_timed_out)
            return
        self._arm(self.timeout)
        self._send_early()

    def _send_early(self) -> None:
        early, self.early = self.early, None
        if early:
            for chunk in early:
                self._send_body(chunk)
        if self.req.complete and not self.body_done:
            self._end_body(self.req.trailers)
        self.conn.resume_reading()

    def _ping_timed_out(self) -> None:
        if self.done or not self.holding:
            return
        bconn = self.bconn
        self.bconn = None
        bconn.close()
        why = f"no answer to the 100-continue ping within {self.pool.ping:g}s"
        if not self._retry(why) and not self._failover(why, written=True):
            self._fail(503, self._not_resent(why))

    def backend_connect_failed(self, why: str) -> None:
        if self.done:
            return
        if not self._failover(why, written=False):
            self._fail(503, why)

    def _failover(self, why: str, written: bool, member_error: bool = True) -> bool:
        """While maxattempts allows, the request goes to another member: always when
        it never reached a connection (`written` false: the connect failed), else
        only an idempotent one. With `member_error` the failed member goes into error
        state for `retry` seconds (unreachable, or silent to the ping)."""
        attempt, member = self.attempt, self.member
        if attempt is None or member is None or self.response_started or \
                (written and not self.idempotent) or not self._rewind():
            return False
        now = self.ctx.reactor.seconds()
        member.count_error(cause_kind(why))  # each failed attempt (the route: per request)
        self._member_done(ok=not member_error, why=why)
        nxt = attempt.next(now, why)
        if nxt is None:
            return False
        self.rt.counters.failovers += 1
        self.member = nxt
        self.pool = nxt.pool
        self.timeout = self.pool.timeout
        self.target = attempt.member_target(nxt)
        self.backend_name = self.req.backend = nxt.log_name
        self.head = self._build_head()
        self.retried = False
        self._acquire()
        return True

    # -- request body: client -> backend ----------------------------------------------------------

    def client_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.bconn is None or self.holding:
            if self.early is None:
                self.early = []
            self.early.append(data)      # reading is paused: at most one read's worth
        else:
            self._send_body(data)

    def _send_body(self, data: bytes) -> None:
        self.body_sent += len(data)
        self.rt.counters.bytes_in += len(data)
        replay = self.replay
        if replay is not None:
            if self.body_sent <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        self.last_activity = self.ctx.reactor.seconds()
        if self.body_chunked:
            self.bconn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.bconn.write(data)

    def client_body_end(self, trailers) -> None:
        if self.bconn is not None and not self.done and not self.holding:
            self._end_body(trailers)

    def _end_body(self, trailers) -> None:
        self.body_done = True
        if self.body_chunked:
            if trailers:
                self.bconn.write(b"0\r\n%s\r\n" % serialize_headers(trailers))
            else:
                self.bconn.write(b"0\r\n\r\n")

    # -- protocol upgrade (WebSocket) ----------------------------------------------------------

    def take_upgrade(self) -> bool:
        """The client's Upgrade request ended its HTTP stream: are we asking for it?"""
        return bool(self.upgrade) and not self.done

    def backend_upgraded(self, bconn, rsn: bytes, headers, rest: bytes) -> None:
        """101 Switching Protocols: relay it, then both connections are one tunnel."""
        if self.done:
            bconn.close()
            return
        offered = b""
        for n, v in headers:
            if n.lower() == b"upgrade":
                offered = v.split(b",")[0].strip().lower()
        if offered != self.upgrade.lower():
            bconn.close()
            self.bconn = None
            self._fail(502, f"101 for {offered.decode('latin-1')!r}, not the "
                            f"{self.upgrade.decode('latin-1')!r} asked for")
            return
        self.done = True
        self.response_started = True
        bconn.deadline.clear()
        self.bconn = None
        rt, conn = self.rt, self.conn
        out = H.response_to_client(headers, via=rt.vhost.proxy_via, via_name=rt.via_name,
                                   backend_version=b"1.1", keep_upgrade=True)
        if self.attempt is not None and self.attempt.choice.route_changed:
            cookie = rt.sticky_cookie_header(self.member)      # sticky from the handshake
            if cookie is not None:
                out.append(cookie)
        out.append((b"Connection", b"Upgrade"))
        head = b"HTTP/1.1 101 %s\r\n%s\r\n" % (rsn or b"Switching Protocols",
                                                serialize_headers(out))
        tunnel = Tunnel(self.ctx.reactor, conn, bconn, self.ctx.server.tunnel_timeout,
                        where=rt.where, on_close=self._tunnel_closed)
        bconn.tunnel = tunnel
        bconn.exchange = tunnel          # its flow-control producer now drives the tunnel
        alsoProvides(bconn, IHalfCloseableProtocol)
        early = conn.switch_protocols(self.req, head, tunnel)
        tunnel.start(from_client=early, from_backend=rest)

    def _tunnel_closed(self, tunnel) -> None:
        """A tunnel's member stays busy (bybusyness) until it closes; its bytes count
        for bytraffic."""
        member = self.member
        if member is not None:
            self.member = None
            self.attempt.done(member, tunnel.up, tunnel.down, True,
                              self.ctx.reactor.seconds(), status=101)

    def backend_full(self) -> None:
        self.conn.pause_reading()

    def backend_drained(self) -> None:
        self.conn.resume_reading()

    # -- response: backend -> client -----------------------------------------------------------

    def backend_interim(self, status: int, rsn: bytes, headers) -> None:
        self.last_activity = self.ctx.reactor.seconds()
        if status == 100 and self.holding:
            self.holding = False         # the ping was answered: the body may go
            self._arm(self.timeout)
            self._send_early()
        if status == 100 and not self.expect_continue:
            return
        self.conn.send_interim(self.req, status, rsn,
                               H.response_to_client(headers, via="off", via_name=b"",
                                                    backend_version=b"1.1"))

    def backend_head(self, status: int, rsn: bytes, version: str, headers, length, bodyless,
                     codings: bytes = b""):
        if self.done:
            return
        if codings and not bodyless and self.req.version != b"1.1":
            # an HTTP/1.0 client cannot be told the body is transfer-coded
            self.bconn.close()
            self.bconn = None
            self._fail(502, f"transfer coding {codings.decode('latin-1')!r} cannot be "
                            "passed to an HTTP/1.0 client")
            return
        self.response_started = True
        if self.holding:                 # a final answer to the ping: the body never goes
            self.holding = False
            self._arm(self.timeout)
            self.conn.resume_reading()   # the rest of the body is read and dropped
        self.last_activity = self.ctx.reactor.seconds()
        req, rt = self.req, self.rt
        if self.attempt is not None and status in self.attempt.balancer.config.failonstatus:
            self.member_failed = True    # relayed, then the member goes into error
        if self.bconn.offers_connection_auth:
            self.pin = True              # WWW-Authenticate: NTLM/Negotiate (any status)
        out = H.response_to_client(headers, via=rt.vhost.proxy_via, via_name=rt.via_name,
                                   backend_version=version.encode("ascii"))
        if rt.reverse_map is not None:
            out = rt.reverse_map.rewrite(out, self._public_base())
        if rt.response_actions:
            out = H.apply_actions(out, rt.response_actions)
        if self.attempt is not None and self.attempt.choice.route_changed:
            cookie = rt.sticky_cookie_header(self.member)
            if cookie is not None:
                out.append(cookie)
        if bodyless and length is not None and (req.method == b"HEAD" or status == 304):
            out.append((b"Content-Length", b"%d" % length))     # describes the GET body
        self.conn.send_head(req, status, rsn or b"", out, None if bodyless else length,
                            bodyless=bodyless, codings=codings)

    def backend_body(self, data: bytes) -> None:
        self.received += len(data)
        self.last_activity = self.ctx.reactor.seconds()
        self.conn.send_body(self.req, data)

    def backend_complete(self, bconn, trailers) -> None:
        if self.done:
            return
        self.done = True
        bconn.deadline.clear()
        self.bconn = None
        if not self.body_done:
            bconn.reusable = False      # the backend did not take the whole body
        self._member_done(ok=not self.member_failed, why="failonstatus matched",
                          status=self.req.status)
        outage = self.pool.outage
        if outage.failing:
            outage.succeeded()
        if (self.pin or bconn in self.conn.pinned.values()) and bconn.reusable:
            self.conn.pin(self.pool, bconn)
        else:
            self.pool.release(bconn)
        self.conn.end_response(self.req, trailers if trailers else None)

    def backend_invalid(self, bconn, why: str) -> None:
        if self.done:
            return
        bconn.close()
        self.bconn = None
        self._fail(502, why)

    def _rewind(self) -> bool:
        """Make the request ready to be sent again: possible while none of its body
        was sent, or for an idempotent one whose body so far is still at hand."""
        if self.body_sent and self.replay is None:
            return False
        self.holding = False
        # the body's end goes again too: an empty chunked body is its last chunk only
        self.body_done = False
        if self.body_sent:
            self.early = self.replay + (self.early or [])
            self.replay = []
            self.body_sent = 0
        if self.req.has_body and not self.req.complete:
            self.conn.pause_reading()
        return True

    def backend_lost(self, bconn, reason) -> None:
        if self.done:
            return
        self.bconn = None
        unanswered = not self.response_started and not bconn.got_bytes
        if unanswered:
            why = "connection closed before any answer"
            # an idempotent request: a stale kept-alive connection, once more on a new
            # one; a member that hangs up unanswered, another member (not in error:
            # one closed connection says little about the member)
            if self._retry(why) or self._failover(why, written=True, member_error=False):
                return
        why = "connection closed before a complete response" if bconn.got_bytes else \
            "connection closed without a response"
        detail = _loss_detail(reason, self.pool.tls)
        why = f"{why} ({detail})" if detail else why
        self._fail(502, self._not_resent(why) if unanswered else why)

    def _not_resent(self, why: str) -> str:
        if self.idempotent:
            return why
        return f"{why}; {self.req.method.decode('latin-1')} is not idempotent: not sent again"

    def _retry(self, why: str) -> bool:
        """Once, on a new connection, when the failed one was a kept-alive one and the
        request is idempotent with its body so far still at hand (the head was
        written: a POST may have been acted on)."""
        if self.retried or not self.reused or self.response_started or \
                not self.idempotent or not self._rewind():
            return False
        self.retried = True
        self.rt.counters.retries += 1
        if self.member is not None:
            self.member.retries += 1
        log.debug("{where}: backend {backend}: {why} on a kept-alive connection: "
                  "sending again on a new one", where=self.rt.where,
                  backend=self.backend_name, why=why)
        self.pool.acquire_fresh(self)
        return True

    # -- flow control from the client side ----------------------------------------------------------

    def client_paused(self) -> None:
        if self.bconn is not None:
            self.bconn.pause()

    def client_resumed(self) -> None:
        if self.bconn is not None:
            self.bconn.resume()
            self.last_activity = self.ctx.reactor.seconds()

    def client_gone(self) -> None:
        if self.done:
            return
        self.done = True
        self._disarm()
        if self.bconn is not None:
            self.bconn.close()
            self.bconn = None
        else:
            self.pool.cancel(self)       # it may be waiting for a free connection
        self._member_done(ok=True)

    # -- endings ------------------------------------------------------------------------------------

    def _fail(self, status: int, why: str) -> None:
        self.done = True
        self._disarm()
        if self.bconn is not None:
            self.bconn.close()
            self.bconn = None
        attempt = self.attempt
        kind = cause_kind(why)
        self.rt.counters.count_error(kind)
        if self.member is not None:
            self.member.count_error(kind)
        self._member_done(ok=not (status == 503 or self.member_failed or (
            attempt is not None and status in attempt.balancer.config.failonstatus)),
            why=f"{why} -> {status}", status=status)
        self.conn.resume_reading()       # start() paused it until a backend took the body
        # the error log tells the worker's outage, not each request (outages.py)
        self.pool.outage.failed(self.rt.where, self.backend_name, why, status)
        if self.response_started:
            self.conn.abort_response(self.req)
        else:
            self.req.exchange = None
            self.conn.respond_error(self.req, status)

    def _member_done(self, ok: bool, why: str = "", status: int = 0) -> None:
        member = self.member
        if member is None:
            return
        self.member = None
        self.attempt.done(member, self.body_sent, self.received, ok,
                          self.ctx.reactor.seconds(), why, status)

    def _sni(self) -> str | None:
        """With preserve_host, a TLS backend is asked for the client's host name (SNI),
        as Apache does; otherwise the backend URL's own host."""
        if self.pool.tls and self.rt.vhost.preserve_host and self.req.host:
            host = split_host(self.req.host.decode("latin-1"))[0].strip("[]")
            return host.lower() or None
        return None

    def _public_base(self) -> bytes:
        host = self.req.host or self.rt.vhost.server_name.encode("latin-1")
        return self.conn.scheme + b"://" + host

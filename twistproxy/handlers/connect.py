"""Forward proxying (ProxyRequests): admission, CONNECT tunnels, absolute-form requests.

Owns the gate of a vhost with `proxy_requests = true` (client network, Basic proxy
authentication, target port and host patterns: 403 or 407 otherwise) and the CONNECT
exchange: connect to the target without blocking the reactor (name resolution
included), answer `200 Connection established`, then hand both connections to the
shared Tunnel. Absolute-form requests that pass the gate go through the reverse
exchange, to the origin they name.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import error, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..access import ForwardAccess
from ..config import RouteConfig
from ..wire.backend import RequestFlow
from .tunnel import Tunnel

log = Logger(namespace="twistproxy.forward")


class ForwardGate:
    """A proxy_requests vhost: who may use it and where to."""

    def __init__(self, ctx, vhost, where: str):
        self.ctx = ctx
        self.vhost = vhost
        self.where = where
        self.access = ForwardAccess(vhost, where, ctx.config.path)
        # forwarded requests: Host is the target's; no X-Forwarded-* (Apache adds those
        # to reverse requests only); the vhost's header actions and Via still apply
        from ..runtime import RouteRuntime
        forward_vhost = dataclasses.replace(vhost, preserve_host=True, add_headers=False)
        self.runtime = RouteRuntime(ctx, forward_vhost,
                                    RouteConfig(path="/", where=f"{where} (forward proxy)"),
                                    [])

    def admit(self, conn, req, host: str, port: int, connect: bool, proceed) -> None:
        """Run `proceed()` if this client may reach host:port, else answer 403/407."""
        access = self.access
        if not access.client_allowed(conn.peer_ip):
            return self._refuse(conn, req, 403, f"client {conn.peer_ip} is not in proxy_allow")
        if connect and not access.port_allowed(port):
            return self._refuse(conn, req, 403, f"port {port} is not in allow_connect")
        refused = access.target_refused(host)
        if refused:
            return self._refuse(conn, req, 403, refused)
        if access.users is None:
            return proceed()
        creds = access.credentials(req.headers)
        if creds is None:
            return self._challenge(conn, req, "no Basic Proxy-Authorization")
        user, password, value = creds
        if access.known(value) == user:
            req.user = user
            return proceed()

        def checked(ok):
            if req not in conn.queue or conn.closing:
                return                      # the client went away meanwhile
            if not ok:
                return self._challenge(conn, req, f"wrong password for {user!r}")
            access.remember(value, user)
            req.user = user
            proceed()
        # bcrypt is slow on purpose: never on the reactor thread
        threads.deferToThread(access.verify, user, password).addCallback(checked)

    def _refuse(self, conn, req, status: int, why: str) -> None:
        log.warn("{where}: {peer}: {why} -> {status}", where=self.where, peer=conn.peer_ip,
                 why=why, status=status)
        req.exchange = None
        conn.respond_error(req, status)

    def _challenge(self, conn, req, why: str) -> None:
        log.info("{where}: {peer}: {why} -> 407", where=self.where, peer=conn.peer_ip, why=why)
        req.exchange = None
        conn.respond_error(req, 407, headers=[self.access.challenge()])


@implementer(IHalfCloseableProtocol)
class _Target(Protocol):
    """The CONNECT target's end of the tunnel."""

    def __init__(self, owner):
        self.owner = owner              # the ConnectExchange, until the tunnel exists
        self.tunnel = None
        self.exchange = None            # what RequestFlow drives: the tunnel, once there

    def connectionMade(self):
        self.transport.registerProducer(RequestFlow(self), True)
        self.owner.target_connected(self)

    def dataReceived(self, data):
        if self.tunnel is not None:
            self.tunnel.from_backend(data)

    def readConnectionLost(self):
        if self.tunnel is not None:
            self.tunnel.backend_half_closed()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        if self.tunnel is not None:
            self.tunnel.backend_gone()


class _TargetFactory(ClientFactory):
    noisy = False

    def __init__(self, exchange):
        self.exchange = exchange

    def buildProtocol(self, addr):
        return _Target(self.exchange)

    def clientConnectionFailed(self, connector, reason):
        self.exchange.target_failed(reason)


class ConnectExchange:
    """CONNECT host:port: a TCP connection to the target, then a tunnel."""

    def __init__(self, ctx, conn, req, gate: ForwardGate, host: str, port: int):
        self.ctx = ctx
        self.conn = conn
        self.req = req
        self.gate = gate
        self.host = host
        self.port = port
        self.done = False
        self.connector = None

    def start(self) -> None:
        self.req.exchange = self          # so the client hands over its connection
        self.req.backend = f"{self.host}:{self.port}"
        self.gate.admit(self.conn, self.req, self.host, self.port, True, self._connect)

    def take_upgrade(self) -> bool:
        return not self.done

    def _connect(self) -> None:
        if self.done:
            return
        timeout = self.ctx.server.timeout
        self.connector = self.ctx.reactor.connectTCP(self.host, self.port,
                                                     _TargetFactory(self), timeout=timeout)

    def target_connected(self, target) -> None:
        if self.done:
            target.transport.loseConnection()
            return
        self.done = True
        conn = self.conn
        tunnel = Tunnel(self.ctx.reactor, conn, target, self.ctx.server.tunnel_timeout,
                        where=f"{self.gate.where} CONNECT {self.host}:{self.port}")
        target.tunnel = target.exchange = tunnel
        early = conn.switch_protocols(self.req, b"HTTP/1.1 200 Connection established\r\n"
                                                b"\r\n", tunnel, status=200)
        tunnel.start(from_client=early)

    def target_failed(self, reason) -> None:
        if self.done:
            return
        self.done = True
        if reason.check(error.DNSLookupError):
            status, why = 502, f"cannot resolve {self.host}"
        elif reason.check(error.ConnectionRefusedError):
            status, why = 503, "connection refused"
        elif reason.check(error.TimeoutError):
            status, why = 504, "connect timed out"
        else:
            status, why = 502, reason.getErrorMessage()
        log.warn("{where}: CONNECT {host}:{port}: {why} -> {status}", where=self.gate.where,
                 host=self.host, port=self.port, why=why, status=status)
        self.req.exchange = None
        self.conn.respond_error(self.req, status)

    # the client side may go away, or pause, before the tunnel exists; a CONNECT has
    # no body (what follows its head is tunnel data), so these never carry bytes

    def client_body(self, data: bytes) -> None:
        pass

    def client_body_end(self, trailers) -> None:
        pass

    def client_gone(self) -> None:
        self.done = True
        if self.connector is not None:
            self.connector.disconnect()

    def client_paused(self) -> None:
        pass

    def client_resumed(self) -> None:
        pass

"""Active health checks of balancer members (mod_proxy_hcheck, reference §4).

Owns one periodic check per member whose `hcmethod` is not NONE: a TCP connect, or
an HTTP/1.0 OPTIONS/HEAD/GET on a new connection closed afterwards, with the member's
connect timeout, timeout and TLS. The result drives the member's C flag: `hcfails`
failures while up set it; `hcpasses` successes while down (C or E) clear C and E.
Checks never block request handling and stop with the service.
"""

from __future__ import annotations

import httptools
from twisted.internet import task
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from ..runtime.state import Edit

log = Logger(namespace="twistproxy.health")


class _Probe(Protocol):
    def __init__(self, check, request: bytes | None):
        self.check = check
        self.request = request
        self.parser = httptools.HttpResponseParser(self)

    def connectionMade(self):
        if self.request is None:             # TCP: connecting is the whole check
            self.check.finish(True, "connected")
            self.transport.loseConnection()
        else:
            self.transport.write(self.request)

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.check.finish(False, f"invalid response: {e}")
            self.transport.abortConnection()

    def on_headers_complete(self):
        status = self.parser.get_status_code()
        low, high = self.check.member.config.hcexpect
        self.check.finish(low <= status <= high, f"status {status}")
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.check.finish(False, "connection closed before a status line")


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self, check, request):
        self.check = check
        self.request = request

    def buildProtocol(self, addr):
        return _Probe(self.check, self.request)

    def clientConnectionFailed(self, connector, reason):
        self.check.finish(False, reason.getErrorMessage())


class HealthCheck:
    def __init__(self, reactor, runtime, member):
        self.reactor = reactor
        self.runtime = runtime           # runtime.Runtime: C and E change through it
        self.balancer_name = member.balancer
        self.member = member
        self.pool = member.pool
        self.fails = 0
        self.passes = 0
        self.in_flight = False
        self.checks = 0
        self._loop = None
        self._timer = None
        self._connector = None
        cfg = member.config
        self.request = None if cfg.hcmethod == "TCP" else self._request_bytes()

    def _request_bytes(self) -> bytes:
        cfg = self.member.config
        if cfg.hcmethod == "OPTIONS":
            target = "*"
        else:
            path = cfg.url.path.rstrip("/")
            uri = cfg.hcuri
            target = path + ("/" if path and uri and not uri.startswith("/") else "") + uri
            target = target or "/"
            if not target.startswith("/"):
                target = "/" + target
        return (f"{cfg.hcmethod} {target} HTTP/1.0\r\nHost: ".encode("latin-1")
                + self.pool.hostport + b"\r\n\r\n")

    def start(self) -> None:
        self._loop = task.LoopingCall(self.run)
        self._loop.clock = self.reactor
        self._loop.start(self.member.config.hcinterval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cancel_timer()
        if self._connector is not None:
            self._connector.disconnect()

    def run(self) -> None:
        if self.in_flight or "S" in self.member.flags:
            return
        self.in_flight = True
        self.checks += 1
        factory = _ProbeFactory(self, self.request)
        pool = self.pool
        if pool.tls:
            self._connector = self.reactor.connectSSL(pool.host, pool.port, factory,
                                                      pool.tls_options(pool.host),
                                                      timeout=pool.connect_timeout)
        else:
            self._connector = self.reactor.connectTCP(pool.host, pool.port, factory,
                                                      timeout=pool.connect_timeout)
        self._timer = self.reactor.callLater(pool.connect_timeout + pool.timeout,
                                             self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self.in_flight:
            self.finish(False, "no answer in time")
            if self._connector is not None:
                self._connector.disconnect()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def finish(self, ok: bool, detail: str) -> None:
        if not self.in_flight:
            return                      # one result per check
        self.in_flight = False
        self._cancel_timer()
        self._connector = None
        self.record(ok, detail)

    def record(self, ok: bool, detail: str) -> None:
        """The state machine of reference §4, apart from the I/O so it can be tested."""
        m, cfg = self.member, self.member.config
        if ok:
            m.hc_passed += 1
        else:
            m.hc_failed += 1
        down = "C" in m.flags or "E" in m.flags
        if not down:
            if ok:
                self.fails = 0           # hcfails counts failures in a row
            else:
                self.fails += 1
                if self.fails >= cfg.hcfails:
                    self.fails = 0
                    self._set(detail, C=True)
                    log.warn("balancer://{b}: member {m} failed its health check ({d}): "
                             "taken out", b=self.balancer_name, m=m.name, d=detail)
        elif not ok:
            self.passes = 0              # and hcpasses passes in a row
        else:
            self.passes += 1
            if self.passes >= cfg.hcpasses:
                self.passes = 0
                self._set(detail, C=False, E=False)
                log.info("balancer://{b}: member {m} passed its health check: back in",
                         b=self.balancer_name, m=m.name)

    def _set(self, detail: str, **flags: bool) -> None:
        self.runtime.apply([Edit(self.balancer_name, f"status.{f}", on, member=self.member.name)
                            for f, on in flags.items()], source="health", who=detail,
                           now=self.reactor.seconds())

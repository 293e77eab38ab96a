"""The running proxy as a twisted.application service: listeners, context, log flushing.

Owns start-up order (config validated, ports bound and the access log opened before
any service starts, so a failure stops everything with one line) and graceful
shutdown (stop accepting, let in-flight responses finish for a grace period).
"""

from __future__ import annotations

import gc

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger

from . import __version__
from .accesslog import AccessLog
from .config import Config, ConfigError
from . import listeners
from .listeners import BindError, BoundSocket, bind_all, close_unused, listen_on
from .proxy import ProxyContext
from .tls import check_files, listener_factory
from .wire.client import ClientFactory

log = Logger(namespace="twistproxy")



FIRST_REQUEST_GRACE = 2.0   # at a stop, how long a new connection may take to send a request


def accept_one_at_a_time(port) -> None:
    """Workers share one accept queue and all wake for a new connection; Twisted's
    port accepts up to 100 (and more) per wake, so the first worker awake would take
    a whole burst of long-lived keep-alive connections. One per wake (nginx's
    `multi_accept off`) spreads them over the workers."""
    cls = type(port)
    one = _ONE_ACCEPT.get(cls)
    if one is None:
        one = _ONE_ACCEPT[cls] = type(f"OneAccept{cls.__name__}", (cls,), {
            "numberAccepts": property(lambda self: 1, lambda self, value: None)})
    port.__class__ = one


_ONE_ACCEPT: dict = {}


class StartupError(Exception):
    """One line saying why the proxy cannot start."""


class ProxyService(MultiService):
    def __init__(self, config: Config, bound: list[BoundSocket], access_log: AccessLog | None,
                 reactor=None, tls: dict | None = None, admin_bound: BoundSocket | None = None,
                 controlled: bool = False):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.bound = bound
        self.tls = tls or {}             # listener key -> its ServerTLS contexts
        self.access_log = access_log
        self.ctx = ProxyContext(config, reactor, access_log)
        self.admin_bound = admin_bound   # the admin listener's socket, if [admin] has a port
        self.admin = None
        # `controlled`: a worker process, whose master owns health checks, the admin
        # pages and admin state (process/worker.py)
        self.controlled = controlled
        if not controlled and (config.admin is not None or
                               any(r.handler for v in config.vhosts for r in v.routes)):
            from .admin.site import Admin
            self.admin = self.ctx.admin = Admin(self.ctx, config.admin)
        self.cluster = None      # one process: it is the one that talks to Redis
        if not controlled and config.cluster is not None:
            from .cluster.sync import ClusterSync
            self.cluster = ClusterSync(config, reactor)
            self.cluster.attach(self.ctx)
        self.ports = []
        self._flusher = None
        self._sweeper = None

    def addresses(self) -> dict[str, int]:
        """Listener key -> the port actually bound (useful with port 0 in tests); the
        admin listener's is under "admin"."""
        out = {b.listen.key: b.port for b in self.bound}
        if self.admin_bound is not None:
            out["admin"] = self.admin_bound.port
        return out

    def startService(self):
        super().startService()
        # What start-up built lives as long as the process: keep the collector off it,
        # and let each request's many short-lived objects die young without full passes.
        gc.freeze()
        gc.set_threshold(20000, 20, 20)
        busy_poll = self.config.server.busy_poll
        reactor_name = type(self.reactor).__name__
        if hasattr(self.reactor, "busy_poll"):
            self.reactor.busy_poll = busy_poll / 1e6
            reactor_name += f" (busy_poll {busy_poll}us)" if busy_poll else " (busy_poll off)"
        elif busy_poll:
            log.info("server.busy_poll does not apply: it needs the twistproxy reactor "
                     "(twistd --reactor=twistproxy), not {reactor}", reactor=reactor_name)
        if not listeners.adopts(self.reactor):   # IOCP (or PORTABLE_RUN in the tests)
            reactor_name += " (it binds each listener itself: no socket adoption)"
        log.info("twistproxy {version} on {reactor}", version=__version__,
                 reactor=reactor_name)
        for b in self.bound:
            tls = self.tls.get(b.listen.key)
            factory = ClientFactory(self.ctx, b.listen.key, b"https" if tls else b"http",
                                    b.listen)
            if tls is not None:
                factory = listener_factory(tls, factory)
            port = listen_on(self.reactor, b, factory)
            if self.controlled and self.config.server.worker_processes > 1:
                accept_one_at_a_time(port)
            self.ports.append(port)
            log.info("listening on {key}", key=b.listen.key if b.listen.port else
                     f"{b.listen.address}:{b.port}")
        if self.admin is not None:
            self.admin.restore()             # the state file, before any request
        if self.admin_bound is not None:
            self._start_admin(self.admin_bound)
        if not self.controlled:
            self.ctx.start_owned()           # health checks, members_from lookups
        if self.cluster is not None:
            self.cluster.start()
        if any(p.ttl is not None for p in self.ctx.pools) or self.ctx.forward_gates:
            # pool maintenance: idle connections above smax older than ttl are closed,
            # and a forward proxy's workers for origins no longer in use are forgotten
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(1.0, now=False)
        if self.access_log is not None:
            self._flusher = task.LoopingCall(self.access_log.flush)
            self._flusher.clock = self.reactor
            self._flusher.start(1.0, now=False)

    def _start_admin(self, b: BoundSocket) -> None:
        factory = self.admin.listener_site()
        tls = self.tls.get("admin")
        if tls is not None:
            factory = listener_factory(tls, factory)
        self.ports.append(listen_on(self.reactor, b, factory))
        scheme = "https" if tls is not None else "http"
        log.info("admin listener on {scheme}://{key}/ ({pages})", scheme=scheme,
                 key=b.listen.key if b.listen.port else f"{b.listen.address}:{b.port}",
                 pages=", ".join(self.admin.pages))

    def _hang_up_idle(self, fresh_too: bool) -> None:
        for conn in list(self.ctx.connections):
            if not conn.queue and conn.cur is None and conn.tunnel is None and \
                    (fresh_too or conn.requests_served):
                conn.hang_up()

    def _sweep(self):
        for pool in self.ctx.pools:
            pool.sweep()
        self.ctx.workers.sweep_forward()

    @defer.inlineCallbacks
    def stopService(self):
        self.ctx.stopping = True
        self.ctx.stop_owned()
        if self.cluster is not None:
            yield self.cluster.stop()
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        # idle keep-alive connections are closed now; one accepted but with no request
        # yet is a client about to send one (it connected a moment ago, maybe to this
        # worker just as a reload replaced it): its request is answered, with
        # Connection: close, unless none comes within FIRST_REQUEST_GRACE
        self._hang_up_idle(fresh_too=False)
        waited = 0.0
        grace = self.config.server.graceful_timeout
        fresh_closed = False
        while self.ctx.connections and waited < grace:
            yield task.deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1
            if not fresh_closed and waited >= FIRST_REQUEST_GRACE:
                fresh_closed = True
                self._hang_up_idle(fresh_too=True)
        for conn in list(self.ctx.connections):
            conn.transport.abortConnection()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for pool in self.ctx.pools:
            pool.close_idle()
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        if self.access_log is not None:
            self.access_log.close()
        yield super().stopService()


def build_service(config: Config, reactor=None, takeover: bool = False) -> ProxyService:
    """Check certificates, bind every listener and open the access log, or raise
    ConfigError / StartupError: nothing is bound when a certificate is wrong.
    Sockets inherited (from the process taken over with --takeover, or from systemd)
    are used instead of binding where their keys match (_inherit)."""
    tls = check_files(config)                 # or ConfigError, before any bind
    if config.cluster is not None:
        from .cluster.store import probe
        why = probe(config.cluster)           # a wrong password: before any bind too
        if why:
            raise StartupError(f"{config.path}: {why}")
    inherited, handing = _inherit(config, takeover)
    server = None
    if config.server.master_process:
        from .process import handover
        try:
            server = handover.for_master(config, reactor, handing)   # if configured
        except handover.HandoverError as e:
            raise StartupError(str(e)) from None
    try:
        bound, admin_bound = _bind(config, inherited, reactor)
    except StartupError:
        if server is not None:
            server.stop()
        raise
    close_unused(inherited, "not in this configuration", "info" if handing else "warn")
    bound_all = bound + ([admin_bound] if admin_bound else [])
    access_log = open_access_log(config, bound_all)
    try:
        if config.server.master_process:
            from .process.master import MasterService
            service = MasterService(config, bound, access_log, reactor, tls=tls,
                                    admin_bound=admin_bound)
            service.handover = server
            return service
        service = ProxyService(config, bound, access_log, reactor, tls, admin_bound)
    except ConfigError:
        for b in bound_all:
            b.sock.close()
        raise
    # one process: it may take sockets over, but there is no master to hand them on
    if handing is not None:
        service.reactor.callWhenRunning(handing.serving, service.reactor)
    if config.server.handover_socket:
        log.warn("server.handover_socket is served by the master only: nothing listens "
                 "on it with master_process = false")
    return service


def _inherit(config: Config, takeover: bool):
    """(listener key -> inherited socket, the Takeover or None): the sockets of the
    process on server.handover_socket with --takeover, else systemd's (if any)."""
    from . import activation
    from .process import handover
    if not takeover:
        admin = config.admin.listen if config.admin is not None else None
        return activation.inherited(config.listeners, admin), None
    try:
        handing = handover.Takeover.connect(config)
    except handover.HandoverError as e:
        raise StartupError(str(e)) from None
    return handing.sockets, handing


def _bind(config: Config, inherited=None, reactor=None):
    """Every listener and the admin listener (inherited sockets where the keys match),
    or StartupError with nothing bound. For a reactor that binds each address again
    itself (IOCP), the sockets are bound as a check but do not listen (bind_one)."""
    admin_listen = config.admin.listen if config.admin is not None else None
    if reactor is None:
        from twisted.internet import reactor
    accept = config.server.master_process or listeners.adopts(reactor)
    try:
        bound = bind_all(config.listeners, inherited, accept)
    except BindError as e:
        raise StartupError(str(e)) from None
    admin_bound = None
    if admin_listen is not None:
        try:
            admin_bound = bind_all([admin_listen], inherited, accept)[0]
        except BindError as e:
            for b in bound:
                b.sock.close()
            raise StartupError(f"admin: {e}") from None
    return bound, admin_bound


def open_access_log(config: Config, bound: list) -> AccessLog | None:
    """The access log, opened after the binds; if it cannot be, the sockets are closed
    and start-up stops with one line."""
    target = config.server.access_log
    if not target:
        return None
    try:
        return AccessLog(target)
    except OSError as e:
        for b in bound:
            b.sock.close()
        raise StartupError(f"{config.path}: server.access_log: {target!r} cannot be "
                           f"opened: {e.strerror or e}") from None

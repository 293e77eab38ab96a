"""What the listeners share: routing a parsed request to its handler, and the logs.

Owns the ProxyContext (config, router, pools, balancers, access log, clock) and the
dispatch of each request: request-target checks, vhost and route choice, Max-Forwards,
backend choice; then the reverse handler takes over. Per-route facts that do not
change per request (header actions, rewrite maps, timeouts) are computed once here.
"""

from __future__ import annotations

from twisted.logger import Logger

from . import headers as H
from .authority import absolute_form, host_port
from .balancer import Balancer
from .balancer.attempt import Attempt
from .balancer.health import HealthCheck
from .config import BackendURL, Config, VhostConfig
from .handlers.connect import ConnectExchange, ForwardGate
from .handlers.reverse import ReverseExchange
from .outages import Outage, summary_interval
from .pool import Pool
from .runtime import ListenerCounters, RouteRuntime, Runtime
from .tls import client_options_for
from .workers import Workers
from .routing import Router, has_encoded_slash, normalize_path, split_host
from .wire.messages import HttpDate

log = Logger(namespace="twistproxy")

# How many (listener, Host, target) routing answers are remembered, for targets up to
# 512 bytes; Host and target are client-chosen, so the table is emptied when full.
_ROUTED_MAX = 4096


def _set_host(req, authority: bytes) -> None:
    """An absolute-form target's authority replaces Host (RFC 9112 §3.2.2)."""
    req.headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
    req.headers.insert(0, (b"Host", authority))
    req.host = authority


class ProxyContext:
    def __init__(self, config: Config, reactor, access_log=None):
        self.config = config
        self.server = config.server
        self.reactor = reactor
        self.access_log = access_log
        self.router = Router(config)
        self._routed: dict = {}          # see _route()
        self.http_date = HttpDate(reactor.seconds)
        self.server_header = H.server_header(config.server.server_tokens)
        # [server] served_by_header: a whole header line naming this process (set by
        # served_by(); the process/ worker adds its number), b"" when not configured
        self.served_by_line = b""
        self.served_by(None)
        s = config.server
        self.head_limit = s.limit_request_line + s.limit_request_fields * \
            (s.limit_request_fieldsize + 2) + 4
        self.workers = Workers(reactor, config.server, client_options_for, config.path)
        self.runtime = Runtime(Balancer(b) for b in config.balancers.values())
        self.health_checks: list[HealthCheck] = []
        for name, bal in self.runtime.balancers.items():
            retry = min((m.config.worker.retry for m in bal.members), default=(
                bal.config.members_from.member.worker.retry if bal.config.members_from
                else 60.0))
            bal.outage = Outage(f"balancer://{name}", summary_interval(retry),
                                reactor.seconds, reactor.callLater)
            for i, m in enumerate(bal.members):
                m.pool = self.workers.define(m.config.url, m.config.worker,
                                             f"balancer.{name}.member[{i}]", member=True)
                if m.config.hcmethod != "NONE":
                    self.health_checks.append(HealthCheck(reactor, self.runtime, m))
        self.runtime.subscribe(self._members_added)
        # members_from: DNS lookups, run (with the health checks) only by the process
        # that owns admin state: start_owned()
        self.discoveries = []
        self.owns_state = False
        if any(b.members_from for b in config.balancers.values()):
            # twisted.names only where a balancer uses it: not in every start-up
            from .balancer.discovery import Discovery, make_resolver
            resolver = make_resolver(config.server.resolver, reactor)
            self.discoveries = [Discovery(reactor, self.runtime, name, b.members_from,
                                          resolver)
                                for name, b in config.balancers.items() if b.members_from]
        self.admin = None       # admin.site.Admin, for routes with a `handler`
        self.cluster = None     # cluster.sync.ClusterSync, in the process that talks to Redis
        self.connections: set = set()
        self.listeners = {listen.key: ListenerCounters() for listen in config.listeners}
        self.stopping = False
        self.routes: dict[str, RouteRuntime] = {}        # by key path, "vhost[0].route[1]"
        for vhost in config.vhosts:
            entries = self._reverse_entries(vhost)
            for route in vhost.routes:
                self.routes[route.where] = RouteRuntime(self, vhost, route, entries)
        # the forward proxy: per listener, its first vhost with proxy_requests
        self.forward_gates: dict[str, ForwardGate] = {}
        for listen in config.listeners:
            for i, v in enumerate(config.vhosts):
                if v.proxy_requests and (not v.listen or listen.key in v.listen):
                    self.forward_gates[listen.key] = ForwardGate(self, v, f"vhost[{i}]")
                    break
        self._vhost_errors = {id(v): tuple(a for a in v.response_headers if a.always)
                              for v in config.vhosts}

    # -- what the admin pages read: this process's figures, or in a master the sums over
    # its workers (process/totals.py sets `totals` before a page is rendered)
    totals = None
    generation = 1          # a master's: the configurations it has run (reloads + 1)

    def census(self):
        from .runtime.counters import Census
        return self.totals.census if self.totals is not None else Census(self.connections)

    def pool_stats(self, pool) -> dict:
        return self.totals.pool_stats(pool) if self.totals is not None else pool.stats()

    def open_connections(self) -> int:
        return self.totals.connections if self.totals is not None else len(self.connections)

    def processes(self) -> int:
        return self.totals.workers if self.totals is not None else 1

    def served_by(self, worker: int | None) -> None:
        """The served_by_header line for this process: `twistproxy pid P`, or with
        worker processes `twistproxy worker I pid P`."""
        import os
        name = self.config.server.served_by_header
        if not name:
            return
        who = f"worker {worker} pid {os.getpid()}" if worker is not None else \
            f"pid {os.getpid()}"
        self.served_by_line = f"{name}: twistproxy {who}\r\n".encode("ascii")

    def _reverse_entries(self, vhost: VhostConfig) -> list:
        entries = []
        for route in vhost.routes:
            if not route.reverse or route.url is None:
                continue
            if route.url.is_balancer:       # its members now: found by DNS, added too
                for m in self.runtime.balancer(route.url.host).members:
                    base = m.config.url.origin + m.config.url.path.rstrip("/")
                    entries.append((base + route.url.path, route.path))
            else:
                entries.append((route.url.origin + route.url.path, route.path))
        return entries

    def _members_added(self, changes) -> None:
        """A member added at runtime (the manager's b_nwrkr, or found by DNS) gets its
        worker here, and in the process that owns health checks its check; a member
        removed (gone from DNS) loses its check and its idle connections. Its worker
        stays defined (a worker is by origin and may be shared; an address that comes
        back reuses it)."""
        changed = {c.balancer for c in changes
                   if c.field in ("add_member", "discover_member", "remove_member")}
        for name in changed:
            self._refresh_reverse(name)
        for c in changes:
            if c.field in ("add_member", "discover_member"):
                bal = self.runtime.balancer(c.balancer)
                m = self.runtime.member(c.balancer, c.member)
                where = (f"balancer.{c.balancer}.members_from" if c.field == "discover_member"
                         else f"balancer.{c.balancer}.member[{len(bal.members) - 1}]")
                m.pool = self.workers.define(m.config.url, m.config.worker, where,
                                             member=True)
                if c.field == "discover_member" and m.config.hcmethod != "NONE":
                    check = HealthCheck(self.reactor, self.runtime, m)
                    self.health_checks.append(check)
                    if self.owns_state and not self.stopping:
                        check.start()
            elif c.field == "remove_member":
                for check in [h for h in self.health_checks
                              if h.balancer_name == c.balancer and h.member.name == c.member
                              and h.member.owner is not None
                              and h.member not in h.member.owner.members]:
                    check.stop()
                    self.health_checks.remove(check)
                # its idle keep-alive connections are closed unless a member still
                # uses its worker (connections in use finish their requests)
                in_use = {id(m.pool) for b in self.runtime.balancers.values()
                          for m in b.members}
                for _, pool in self.workers.by_origin.get(c.member, ()):
                    if id(pool) not in in_use:
                        pool.close_idle()

    def _refresh_reverse(self, balancer: str) -> None:
        """A balancer's members changed: the reverse maps (ProxyPassReverse) of the
        vhosts whose reverse routes name it are made again."""
        for vhost in self.config.vhosts:
            if not any(r.reverse and r.url is not None and r.url.is_balancer
                       and r.url.host == balancer for r in vhost.routes):
                continue
            entries = self._reverse_entries(vhost)
            for route in vhost.routes:
                rt = self.routes.get(route.where)
                if rt is not None:
                    rmap = H.ReverseMap(entries, route.cookie_domain, route.cookie_path)
                    rt.reverse_map = rmap if rmap else None

    def start_owned(self) -> None:
        """This process owns admin state (the master, or the one process): it runs
        the health checks and the DNS lookups of members_from."""
        self.owns_state = True
        for check in self.health_checks:
            check.start()
        for d in self.discoveries:
            d.start()

    def stop_owned(self) -> None:
        self.owns_state = False
        for d in self.discoveries:
            d.stop()
        for check in self.health_checks:
            check.stop()

    @property
    def pools(self) -> list[Pool]:
        return list(self.workers.pools())

    # -- the client connections' questions ---------------------------------------------

    def dispatch(self, conn, req) -> None:
        target = req.target
        method = req.method
        if b"#" in target:
            return self.reject(conn, req, 400, "fragment in request target")
        listen = conn.listen
        if listen is not None and listen.redirect_to_https and target[:1] == b"/":
            return self._redirect_to_https(conn, req, listen)
        if target[:1] == b"/":
            raw_path, q, query = target.partition(b"?")
        elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            # absolute-form: the authority overrides Host (RFC 9112 §3.2.2)
            parts = absolute_form(target)
            if parts is None:
                return self.reject(conn, req, 400, "bad absolute-form target")
            scheme, authority, path = parts
            if req.host == b"":
                # RFC 9110 §7.2: Host, when sent, is that same authority
                return self.reject(conn, req, 400, "empty Host beside an absolute-form target")
            gate = self.forward_gates.get(conn.listen_key)
            if gate is not None and not self.router.names_host(
                    conn.listen_key, authority.decode("latin-1")):
                return self._forward(conn, req, gate, scheme, authority, path)
            _set_host(req, authority)
            raw_path, q, query = path.partition(b"?")
        elif method == b"CONNECT":
            gate = self.forward_gates.get(conn.listen_key)
            if gate is None:
                return self.reject(conn, req, 405, "CONNECT is not enabled (proxy_requests)",
                                   headers=[(b"Allow",
                                             b"GET, HEAD, POST, PUT, DELETE, OPTIONS")])
            hostport = host_port(target)
            if hostport is None:
                return self.reject(conn, req, 400, "CONNECT needs host:port")
            return ConnectExchange(self, conn, req, gate, *hostport).start()
        elif target == b"*" and method == b"OPTIONS":
            return conn.respond_error(req, 200, headers=[(b"Allow",
                                      b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH")],
                                      body=b"")
        else:
            return self.reject(conn, req, 400, "bad request target")
        key = (conn.listen_key, req.host, target)
        routed = self._routed.get(key)
        if routed is None:
            routed = self._route(conn, req, raw_path, query if q else None, key)
            if routed is None:
                return
        rt, target_bytes, pool = routed
        req.route = rt
        if self._max_forwards_answered(conn, req):
            return
        if rt.balancer is not None:
            return self._dispatch_balanced(conn, req, rt, target_bytes)
        if pool is None:             # handler = "balancer-manager" and the like
            return self.admin.serve(conn, req, rt.route.handler)
        ReverseExchange(self, conn, req, rt, target_bytes, pool, rt.backend_name).start()

    def _route(self, conn, req, raw_path: bytes, query: bytes | None, key):
        """(route runtime, backend target, pool) for a request, or None once answered
        with 400/404. Remembered for the next request with the same listener, Host and
        target, unless the vhost routes on other headers (match_headers)."""
        host = req.host.decode("latin-1") if req.host is not None else None
        vhost = self.router.vhost_for(conn.listen_key, host)
        path = raw_path.decode("latin-1")
        slashes = vhost.allow_encoded_slashes
        if slashes != "nodecode" and has_encoded_slash(path):
            if slashes == "off":     # Apache's AllowEncodedSlashes Off
                return self.reject(conn, req, 404, "encoded slash in the path "
                                   "(allow_encoded_slashes = \"off\")")
            path = normalize_path(path, decode_slashes=True)
        else:
            path = normalize_path(path)
        if path is None:
            return self.reject(conn, req, 400, "invalid path")
        match = self.router.route_for(vhost, path, query.decode("latin-1")
                                      if query is not None else None, req.header)
        if match is None:
            return self.reject(conn, req, 404, "no route")
        rt = self.routes[match.route.where]
        target = match.target.encode("latin-1")
        routed = (rt, target, rt.pool_for(target) if rt.pool is not None else None)
        if len(req.target) <= 512 and not self.router.reads_headers(vhost):
            if len(self._routed) >= _ROUTED_MAX:
                self._routed.clear()    # targets are client-chosen: bounded
            self._routed[key] = routed
        return routed

    def _dispatch_balanced(self, conn, req, rt: RouteRuntime, target: bytes,
                           waited_until: float | None = None) -> None:
        bal = rt.balancer
        if waited_until is not None and (conn.closing or req not in conn.queue):
            return                       # the client left while we polled: logged then
        now = self.reactor.seconds()
        attempt = Attempt(self.runtime, bal, target,
                          req.header("cookie") if bal.sticky_cookie else None, rt.where)
        choice = attempt.first(conn.pinned, now)
        member = choice.member
        if member is None:
            if conn.transport.connected and attempt.poll(
                    choice, now, waited_until, self.reactor.callLater,
                    lambda until: self._dispatch_balanced(conn, req, rt, target, until)):
                return
            why = (f"sticky route {choice.sticky_route!r} is unavailable and nofailover is on"
                   if attempt.refused_sticky(choice) else "no usable member")
            bal.outage.failed(rt.where, f"balancer://{bal.name}", why, 503)
            return conn.respond_error(req, 503)
        if bal.outage.failing:
            bal.outage.succeeded()
        ReverseExchange(self, conn, req, rt, attempt.member_target(member), member.pool,
                        member.log_name, attempt=attempt).start()

    def _forward(self, conn, req, gate, scheme: bytes, authority: bytes, path: bytes) -> None:
        """An absolute-form request for another host, through a proxy_requests vhost."""
        # never None: absolute_form() has checked the authority
        host, port = host_port(authority, 443 if scheme == b"https" else 80)
        _set_host(req, authority)
        rt = req.route = gate.runtime

        def proceed():
            if self._max_forwards_answered(conn, req):
                return
            url = BackendURL(scheme.decode(), host.lower(), port, "", "")
            pool = self.workers.forward_pool(url, url.origin + path.decode("latin-1"),
                                             rt.where)
            ReverseExchange(self, conn, req, rt, path, pool, url.origin).start()
        gate.admit(conn, req, host, port, False, proceed)

    def _redirect_to_https(self, conn, req, listen) -> None:
        """301 to the same path and query over https: on the TLS listener of the same
        address if there is one, else the first TLS listener, else port 443."""
        tls_ports = [l.port for l in self.config.listeners
                     if l.tls is not None and l.address == listen.address] or \
            [l.port for l in self.config.listeners if l.tls is not None] or [443]
        port = tls_ports[0]
        host = (req.host or self.router.vhost_for(conn.listen_key, None)
                .server_name.encode("idna"))
        host = split_host(host.decode("latin-1"))[0].encode("latin-1")
        location = b"https://%s%s%s" % (host, b"" if port == 443 else b":%d" % port,
                                        req.target)
        conn.respond_error(req, 301, headers=[(b"Location", location)])

    def _max_forwards_answered(self, conn, req) -> bool:
        """OPTIONS/TRACE with Max-Forwards: answered here at 0, else decremented."""
        try:
            mf = H.max_forwards(req.headers, req.method)
        except ValueError:
            self.reject(conn, req, 400, "invalid Max-Forwards")
            return True
        if mf is None:
            return False
        if mf == 0:
            self._answer_max_forwards(conn, req)
            return True
        req.headers = H.decrement_max_forwards(req.headers)
        return False

    def _answer_max_forwards(self, conn, req) -> None:
        if req.method == b"TRACE":
            body = req.request_line + b"\r\n" + b"".join(
                b"%s: %s\r\n" % h for h in req.headers)
            return conn.respond_error(req, 200, headers=[(b"Content-Type", b"message/http")],
                                      body=body)
        return conn.respond_error(req, 200, headers=[(b"Allow",
                                  b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH")], body=b"")

    def reject(self, conn, req, status: int, why: str, headers=()) -> None:
        self.log_rejected(conn, req, status, why)
        conn.respond_error(req, status, headers=headers)

    def log_rejected(self, conn, req, status: int, why: str) -> None:
        log.info("{peer}: {status} {why}: {line!r}", peer=conn.peer_ip, status=status,
                 why=why, line=req.request_line[:200])

    def error_headers(self, conn, req, headers: list) -> list:
        """Header actions marked `always` also apply to the proxy's own responses."""
        rt = req.route
        if rt is not None:
            actions = rt.error_actions
        else:
            host = req.host.decode("latin-1") if req.host else None
            actions = self._vhost_errors[id(self.router.vhost_for(conn.listen_key, host))]
        return H.apply_actions(headers, actions, error_response=True) if actions else headers

    def log_access(self, conn, req) -> None:
        """Once per request: its access-log line, and the counters of its route and
        listener (plain adds; readers compute rates)."""
        status, sent = req.status, req.sent
        cls = status // 100 if status < 600 else 0
        rt = req.route
        if rt is not None:
            c = rt.counters
            c.requests += 1
            c.responses[cls] += 1
            c.bytes_out += sent
        lc = self.listeners.get(conn.listen_key)
        if lc is not None:
            lc.requests += 1
            lc.responses[cls] += 1
            lc.bytes_out += sent
        if self.access_log is None:
            return
        self.access_log.log(conn.peer_ip, req.request_line, req.status, req.sent,
                            req.referer, req.user_agent, req.started, req.backend, req.user)

    def connection_made(self, conn) -> None:
        self.connections.add(conn)
        lc = self.listeners.get(conn.listen_key)
        if lc is not None:
            lc.accepted += 1
            lc.open += 1

    def connection_closed(self, conn) -> None:
        self.connections.discard(conn)
        lc = self.listeners.get(conn.listen_key)
        if lc is not None:
            lc.open -= 1

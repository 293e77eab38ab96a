"""/metrics on the admin listener: the Prometheus exposition of the live state.

Owns the metric names (shaped like HAProxy's exporter: twistproxy_server_* per
balancer member, twistproxy_backend_* per route, twistproxy_frontend_* per listener,
twistproxy_process_*) and a collector that reads the counters when scraped, on the
reactor thread where they live; the request path only ever does its plain adds.
"""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, \
    ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource

from .. import __version__
from ..runtime.counters import Census

# response classes as labels: index status // 100 of the counters' lists (0: no
# status was sent, logged as 499, or one of 600 and above)
CODES = (("1xx", 1), ("2xx", 2), ("3xx", 3), ("4xx", 4), ("5xx", 5), ("other", 0))
# failure kinds (balancer.attempt.cause_kind), split as HAProxy splits them
CONNECTION_ERRORS = ("refused", "timeout")
RESPONSE_ERRORS = ("reset", "bad_response")
SERVER_STATES = ("UP", "DOWN", "MAINT", "DRAIN")
FLAGS = "DSIHRENC"


def server_state(member) -> str:
    """HAProxy's state names: MAINT (D, S), DOWN (E, C), DRAIN (N), else UP."""
    f = member.flags
    if "D" in f or "S" in f:
        return "MAINT"
    if "E" in f or "C" in f:
        return "DOWN"
    if "N" in f:
        return "DRAIN"
    return "UP"


class _Families:
    """Metric families by short name, created as they are declared."""

    def __init__(self, prefix: str, labels: list[str]):
        self.prefix = prefix
        self.labels = labels
        self.all: list = []

    def gauge(self, name: str, doc: str, extra: tuple = ()):
        f = GaugeMetricFamily(self.prefix + name, doc, labels=self.labels + list(extra))
        self.all.append(f)
        return f

    def counter(self, name: str, doc: str, extra: tuple = ()):
        f = CounterMetricFamily(self.prefix + name, doc, labels=self.labels + list(extra))
        self.all.append(f)
        return f


def _errors(fam_conn, fam_resp, labels: list, errors: dict) -> None:
    for kind in CONNECTION_ERRORS:
        fam_conn.add_metric(labels + [kind], errors.get(kind, 0))
    for kind in RESPONSE_ERRORS:
        fam_resp.add_metric(labels + [kind], errors.get(kind, 0))


def _responses(fam, labels: list, counts: list) -> None:
    for code, i in CODES:
        fam.add_metric(labels + [code], counts[i])


class ProxyCollector:
    """Reads a ProxyContext's balancers, routes, listeners and connections at scrape
    time (prometheus_client's custom collector protocol: collect() yields families)."""

    def __init__(self, ctx, started: float | None = None):
        self.ctx = ctx
        self.started = ctx.reactor.seconds() if started is None else started

    def collect(self):
        census = self.ctx.census()
        yield from self._servers()
        yield from self._backends(census)
        yield from self._frontends()
        yield from self._process()

    def _servers(self):
        ctx = self.ctx
        now = ctx.reactor.seconds()
        s = _Families("twistproxy_server_", ["balancer", "member"])
        status = s.gauge("status", "Current state of the member, per state label value "
                         "(MAINT: D or S, DOWN: E or C, DRAIN: N).", ("state",))
        flag = s.gauge("flag", "Status flags of the member as Apache's balancer-manager "
                       "shows them, one series per flag (1: set).", ("flag",))
        weight = s.gauge("weight", "Load factor of the member (Apache's loadfactor).")
        lbset = s.gauge("lbset", "Load balancer set of the member.")
        current = s.gauge("current_sessions", "Requests the member is handling now.")
        sessions = s.counter("sessions", "Requests sent to the member (Apache's Elected).")
        bytes_in = s.counter("bytes_in", "Request bytes sent to the member.")
        bytes_out = s.counter("bytes_out", "Response bytes read from the member.")
        responses = s.counter("http_responses", "Responses from the member by status "
                              "class.", ("code",))
        conn_errors = s.counter("connection_errors", "Failed attempts on the member: "
                                "connection refused, timed out.", ("kind",))
        resp_errors = s.counter("response_errors", "Failed attempts on the member: "
                                "connection reset or closed, response not HTTP.", ("kind",))
        retries = s.counter("retry_warnings", "Requests sent again to the member on a "
                            "new connection after a kept-alive one failed.")
        redispatch = s.counter("redispatch_warnings", "Requests failed over from the "
                               "member to another.")
        checks = s.counter("check_failures", "Failed health checks.")
        downtime = s.counter("downtime_seconds", "Time the member spent in error state.")
        idle = s.gauge("idle_connections_current", "Idle connections of the member's "
                       "worker (shared, as Apache's workers are, by every member and "
                       "route with that URL).")
        used = s.gauge("used_connections_current", "Connections of the member's worker "
                       "in use (shared like idle_connections_current).")
        for b in ctx.runtime.balancers.values():
            for m in b.members:
                lv = [b.name, m.name]
                state = server_state(m)
                for st in SERVER_STATES:
                    status.add_metric(lv + [st], 1 if st == state else 0)
                for f in FLAGS:
                    flag.add_metric(lv + [f], 1 if f in m.flags else 0)
                weight.add_metric(lv, m.lbfactor / 100)
                lbset.add_metric(lv, m.lbset)
                current.add_metric(lv, m.busy)
                sessions.add_metric(lv, m.elected)
                bytes_in.add_metric(lv, m.transferred)
                bytes_out.add_metric(lv, m.read)
                _responses(responses, lv, m.responses)
                _errors(conn_errors, resp_errors, lv, m.errors)
                retries.add_metric(lv, m.retries)
                redispatch.add_metric(lv, m.failovers)
                checks.add_metric(lv, m.hc_failed)
                down = m.error_seconds
                if "E" in m.flags and m.error_time:
                    down += max(0.0, now - m.error_time)
                downtime.add_metric(lv, down)
                if m.pool is not None:
                    stats = ctx.pool_stats(m.pool)
                    idle.add_metric(lv, stats["idle"])
                    used.add_metric(lv, stats["busy"])
        return s.all

    def _routes(self):
        """(name, [RouteRuntime, ...]): a forward proxy's vhost has one runtime per
        listener, shown as one route."""
        named: dict[str, list] = {}
        for where, rt in self.ctx.routes.items():
            named.setdefault(where, []).append(rt)
        for gate in self.ctx.forward_gates.values():
            named.setdefault(gate.runtime.where, []).append(gate.runtime)
        return named.items()

    def _backends(self, census: Census):
        ctx = self.ctx
        now = ctx.reactor.seconds()
        k = _Families("twistproxy_backend_", ["route"])
        info = k.gauge("info", "The route's vhost, path and backend URL (always 1).",
                       ("vhost", "path", "url"))
        status = k.gauge("status", "UP when the route has a usable member or worker.",
                         ("state",))
        active = k.gauge("active_servers", "Usable members that are not standby or spare.")
        backup = k.gauge("backup_servers", "Usable standby or spare members.")
        current = k.gauge("current_sessions", "Requests on the route being answered now.")
        requests = k.counter("http_requests", "Requests routed to the route.")
        responses = k.counter("http_responses", "Responses by status class.", ("code",))
        bytes_in = k.counter("bytes_in", "Request body bytes sent to the backends.")
        bytes_out = k.counter("bytes_out", "Response body bytes sent to the clients.")
        conn_errors = k.counter("connection_errors", "Requests failed: connection "
                                "refused, timed out.", ("kind",))
        resp_errors = k.counter("response_errors", "Requests failed: connection reset or "
                                "closed, response not HTTP.", ("kind",))
        retries = k.counter("retry_warnings", "Requests sent again on a new connection.")
        redispatch = k.counter("redispatch_warnings", "Requests failed over to another "
                               "member.")
        for where, rts in self._routes():
            lv = [where]
            first = rts[0]
            url = first.route.url
            info.add_metric(lv + [first.vhost.server_name,
                                  first.route.path or first.route.regex or "",
                                  "" if url is None else url.raw], 1)
            up = True
            b = first.balancer
            if b is not None:
                usable = [m for m in b.members if m.usable()]
                nback = sum(1 for m in usable if m.standby or m.spare)
                active.add_metric(lv, len(usable) - nback)
                backup.add_metric(lv, nback)
                up = bool(usable)
            elif first.pool is not None:
                p = first.pool
                up = not (p.error_time and now < p.error_time + p.retry)
            for st in ("UP", "DOWN"):
                status.add_metric(lv + [st], 1 if (st == "UP") == up else 0)
            counts = [rt.counters for rt in rts]
            current.add_metric(lv, sum(census.by_route.get(rt, 0) for rt in rts))
            requests.add_metric(lv, sum(c.requests for c in counts))
            _responses(responses, lv, [sum(c.responses[i] for c in counts)
                                       for i in range(6)])
            bytes_in.add_metric(lv, sum(c.bytes_in for c in counts))
            bytes_out.add_metric(lv, sum(c.bytes_out for c in counts))
            errors: dict = {}
            for c in counts:
                for kind, n in c.errors.items():
                    errors[kind] = errors.get(kind, 0) + n
            _errors(conn_errors, resp_errors, lv, errors)
            retries.add_metric(lv, sum(c.retries for c in counts))
            redispatch.add_metric(lv, sum(c.failovers for c in counts))
        return k.all

    def _frontends(self):
        f = _Families("twistproxy_frontend_", ["listener"])
        current = f.gauge("current_sessions", "Client connections open now.")
        sessions = f.counter("sessions", "Client connections accepted.")
        requests = f.counter("http_requests", "Requests received (answered or not).")
        responses = f.counter("http_responses", "Responses by status class.", ("code",))
        bytes_out = f.counter("bytes_out", "Response body bytes sent to the clients.")
        handshakes = f.counter("tls_handshakes", "TLS handshakes completed.")
        failures = f.counter("tls_handshake_failures", "Connections that ended on a TLS "
                             "error before their handshake completed.")
        for key, lc in self.ctx.listeners.items():
            lv = [key]
            current.add_metric(lv, lc.open)
            sessions.add_metric(lv, lc.accepted)
            requests.add_metric(lv, lc.requests)
            _responses(responses, lv, lc.responses)
            bytes_out.add_metric(lv, lc.bytes_out)
            handshakes.add_metric(lv, lc.tls_handshakes)
            failures.add_metric(lv, lc.tls_failures)
        return f.all

    def _process(self):
        ctx = self.ctx
        p = _Families("twistproxy_process_", [])
        build = p.gauge("build_info", "twistproxy's version and reactor (always 1).",
                        ("version", "reactor", "python"))
        build.add_metric([__version__, type(ctx.reactor).__name__,
                          ".".join(map(str, sys.version_info[:3]))], 1)
        p.gauge("start_time_seconds", "When the proxy started, in seconds since the "
                "epoch.").add_metric([], self.started)
        p.gauge("uptime_seconds", "Seconds since the proxy started.").add_metric(
            [], max(0.0, ctx.reactor.seconds() - self.started))
        p.gauge("current_connections", "Client connections open now.").add_metric(
            [], ctx.open_connections())
        p.counter("connections", "Client connections accepted.").add_metric(
            [], sum(lc.accepted for lc in ctx.listeners.values()))
        p.counter("requests", "Requests received.").add_metric(
            [], sum(lc.requests for lc in ctx.listeners.values()))
        p.gauge("stopping", "1 while the proxy shuts down.").add_metric(
            [], 1 if ctx.stopping else 0)
        p.gauge("backend_connections_current", "Open connections to backends, every "
                "pool.").add_metric([], sum(ctx.pool_stats(pool)["open"] for pool in ctx.workers.pools()))
        return p.all


def registry_for(ctx, started: float | None = None) -> CollectorRegistry:
    """A private registry: the proxy's collector, and the process (CPU, memory, file
    descriptors), platform and garbage-collector ones prometheus_client provides."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(ctx, started))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Metrics(Resource):
    """GET (or HEAD) /metrics: the Prometheus text format (OpenMetrics when the
    scraper's Accept header asks for it)."""

    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            from .site import not_allowed
            return not_allowed(request, (b"GET", b"HEAD"))
        return super().render(request)

    def __init__(self, ctx, started: float | None = None):
        super().__init__()
        self.registry = registry_for(ctx, started)

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return encoder(self.registry)

"""/server-status on the admin listener: mod_status's page and its `?auto` machine format.

Owns turning the live state, read when asked (listener, route and member counters, a
census of the client connections), into Apache's keys and mod_proxy's ProxyStatus
lines, so monitoring written for Apache reads it; nothing here runs per request.
"""

from __future__ import annotations

import os
import time

from twisted.web.resource import Resource
from twisted.web.template import Element, XMLString, renderElement, renderer, tags

from .. import __version__

# mod_proxy's worker status words, in the order Apache prints them (checked against
# Apache 2.4.71's ?auto output); "Ok " follows when the member is usable
_STATUS_WORDS = (("I", "Ign"), ("N", "Drn"), ("D", "Dis"), ("S", "Stop"), ("E", "Err"),
                 ("H", "Stby"), ("R", "Spar"), ("C", "HcFl"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
           "Dec")


def member_status(member) -> str:
    """A member's status as ProxyStatus shows it: "Init Ok ", "Init Dis Stby ", ..."""
    words = ["Init"] + [w for flag, w in _STATUS_WORDS if flag in member.flags]
    if member.usable():
        words.append("Ok")
    return " ".join(words) + " "


def number(x: float) -> str:
    """A float as mod_status writes one (APR's %g): 11, 651.636, .666667."""
    s = f"{x:g}"
    return s[1:] if s.startswith("0.") else s


def http_time(t: float) -> str:
    """mod_status's time format, in UTC: Tuesday, 01-Dec-2026 19:49:03 UTC."""
    g = time.gmtime(t)
    return (f"{_DAYS[g.tm_wday]}, {g.tm_mday:02d}-{_MONTHS[g.tm_mon - 1]}-{g.tm_year} "
            f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} UTC")


def uptime_words(seconds: int) -> str:
    """"1 day 2 hours 3 seconds": the parts that are not zero, as Apache writes them."""
    parts = []
    rest = seconds
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n} {unit}{'' if n == 1 else 's'}")
    return " ".join(parts)


def size_text(n: int) -> str:
    """A byte count in four characters or so, like Apache's status tables: "615 ",
    "1.5K", " 12M"."""
    if n < 973:
        return f"{n:3d} "
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        if value < 9.95:
            return f"{value:.1f}{unit}"
        if value < 972.5 or unit == "E":
            return f"{round(value):3d}{unit}"
    return f"{n}"        # not reached


class Reading:
    """The numbers both formats show, read once per request of the status page."""

    def __init__(self, ctx, started: float):
        self.ctx = ctx
        self.now = ctx.reactor.seconds()
        self.started = started
        self.uptime = max(0, int(self.now - started))
        self.accesses = sum(lc.requests for lc in ctx.listeners.values())
        self.bytes = sum(lc.bytes_out for lc in ctx.listeners.values())
        self.census = ctx.census()
        self.times = os.times()
        try:
            self.load = os.getloadavg()
        except (AttributeError, OSError):       # Windows has no load average
            self.load = None

    def auto(self, host: str) -> str:
        """mod_status's `?auto`: `Key: value` lines, then ProxyStatus's balancer lines."""
        c, t = self.census, self.times
        lines = [host,
                 f"ServerVersion: twistproxy/{__version__}",
                 "ServerMPM: twisted",
                 f"CurrentTime: {http_time(self.now)}",
                 f"RestartTime: {http_time(self.started)}",
                 f"ParentServerConfigGeneration: {self.ctx.generation}",
                 "ParentServerMPMGeneration: 0",
                 f"ServerUptimeSeconds: {self.uptime}",
                 f"ServerUptime: {uptime_words(self.uptime)}".rstrip()]
        if self.load is not None:
            lines += [f"Load1: {self.load[0]:.2f}", f"Load5: {self.load[1]:.2f}",
                      f"Load15: {self.load[2]:.2f}"]
        cpu = t.user + t.system + t.children_user + t.children_system
        lines += [f"Total Accesses: {self.accesses}",
                  f"Total kBytes: {self.bytes // 1024}",
                  f"CPUUser: {number(t.user)}", f"CPUSystem: {number(t.system)}",
                  f"CPUChildrenUser: {number(t.children_user)}",
                  f"CPUChildrenSystem: {number(t.children_system)}"]
        if self.uptime:
            lines.append(f"CPULoad: {number(cpu / self.uptime * 100)}")
        lines.append(f"Uptime: {self.uptime}")
        if self.uptime:
            lines += [f"ReqPerSec: {number(self.accesses / self.uptime)}",
                      f"BytesPerSec: {number(self.bytes / self.uptime)}"]
        if self.accesses:
            lines.append(f"BytesPerReq: {number(self.bytes / self.accesses)}")
        # a "worker" is a client connection: no thread pool stands behind them. While
        # the proxy stops, those still answering are Apache's graceful ones.
        stopping = self.ctx.stopping
        lines += [f"BusyWorkers: {0 if stopping else c.busy}",
                  f"GracefulWorkers: {c.busy if stopping else 0}",
                  f"IdleWorkers: {c.waiting}",
                  f"Processes: {self.ctx.processes()}",
                  f"Stopping: {1 if stopping else 0}",
                  f"ConnsTotal: {self.ctx.open_connections()}",
                  f"ConnsAsyncWriting: {c.writing}",
                  f"ConnsAsyncKeepAlive: {c.waiting}",
                  f"ConnsAsyncClosing: {c.closing}",
                  f"Scoreboard: {c.scoreboard}"]
        if getattr(self.ctx, "cluster", None) is not None:
            from ..cluster.pages import cluster_auto
            lines += cluster_auto(self.ctx.cluster)
        for i, b in enumerate(self.ctx.runtime.balancers.values()):
            p = f"ProxyBalancer[{i}]"
            lines.append(f"{p}Name: balancer://{b.name}")
            for j, m in enumerate(b.members):
                w = f"{p}Worker[{j}]"
                lines += [f"{w}Name: {m.name}", f"{w}Status: {member_status(m)}",
                          f"{w}Elected: {m.elected}", f"{w}Busy: {m.busy}",
                          f"{w}Sent: {m.transferred >> 10}K", f"{w}Rcvd: {m.read >> 10}K"]
        return "\n".join(lines) + "\n"


_PAGE = XMLString("""<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1">
<head><title>twistproxy status</title></head>
<body>
<h1 t:render="title">twistproxy status for <t:slot name="host"/></h1>
<dl t:render="summary"/>
<h2>Listeners</h2>
<table border="0" t:render="listeners"/>
<h2>Routes</h2>
<table border="0" t:render="routes"/>
<div t:render="balancers"/>
</body>
</html>""")

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _row(cells, header: bool = False):
    cell = "th" if header else "td"          # a new tag each time: tags.td(...) mutates
    return tags.tr(*[getattr(tags, cell)(str(c)) for c in cells])


class StatusPage(Element):
    """The HTML page: Apache's summary, then per listener, route and balancer."""

    loader = _PAGE

    def __init__(self, reading: Reading, host: str):
        super().__init__()
        self.r = reading
        self.host = host

    @renderer
    def title(self, request, tag):
        return tag.fillSlots(host=self.host)

    @renderer
    def summary(self, request, tag):
        r, c = self.r, self.r.census
        facts = [("Server Version", f"twistproxy/{__version__}"),
                 ("Current Time", http_time(r.now)),
                 ("Restart Time", http_time(r.started)),
                 ("Server uptime", uptime_words(r.uptime) or "0 seconds"),
                 ("Total accesses", r.accesses),
                 ("Total Traffic", size_text(r.bytes).strip() or "0"),
                 ("Requests/sec", f"{r.accesses / r.uptime:g}" if r.uptime else "-"),
                 ("Requests being processed", c.busy),
                 ("Connections waiting for a request", c.waiting),
                 ("Connections closing", c.closing),
                 ("Scoreboard", c.scoreboard or "(no client connections)")]
        if r.load is not None:
            facts.insert(4, ("Server load", " ".join(f"{x:.2f}" for x in r.load)))
        return tag(*[[tags.dt(k), tags.dd(str(v))] for k, v in facts])

    @renderer
    def listeners(self, request, tag):
        rows = [_row(("Listener", "Open", "Accepted", "Requests") + _CLASSES +
                     ("Bytes out", "TLS handshakes", "TLS failures"), header=True)]
        for key, lc in self.r.ctx.listeners.items():
            rows.append(_row((key, lc.open, lc.accepted, lc.requests, *lc.responses[1:6],
                              size_text(lc.bytes_out), lc.tls_handshakes, lc.tls_failures)))
        return tag(*rows)

    @renderer
    def routes(self, request, tag):
        rows = [_row(("Route", "Vhost", "Path", "Backend", "Busy", "Requests") + _CLASSES +
                     ("Bytes in", "Bytes out", "Errors", "Retries", "Failovers"),
                     header=True)]
        by_route = self.r.census.by_route
        for where, rt in self.r.ctx.routes.items():
            c = rt.counters
            url = rt.route.url
            rows.append(_row((where, rt.vhost.server_name,
                              rt.route.path or rt.route.regex or "",
                              "!" if url is None else url.raw, by_route.get(rt, 0),
                              c.requests, *c.responses[1:6], size_text(c.bytes_in),
                              size_text(c.bytes_out), sum(c.errors.values()), c.retries,
                              c.failovers)))
        return tag(*rows)

    @renderer
    def balancers(self, request, tag):
        out = []
        if getattr(self.r.ctx, "cluster", None) is not None:
            from ..cluster.pages import cluster_html
            out += cluster_html(self.r.ctx.cluster)
        for b in self.r.ctx.runtime.balancers.values():
            out.append(tags.h2(f"Proxy LoadBalancer Status for balancer://{b.name}"))
            out.append(tags.table(
                _row(("SSes", "Timeout", "Method"), header=True),
                _row((b.stickysession or " - ", f"{b.timeout:g}", b.lbmethod)), border="0"))
            rows = [_row(("Sch", "Host", "Stat", "Route", "Redir", "F", "Set", "Acc",
                          "Busy", "Wr", "Rd"), header=True)]
            for m in b.members:
                url = m.config.url
                rows.append(_row((url.scheme, url.host, member_status(m), m.route,
                                  m.redirect, f"{m.lbfactor / 100:.2f}", m.lbset,
                                  m.elected, m.busy, size_text(m.transferred),
                                  size_text(m.read))))
            out.append(tags.table(*rows, border="0"))
        return tag(*out)


class ServerStatus(Resource):
    """GET (or HEAD) /server-status: the HTML page; with `?auto`, mod_status's
    text/plain machine format."""

    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            from .site import not_allowed
            return not_allowed(request, (b"GET", b"HEAD"))
        return super().render(request)

    def __init__(self, ctx, started: float):
        super().__init__()
        self.ctx = ctx
        self.started = started

    def render_GET(self, request):
        reading = Reading(self.ctx, self.started)
        host = (request.getRequestHostname() or b"").decode("latin-1")
        request.setHeader(b"Cache-Control", b"no-store")
        query = request.uri.partition(b"?")[2]
        if any(part.partition(b"=")[0] == b"auto" for part in query.split(b"&")):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return reading.auto(host).encode("utf-8")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        page = StatusPage(reading, host)
        return renderElement(request, page)

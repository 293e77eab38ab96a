"""/server-status (?auto and HTML) and /metrics, in-process on the real reactor: echo
backends, a proxy listener in front of a real ProxyContext and the admin resources on
a twisted.web Site, all on loopback ports; requests go through the proxy from client
threads, then both outputs are parsed and checked against what was sent."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistproxy.admin.metrics import Metrics
from twistproxy.admin.status import (Reading, ServerStatus, member_status, number,
                                     size_text, uptime_words)
from twistproxy.balancer.group import parse_status
from twistproxy.config import loads
from twistproxy.echo import EchoFactory
from twistproxy.proxy import ProxyContext
from twistproxy.tls import check_files, listener_factory
from twistproxy.wire.client import ClientFactory

HOST = "proxy.test"


class Hold(protocol.Protocol):
    """A backend that reads a request and answers only when told to."""

    def dataReceived(self, data):
        f = self.factory
        f.held.append(self)
        if f.arrived is not None:
            d, f.arrived = f.arrived, None
            d.callback(self)

    def answer(self):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class HoldFactory(protocol.Factory):
    protocol = Hold

    def __init__(self):
        self.held = []
        self.arrived = defer.Deferred()


class Lab:
    """Backends, a proxy listener and the admin site, all stopped by close()."""

    def __init__(self, tmp: Path, tls: bool = False):
        self.tmp = tmp
        self.ports = []
        self.a = self._listen(EchoFactory("A"))
        self.b = self._listen(EchoFactory("B"))
        self.hold_factory = HoldFactory()
        self.hold = self._listen(self.hold_factory)
        gone = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.dead = gone.getHost().port
        gone.stopListening()              # connections to it are refused from now on
        listen_tls = ""
        if tls:
            import trustme
            ca = trustme.CA()
            leaf = ca.issue_cert(HOST, "127.0.0.1")
            leaf.cert_chain_pems[0].write_to_path(str(tmp / "site.pem"))
            leaf.private_key_pem.write_to_path(str(tmp / "site.key"))
            ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
            listen_tls = f'tls = {{ cert = "{tmp}/site.pem", key = "{tmp}/site.key" }}'
        self.config = loads(f"""
[server]
keepalive_timeout = 120

[[listen]]
address = "127.0.0.1"
port = 8080
{listen_tls}

[[vhost]]
server_name = "{HOST}"
  [[vhost.route]]
  path = "/farm"
  url = "balancer://farm/"
  [[vhost.route]]
  path = "/mixed"
  url = "balancer://mixed/"
  [[vhost.route]]
  path = "/solo"
  url = "http://127.0.0.1:{self.a}/"
  [[vhost.route]]
  path = "/hold"
  url = "http://127.0.0.1:{self.hold}/"

[balancer.farm]
stickysession = "ROUTEID"
  [[balancer.farm.member]]
  url = "http://127.0.0.1:{self.a}/"
  route = "a"
  [[balancer.farm.member]]
  url = "http://127.0.0.1:{self.b}/"
  route = "b"
  loadfactor = 2

[balancer.mixed]
stickysession = "ROUTEID"
  [[balancer.mixed.member]]
  url = "http://127.0.0.1:{self.dead}/"
  route = "d"
  [[balancer.mixed.member]]
  url = "http://127.0.0.1:{self.a}/"
  route = "l"
""", str(tmp / "proxy.toml"))
        self.ctx = ProxyContext(self.config, reactor)
        self.started = reactor.seconds()
        listen = self.config.listeners[0]
        self.key = listen.key
        factory = ClientFactory(self.ctx, listen.key, b"https" if tls else b"http", listen)
        if tls:
            factory = listener_factory(check_files(self.config)[listen.key], factory)
            self.client_tls = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        self.proxy = self._listen(factory)
        root = Resource()
        root.putChild(b"server-status", ServerStatus(self.ctx, self.started))
        root.putChild(b"metrics", Metrics(self.ctx))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None
        self.admin = self._listen(site)

    def _listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port

    def close(self):
        for conn in list(self.ctx.connections):
            conn.transport.abortConnection()
        for pool in self.ctx.pools:
            pool.close_idle()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                    for p in self.ports])


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    pytest_twisted.blockon(lab.close())


@pytest.fixture
def tls_lab(tmp_path):
    lab = Lab(tmp_path, tls=True)
    yield lab
    pytest_twisted.blockon(lab.close())


# -- clients (blocking, run in threads so the reactor keeps serving) -----------------------

class Client:
    """One kept-alive connection to the proxy."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None):
        self.c = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                             timeout=10) if context else \
            http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def _get(self, path: str, headers: dict) -> tuple[int, bytes]:
        self.c.request("GET", path, headers={"Host": HOST, **headers})
        r = self.c.getresponse()
        return r.status, r.read()

    def get(self, path: str, **headers) -> defer.Deferred:
        return threads.deferToThread(self._get, path, headers)

    def close(self):
        self.c.close()


def _admin(port: int, path: str, method: str = "GET", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def admin(port: int, path: str, method: str = "GET", headers=None) -> defer.Deferred:
    return threads.deferToThread(_admin, port, path, method, headers)


@defer.inlineCallbacks
def scrape(lab: Lab):
    """/metrics parsed back by prometheus_client: {(sample name, labels): value}."""
    status, headers, body = yield admin(lab.admin, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@defer.inlineCallbacks
def auto(lab: Lab):
    """/server-status?auto: its host line and {key: value}."""
    status, headers, body = yield admin(lab.admin, "/server-status?auto")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    lines = body.decode().splitlines()
    keys = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")   # "ServerUptime:" when under a second
        assert sep and (value == "" or value[0] == " "), f"not a 'Key: value' line: {line!r}"
        value = value[1:]
        assert key not in keys, f"{key} twice"
        keys[key] = value
    return lines[0], keys


def m(name: str, **labels):
    return (name, tuple(sorted(labels.items())))


def server(name: str, member: str, balancer: str = "farm", **labels):
    return m(name, balancer=balancer, member=member, **labels)


# -- the counts -----------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_metrics_and_auto_count_the_requests_actually_sent(lab):
    a, b = f"http://127.0.0.1:{lab.a}", f"http://127.0.0.1:{lab.b}"
    c = Client(lab.proxy)
    try:
        sizes = {"a": 0, "b": 0}
        for route, n in (("a", 7), ("b", 3)):
            for _ in range(n):
                status, body = yield c.get("/farm/x", Cookie=f"ROUTEID=.{route}")
                assert status == 200 and b'"server": "%s"' % route.upper().encode() in body
                sizes[route] += len(body)
        for _ in range(2):
            status, _ = yield c.get("/nowhere")
            assert status == 404
        status, body = yield c.get("/solo/y", **{"X-Echo-Status": "503"})
        assert status == 503
        solo_size = len(body)
        got = yield scrape(lab)
        key, names = yield auto(lab)
    finally:
        c.close()

    # members: what each one was sent, and answered
    assert got[server("twistproxy_server_sessions_total", a)] == 7
    assert got[server("twistproxy_server_sessions_total", b)] == 3
    assert got[server("twistproxy_server_http_responses_total", a, code="2xx")] == 7
    assert got[server("twistproxy_server_http_responses_total", b, code="2xx")] == 3
    assert got[server("twistproxy_server_http_responses_total", a, code="5xx")] == 0
    assert got[server("twistproxy_server_bytes_out_total", a)] >= sizes["a"]
    assert got[server("twistproxy_server_bytes_out_total", b)] >= sizes["b"]
    assert got[server("twistproxy_server_current_sessions", a)] == 0
    assert got[server("twistproxy_server_weight", b)] == 2.0
    assert got[server("twistproxy_server_status", a, state="UP")] == 1
    assert got[server("twistproxy_server_status", a, state="DOWN")] == 0
    assert got[server("twistproxy_server_connection_errors_total", a, kind="refused")] == 0
    assert got[server("twistproxy_server_idle_connections_current", a)] == 1
    # routes
    farm, solo = "vhost[0].route[0]", "vhost[0].route[2]"
    assert got[m("twistproxy_backend_http_requests_total", route=farm)] == 10
    assert got[m("twistproxy_backend_http_responses_total", route=farm, code="2xx")] == 10
    assert got[m("twistproxy_backend_bytes_out_total", route=farm)] == \
        sizes["a"] + sizes["b"]
    assert got[m("twistproxy_backend_http_responses_total", route=solo, code="5xx")] == 1
    assert got[m("twistproxy_backend_bytes_out_total", route=solo)] == solo_size
    assert got[m("twistproxy_backend_active_servers", route=farm)] == 2
    assert got[m("twistproxy_backend_status", route=farm, state="UP")] == 1
    assert got[m("twistproxy_backend_info", route=farm, vhost=HOST, path="/farm",
                 url="balancer://farm/")] == 1
    # the listener: every request, the 404s too
    total = sizes["a"] + sizes["b"] + solo_size
    assert got[m("twistproxy_frontend_http_requests_total", listener=lab.key)] == 13
    assert got[m("twistproxy_frontend_http_responses_total", listener=lab.key,
                 code="2xx")] == 10
    assert got[m("twistproxy_frontend_http_responses_total", listener=lab.key,
                 code="4xx")] == 2
    assert got[m("twistproxy_frontend_http_responses_total", listener=lab.key,
                 code="5xx")] == 1
    assert got[m("twistproxy_frontend_sessions_total", listener=lab.key)] == 1
    assert got[m("twistproxy_frontend_current_sessions", listener=lab.key)] == 1
    assert got[m("twistproxy_frontend_bytes_out_total", listener=lab.key)] >= total
    assert got[m("twistproxy_process_requests_total")] == 13
    assert ("process_resident_memory_bytes", ()) in got
    assert any(name == "python_info" for name, _ in got)

    # ?auto: mod_status's keys, then ProxyStatus's
    assert key == "127.0.0.1"
    assert names["Total Accesses"] == "13"
    frontend_bytes = got[m("twistproxy_frontend_bytes_out_total", listener=lab.key)]
    assert names["Total kBytes"] == str(int(frontend_bytes) // 1024)
    assert names["BusyWorkers"] == "0" and names["IdleWorkers"] == "1"
    assert names["ConnsTotal"] == "1" and names["ConnsAsyncKeepAlive"] == "1"
    assert names["Scoreboard"] == "_"
    assert names["ServerVersion"].startswith("twistproxy/")
    assert int(names["Uptime"]) >= 0 and names["Processes"] == "1"
    assert names["ProxyBalancer[0]Name"] == "balancer://farm"
    assert names["ProxyBalancer[0]Worker[0]Name"] == a
    assert names["ProxyBalancer[0]Worker[0]Elected"] == "7"
    assert names["ProxyBalancer[0]Worker[1]Elected"] == "3"
    assert names["ProxyBalancer[0]Worker[0]Status"] == "Init Ok "
    assert names["ProxyBalancer[0]Worker[0]Busy"] == "0"
    read_a = int(got[server("twistproxy_server_bytes_out_total", a)])
    assert names["ProxyBalancer[0]Worker[0]Rcvd"] == f"{read_a >> 10}K"
    sent_b = int(got[server("twistproxy_server_bytes_in_total", b)])
    assert names["ProxyBalancer[0]Worker[1]Sent"] == f"{sent_b >> 10}K"
    assert names["ProxyBalancer[1]Name"] == "balancer://mixed"


@pytest_twisted.inlineCallbacks
def test_a_request_under_way_is_busy_on_its_route_and_listener(lab):
    c = Client(lab.proxy)
    pending = c.get("/hold/slow")
    held = yield lab.hold_factory.arrived        # the backend has the request now
    got = yield scrape(lab)
    _, names = yield auto(lab)
    hold = "vhost[0].route[3]"
    assert got[m("twistproxy_backend_current_sessions", route=hold)] == 1
    assert got[m("twistproxy_backend_current_sessions", route="vhost[0].route[0]")] == 0
    assert got[m("twistproxy_frontend_current_sessions", listener=lab.key)] == 1
    assert names["BusyWorkers"] == "1" and names["IdleWorkers"] == "0"
    assert names["Scoreboard"] == "W" and names["GracefulWorkers"] == "0"
    lab.ctx.stopping = True                 # what ProxyService.stopService sets first
    _, names = yield auto(lab)
    lab.ctx.stopping = False
    assert names["Stopping"] == "1"
    assert names["BusyWorkers"] == "0" and names["GracefulWorkers"] == "1"
    held.answer()
    status, body = yield pending
    assert status == 200 and body == b"ok"
    got = yield scrape(lab)
    assert got[m("twistproxy_backend_current_sessions", route=hold)] == 0
    assert got[m("twistproxy_backend_http_requests_total", route=hold)] == 1
    c.close()


@pytest_twisted.inlineCallbacks
def test_a_failover_counts_the_refused_member_and_puts_it_down(lab):
    dead, live = f"http://127.0.0.1:{lab.dead}", f"http://127.0.0.1:{lab.a}"
    c = Client(lab.proxy)
    status, body = yield c.get("/mixed/z", Cookie="ROUTEID=.d")
    c.close()
    assert status == 200 and b'"server": "A"' in body
    got = yield scrape(lab)
    _, names = yield auto(lab)
    d = dict(balancer="mixed")
    assert got[server("twistproxy_server_connection_errors_total", dead, kind="refused",
                      **d)] == 1
    assert got[server("twistproxy_server_redispatch_warnings_total", dead, **d)] == 1
    assert got[server("twistproxy_server_status", dead, state="DOWN", **d)] == 1
    assert got[server("twistproxy_server_flag", dead, flag="E", **d)] == 1
    assert got[server("twistproxy_server_downtime_seconds_total", dead, **d)] >= 0
    assert got[server("twistproxy_server_sessions_total", live, **d)] == 1
    assert got[server("twistproxy_server_connection_errors_total", live, kind="refused",
                      **d)] == 0
    mixed = "vhost[0].route[1]"
    assert got[m("twistproxy_backend_redispatch_warnings_total", route=mixed)] == 1
    # the request was answered: no error for the route itself
    assert got[m("twistproxy_backend_connection_errors_total", route=mixed,
                 kind="refused")] == 0
    assert got[m("twistproxy_backend_active_servers", route=mixed)] == 1
    assert names["ProxyBalancer[1]Worker[0]Status"] == "Init Err "
    assert names["ProxyBalancer[1]Worker[0]Elected"] == "1"
    assert names["ProxyBalancer[1]Worker[1]Elected"] == "1"


@pytest_twisted.inlineCallbacks
def test_tls_handshakes_and_failed_handshakes_are_counted(tls_lab):
    lab = tls_lab
    for _ in range(2):
        c = Client(lab.proxy, lab.client_tls)
        status, _ = yield c.get("/solo/t")
        c.close()
        assert status == 200

    def plain_http_to_the_tls_port():
        with socket.create_connection(("127.0.0.1", lab.proxy), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
            while s.recv(4096):
                pass
    yield threads.deferToThread(plain_http_to_the_tls_port)

    def a_client_that_leaves_before_any_handshake():
        socket.create_connection(("127.0.0.1", lab.proxy), timeout=10).close()
    yield threads.deferToThread(a_client_that_leaves_before_any_handshake)
    while lab.ctx.connections:           # the closes reach the reactor
        yield deferLater(0.01)
    got = yield scrape(lab)
    assert got[m("twistproxy_frontend_tls_handshakes_total", listener=lab.key)] == 2
    assert got[m("twistproxy_frontend_tls_handshake_failures_total", listener=lab.key)] == 1
    assert got[m("twistproxy_frontend_sessions_total", listener=lab.key)] == 4


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


# -- the resources ------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_only_get_and_head_are_served(lab):
    for path in ("/metrics", "/server-status", "/server-status?auto"):
        status, headers, body = yield admin(lab.admin, path, "POST")
        assert status == 405, path
        assert set(headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        status, headers, body = yield admin(lab.admin, path, "HEAD")
        assert status == 200 and body == b"", path


@pytest_twisted.inlineCallbacks
def test_the_html_page_escapes_what_clients_and_config_say(lab):
    status, headers, body = yield admin(lab.admin, "/server-status",
                                        headers={"Host": "<b>x</b>"})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "Proxy LoadBalancer Status for balancer://farm" in page
    assert "<td>127.0.0.1</td><td>Init Ok </td><td>a</td>" in page


@pytest_twisted.inlineCallbacks
def test_openmetrics_is_served_when_the_scraper_asks_for_it(lab):
    status, headers, body = yield admin(
        lab.admin, "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics")
    names = {f.name for f in openmetrics_families(body.decode())}
    assert {"twistproxy_server_sessions", "twistproxy_backend_http_requests",
            "twistproxy_frontend_http_requests", "twistproxy_process_uptime_seconds"} <= names


@pytest_twisted.inlineCallbacks
def test_every_metric_is_named_for_its_scope(lab):
    status, headers, body = yield admin(lab.admin, "/metrics")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    ours = {n for n in names if n.startswith("twistproxy_")}
    assert {n.split("_")[1] for n in ours} == {"server", "backend", "frontend", "process"}
    assert names - ours <= {n for n in names if n.startswith(("process_", "python_"))}


# -- Apache's formats, as Apache 2.4.71 writes them ------------------------------------------------

# the keys of Apache 2.4.71's ?auto (event MPM, ExtendedStatus On, ProxyStatus On, one
# balancer of two members), in its order
APACHE_AUTO_KEYS = (
    'ServerVersion', 'ServerMPM', 'Server Built', 'CurrentTime', 'RestartTime',
    'ParentServerConfigGeneration', 'ParentServerMPMGeneration', 'ServerUptimeSeconds',
    'ServerUptime', 'Load1', 'Load5', 'Load15', 'Total Accesses', 'Total kBytes',
    'Total Duration', 'CPUUser', 'CPUSystem', 'CPUChildrenUser', 'CPUChildrenSystem',
    'Uptime', 'ReqPerSec', 'BytesPerSec', 'BytesPerReq', 'DurationPerReq', 'BusyWorkers',
    'GracefulWorkers', 'IdleWorkers', 'Processes', 'Stopping', 'ConnsTotal',
    'ConnsAsyncWaitIO', 'ConnsAsyncWriting', 'ConnsAsyncKeepAlive', 'ConnsAsyncClosing',
    'Scoreboard', 'ProxyBalancer[0]Name', 'ProxyBalancer[0]Worker[0]Name',
    'ProxyBalancer[0]Worker[0]Status', 'ProxyBalancer[0]Worker[0]Elected',
    'ProxyBalancer[0]Worker[0]Busy', 'ProxyBalancer[0]Worker[0]Sent',
    'ProxyBalancer[0]Worker[0]Rcvd', 'ProxyBalancer[0]Worker[1]Name',
    'ProxyBalancer[0]Worker[1]Status', 'ProxyBalancer[0]Worker[1]Elected',
    'ProxyBalancer[0]Worker[1]Busy', 'ProxyBalancer[0]Worker[1]Sent',
    'ProxyBalancer[0]Worker[1]Rcvd',
)
# what twistproxy does not have: a build date, request durations (they would cost the
# request path a clock read), the event MPM's wait-for-I/O state
NOT_KEPT = {"Server Built", "Total Duration", "DurationPerReq", "ConnsAsyncWaitIO"}


@pytest_twisted.inlineCallbacks
def test_auto_has_apaches_keys_in_apaches_order(lab):
    c = Client(lab.proxy)
    yield c.get("/farm/")                # BytesPerReq is shown once there was a request
    c.close()
    apache = [k for k in APACHE_AUTO_KEYS if k not in NOT_KEPT]
    text = Reading(lab.ctx, lab.started - 10).auto("h")   # up 10s: the rates are shown
    ours = [line.partition(":")[0] for line in text.splitlines()[1:]]
    ours = [k for k in ours if k != "CPULoad"]   # Apache shows it when CPU time was used
    assert [k for k in ours if k in apache] == apache
    extra = set(ours) - set(apache)
    assert all(k.startswith("ProxyBalancer[1]") for k in extra), extra

@pytest.mark.parametrize("status, text", [
    ("", "Init Ok "),
    ("+H", "Init Stby Ok "),
    ("+D", "Init Dis "),
    ("+S", "Init Stop "),
    ("+I", "Init Ign Ok "),
    ("+R", "Init Spar Ok "),
    ("+N", "Init Drn Ok "),
    ("+E", "Init Err "),
    ("+H+D", "Init Dis Stby "),
    ("+I+N", "Init Ign Drn Ok "),
    ("+S+E", "Init Stop Err "),
    ("+C", "Init HcFl "),
    ("+I+D+S+E+H+R+N+C", "Init Ign Drn Dis Stop Err Stby Spar HcFl "),
])
def test_member_status_words_are_apaches(status, text):
    from twistproxy.balancer.group import _UNUSABLE

    class M:
        flags = parse_status(status)

        def usable(self):
            return self.flags.isdisjoint(_UNUSABLE)
    assert member_status(M()) == text


def test_uptime_and_sizes_read_as_apaches():
    assert uptime_words(1) == "1 second"
    assert uptime_words(0) == ""
    assert uptime_words(90061) == "1 day 1 hour 1 minute 1 second"
    assert uptime_words(7320) == "2 hours 2 minutes"
    assert [size_text(n) for n in (0, 615, 1229, 1536, 3072, 12 * 1024 * 1024)] == \
        ["  0 ", "615 ", "1.2K", "1.5K", "3.0K", " 12M"]
    # APR's %g: no leading zero (Apache 2.4.71 wrote "DurationPerReq: .666667")
    assert [number(x) for x in (2 / 3, 11, 651.636363, 0, 7168.0)] == \
        [".666667", "11", "651.636", "0", "7168"]

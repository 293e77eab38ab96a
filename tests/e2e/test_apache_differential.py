"""Apache and the config imported from it, side by side: the same requests, the same
answers.

For each fixture (tests/fixtures/apache/), real Apache httpd runs it and twistproxy
runs what `twistproxy import-apache` made of it, each on its own front ports, both in
front of the same recording backends. Every request goes to both; the test compares
the status, which backend answered, the request line and headers the backend saw
(allowing the README's deliberate differences, DELIBERATE below) and the response
headers each proxy rewrote or added.
"""

from __future__ import annotations

import pytest

from apache import Apache, Fixture, have_apache, reserve
from clients import PKI, fetch
import http.client
import re
import shutil
import socket

from harness import Lab, run_cli

pytestmark = pytest.mark.skipif(not have_apache(), reason="apache2 is not installed "
                                "(apt-get install apache2)")

# request headers the backend sees from twistproxy and not from Apache (README,
# Deliberate differences): X-Forwarded-Proto and -Port, which we always add
DELIBERATE = {"x-forwarded-proto", "x-forwarded-port"}
# per-connection framing: each proxy picks its own
FRAMING = {"connection", "keep-alive", "content-length"}


def seen(response) -> dict:
    """What the backend saw (the echo's JSON) in a comparable form."""
    echo = response.echo
    headers = [(n.lower(), v) for n, v in echo["headers"]
               if n.lower() not in DELIBERATE | FRAMING]
    return {"server": echo["server"], "line": (echo["method"], echo["target"]),
            "headers": sorted(headers)}


def comparable_response_headers(response, front_port: int) -> list:
    out = []
    for name, value in response.headers:
        low = name.lower()
        if low in ("date", "server", "content-length", "connection", "keep-alive",
                   "content-type", "transfer-encoding"):
            continue
        value = value.replace(str(front_port), "FRONT")
        if low == "set-cookie":     # attribute names are case-insensitive (RFC 6265)
            value = re.sub(r";\s*([A-Za-z-]+)", lambda m: "; " + m.group(1).lower(), value)
        out.append((low, value))
    return sorted(out)


class SideBySide:
    """A fixture run by Apache and by twistproxy from its import."""

    def __init__(self, lab: Lab, tmp, name: str, backends: dict[int, str],
                 fronts: list[int], addresses=("127.0.0.1",), root: str | None = None,
                 https: tuple = ()):
        self.lab = lab
        self.https = https          # fronts that are TLS (the fixture's certificate)
        fixture = Fixture(name, tmp / "src")
        self.echoes = {port: lab.echo(server) for port, server in backends.items()}
        back = {port: echo.port for port, echo in self.echoes.items()}
        self.apache_ports = reserve(fronts)
        self.tp_ports = reserve(fronts)
        a_conf = fixture.rewrite({**self.apache_ports, **back}, tmp / "apache")
        t_conf = fixture.rewrite({**self.tp_ports, **back}, tmp / "tp")
        self.pki = None
        if https:     # one CA; the certificate the fixture names, in both copies
            (tmp / "pki").mkdir()
            self.pki = PKI(tmp / "pki")
            self.pki.leaf("secure.example.com", "secure.example.com")
            for side in ("apache", "tp"):
                (tmp / side / "tls").mkdir(exist_ok=True)
                for ext in ("pem", "key"):
                    shutil.copy(tmp / "pki" / f"secure.example.com.{ext}",
                                tmp / side / "tls" / f"secure.example.com.{ext}")
        a_root = (tmp / "apache" / root) if root else a_conf.parent
        t_root = (tmp / "tp" / root) if root else t_conf.parent
        self.apache = Apache(a_conf, a_root, [(addr, p) for addr in addresses
                                              for p in self.apache_ports.values()])
        out = tmp / "imported.toml"
        result = run_cli("import-apache", str(t_conf), "-d", str(t_root), "-o", str(out))
        self.import_result = result
        assert result.returncode in (0, 1), result.stderr
        self.proxy = lab.proxy(out.read_text(), name="imported.toml")

    def both(self, front: int, path: str, headers=None, address: str = "127.0.0.1",
             host: str = "example.com"):
        get = self._https if front in self.https else fetch
        a = get(self.apache_ports[front], path, headers, host=host, address=address)
        t = get(self.tp_ports[front], path, headers, host=host, address=address)
        return a, t

    def _https(self, port, path, headers, host, address):
        from clients import Response
        ctx = self.pki.client_context()
        c = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
        # to `address`, with `host` as the SNI name and the name checked
        c.sock = ctx.wrap_socket(socket.create_connection((address, port), timeout=10),
                                 server_hostname=host)
        try:
            c.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            c.putheader("Host", host)
            for name, value in (headers or {}).items():
                c.putheader(name, value)
            c.endheaders()
            r = c.getresponse()
            return Response(r.status, r.getheaders(), r.read(), r.reason)
        finally:
            c.close()

    def same(self, front: int, path: str, headers=None, address: str = "127.0.0.1",
             host: str = "example.com", member_slash: bool = False):
        """Send the request to both; assert the same answer; return twistproxy's.
        `member_slash`: the balancer's members end in "/", to which Apache adds the
        request's path whole ("//page"); twistproxy does not double the slash (README,
        Deliberate differences)."""
        a, t = self.both(front, path, headers, address, host)
        assert a.status == t.status, (path, host, a.status, t.status, a.body[:200],
                                      t.body[:200])
        if a.status == 200 and a.body.startswith(b"{"):
            apache_saw = seen(a)
            if member_slash:
                method, target = apache_saw["line"]
                assert target.startswith("//"), target
                apache_saw["line"] = (method, target[1:])
            assert apache_saw == seen(t), (path, host)
        assert comparable_response_headers(a, self.apache_ports[front]) == \
            comparable_response_headers(t, self.tp_ports[front]), (path, host)
        return t

    def close(self):
        self.apache.stop()


@pytest.fixture
def lab(tmp_path):
    with Lab(tmp_path) as lab:
        yield lab


def test_iis_on_port_80_behind_both(lab, tmp_path):
    """Name vhosts on one IP (ProxyPass with an exclusion, ProxyPreserveHost), a site
    on its own IP whose mod_rewrite [P] rules route by Host, path and User-Agent."""
    s = SideBySide(lab, tmp_path, "iis-port80.conf", {8080: "iis", 8081: "legacy-iis"},
                   [18080], addresses=("127.0.0.1", "127.0.0.2"))
    try:
        assert s.import_result.returncode == 0, s.import_result.stderr
        t = s.same(18080, "/", host="example.com")
        assert t.echo["server"] == "iis"
        s.same(18080, "/shop/cart?id=3", host="www.example.com")
        s.same(18080, "/shop/", host="EXAMPLE.com:80")          # preserved as sent
        # the exclusion: neither proxies it (Apache serves it from its DocumentRoot)
        a, t = s.both(18080, "/apache-apps/x", host="example.com")
        assert a.status == t.status == 404
        # per-IP: 127.0.0.2 has its own vhost whatever the Host
        t = s.same(18080, "/page", address="127.0.0.2", host="iis-domain.com")
        assert t.echo["server"] == "iis" and t.echo["target"] == "/page"
        t = s.same(18080, "/aspnet/default.aspx", address="127.0.0.2",
                   host="apache-site.example.com")
        assert t.echo["target"] == "/default.aspx"
        t = s.same(18080, "/old.asp", {"User-Agent": "Mozilla/4.0 (compatible; MSIE 6.0)"},
                   address="127.0.0.2", host="apache-site.example.com")
        assert t.echo["server"] == "legacy-iis"
        # Location from the backend is rewritten by both (ProxyPassReverse)
        t = s.same(18080, "/login", {"X-Echo-Status": "302",
                                     "X-Echo-Header": "Location: http://127.0.0.1:"
                                     f"{s.echoes[8080].port}/welcome"}, host="example.com")
        assert t.status == 302
    finally:
        s.close()


def test_sticky_iis_farm_behind_both(lab, tmp_path):
    """A balancer of three IIS nodes (the third a hot standby), sticky on BALANCEID,
    with no failover for sticky clients."""
    s = SideBySide(lab, tmp_path, "iis-farm-sticky.conf",
                   {8101: "node1", 8102: "node2", 8103: "node3"}, [18081])
    try:
        assert s.import_result.returncode == 0, s.import_result.stderr
        # load is shared the same way, the standby never chosen
        order = [s.same(18081, f"/page{i}", host="lb.example.com",
                        member_slash=True).echo["server"] for i in range(4)]
        assert set(order) == {"node1", "node2"}
        # a sticky client stays on its node with either proxy
        for route in ("node1", "node2", "node3"):
            t = s.same(18081, "/cart", {"Cookie": f"BALANCEID=mycluster.{route}"},
                       host="lb.example.com", member_slash=True)
            assert t.echo["server"] == route
        t = s.same(18081, "/cart?BALANCEID=mycluster.node2", host="lb.example.com",
                   member_slash=True)
        assert t.echo["server"] == "node2"
    finally:
        s.close()


def test_debian_layout_behind_both(lab, tmp_path):
    """Include/IncludeOptional, Define'd backends, <IfDefine>: the farm on /app/ and
    the default backend, a RequestHeader unset and a Header always set."""
    s = SideBySide(lab, tmp_path, "debian/apache2.conf",
                   {8080: "app", 8101: "farm-a", 8102: "farm-b"}, [18083], root="debian")
    try:
        # `Header edit Location` has no equivalent: exit 1, and it is reported
        assert s.import_result.returncode == 1
        assert "Header edit Location" in s.import_result.stderr
        t = s.same(18083, "/", {"X-Internal-Token": "secret"}, host="intranet.example.com")
        assert t.echo["server"] == "app"
        assert "x-internal-token" not in {n.lower() for n, _ in t.echo["headers"]}
        assert t.header("X-Content-Type-Options") == "nosniff"
        t = s.same(18083, "/app/list", {"Cookie": "JSESSIONID=abc.b"}, host="intranet")
        assert t.echo["server"] == "farm-b" and t.echo["target"] == "/app/list"
        t = s.same(18083, "/app/x;jsessionid=abc.a", host="x.intranet.example.com")
        assert t.echo["server"] == "farm-a"
    finally:
        s.close()


def test_the_usual_howto_behind_both(lab, tmp_path):
    """A balancer with a hot standby and its manager, microservices by path with
    ProxyPassReverseCookiePath, a ProxyPassMatch, health-checked members with Apache's
    ROUTEID recipe (Header add Set-Cookie ... env=BALANCER_ROUTE_CHANGED), and TLS
    termination with RequestHeader set."""
    backends = {3000: "users", 4000: "payments", 8080: "legacy", 8090: "ws-site",
                8100: "m0", 8101: "m1", 8102: "m2-standby", 8200: "c1", 8201: "c2",
                8202: "c3-standby", 8300: "secure-app"}
    s = SideBySide(lab, tmp_path, "howto.conf", backends, [18082, 18443], https=(18443,))
    try:
        # <Proxy *> Require ip ... has no twistproxy equivalent for reverse proxying:
        # reported, exit 1 (these clients are on loopback, which both let through)
        assert s.import_result.returncode == 1
        assert "howto.conf:34: Require ip 127.0.0.0/8 192.168.1.0/24: differs" in \
            s.import_result.stderr
        # the balancer and its hot standby; the security headers on every answer
        served = {s.same(18082, f"/p{i}", host="myapp.com").echo["server"]
                  for i in range(4)}
        assert served == {"m0", "m1"}
        t = s.same(18082, "/p", host="myapp.com")
        assert t.header("X-Frame-Options") == "DENY"
        # the manager and server-status, for loopback clients (Require local)
        a, t = s.both(18082, "/balancer-manager", host="myapp.com")
        assert a.status == t.status == 200
        a, t = s.both(18082, "/server-status", host="myapp.com")
        assert a.status == t.status == 200
        # microservices: prefixes, the cookie path rewritten, the regex route
        t = s.same(18082, "/api/users/42", {"X-Echo-Header": "Set-Cookie: sid=1; path=/"},
                   host="api.company.com")
        assert t.echo["server"] == "users" and t.echo["target"] == "/42"
        assert t.header("Set-Cookie") == "sid=1; path=/api/users/"
        t = s.same(18082, "/api/payments/pay?x=1", host="api.company.com")
        assert t.echo["target"] == "/pay?x=1"
        t = s.same(18082, "/legacy/orders.aspx", host="api.company.com")
        assert (t.echo["server"], t.echo["target"]) == ("legacy", "/app/orders.aspx")
        t = s.same(18082, "/elsewhere", host="api.company.com")
        assert t.echo["server"] == "legacy"
        # ROUTEID: both set the cookie when they chose by load, and follow it after
        t = s.same(18082, "/", host="checked.example.com")
        cookie = t.header("Set-Cookie")
        assert cookie and cookie.startswith("ROUTEID=.") and cookie.lower().endswith("; path=/")
        route = cookie.split(";")[0].split(".", 1)[1]
        t = s.same(18082, "/again", {"Cookie": f"ROUTEID=.{route}"},
                   host="checked.example.com")
        assert t.echo["server"] == f"c{route}" and t.header("Set-Cookie") is None
        # TLS termination, the certificate by SNI, RequestHeader set
        t = s.same(18443, "/account", host="secure.example.com")
        assert t.echo["server"] == "secure-app"
        assert ("X-Forwarded-Proto", "https") in [tuple(h) for h in t.echo["headers"]]
    finally:
        s.close()


def test_run_apache_tries_an_apache_file_in_one_command(lab, tmp_path):
    """`twistproxy run --apache httpd.conf`: imported in memory and served; what is not
    carried over is said first, on stderr."""
    import subprocess
    import sys

    from harness import ROOT, free_port, wait_port
    echo = lab.echo("tomcat")
    port = free_port()
    conf = tmp_path / "httpd.conf"
    conf.write_text(f"""ServerName try.example
Listen 127.0.0.1:{port}
DocumentRoot /var/www/html
ProxyPreserveHost On
ProxyPass /app/ {echo.url}/app/
ProxyPassReverse /app/ {echo.url}/app/
""")
    err = tmp_path / "run.err"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "twistproxy.cli", "run", "--apache",
                                 str(conf)], stderr=f, cwd=ROOT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        t = fetch(port, "/app/orders", host="try.example")
        assert (t.echo["server"], t.echo["target"]) == ("tomcat", "/app/orders")
        assert fetch(port, "/index.html", host="try.example").status == 404
    finally:
        proc.terminate()
        proc.wait(15)
    text = err.read_text()
    assert f"{conf}:3: DocumentRoot /var/www/html: no equivalent (twistproxy serves no " \
           "files)" in text.splitlines()[0]
    assert "Traceback" not in text


def test_import_apache_output_passes_check(tmp_path):
    out = tmp_path / "farm.toml"
    src = Fixture("iis-farm-sticky.conf", tmp_path / "src")
    result = run_cli("import-apache", str(src.path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith("imported 1 listener(s), 1 vhost(s), "
                                                     "1 route(s), 1 balancer(s);")
    check = run_cli("check", str(out))
    assert check.returncode == 0, check.stderr
    # the file says where each part came from
    assert f"# BalancerMember http://127.0.0.1:8103/ route=node3 status=+H loadfactor=2  " \
           f"({src.path}:22)" in out.read_text()


def test_every_fixture_is_what_apache_itself_accepts():
    """The fixtures are real configurations: `apache2 -t` on each (the script makes a
    throwaway certificate for the TLS one)."""
    import subprocess
    from apache import FIXTURES
    result = subprocess.run(["bash", str(FIXTURES / "check-with-apache.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "iis-port80.conf", "ok", "iis-farm-sticky.conf",
                                     "ok", "howto.conf", "ok", "debian/apache2.conf"]

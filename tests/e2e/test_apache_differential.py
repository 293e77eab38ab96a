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
from harness import Lab, Proxy, run_cli

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
        out.append((low, value.replace(str(front_port), "FRONT")))
    return sorted(out)


class SideBySide:
    """A fixture run by Apache and by twistproxy from its import."""

    def __init__(self, lab: Lab, tmp, name: str, backends: dict[int, str],
                 fronts: list[int], addresses=("127.0.0.1",), root: str | None = None,
                 tls: bool = False):
        self.lab = lab
        fixture = Fixture(name, tmp / "src")
        self.echoes = {port: lab.echo(server) for port, server in backends.items()}
        back = {port: echo.port for port, echo in self.echoes.items()}
        self.apache_ports = reserve(fronts)
        self.tp_ports = reserve(fronts)
        a_conf = fixture.rewrite({**self.apache_ports, **back}, tmp / "apache")
        t_conf = fixture.rewrite({**self.tp_ports, **back}, tmp / "tp")
        if tls:
            for side in ("apache", "tp"):
                pki = PKI(tmp / side / "tls")
                pki.leaf("secure.example.com")
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
        a = fetch(self.apache_ports[front], path, headers, host=host, address=address)
        t = fetch(self.tp_ports[front], path, headers, host=host, address=address)
        return a, t

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

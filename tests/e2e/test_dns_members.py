"""Members found by DNS (`members_from`), end to end.

A test DNS server (dns.py: twisted.names on a loopback UDP port, serving records from
a file the test rewrites) names echo backends by SRV or A/AAAA; the proxy is asked
for it by `[server] resolver`. The tests change the records and poll (with a
deadline, never a fixed sleep) until the proxy's members follow: what the clients
get (the echo names the member that served it) and the manager's JSON. The SRV test
runs a master and a worker (the master resolves and broadcasts, the worker routes),
and the reload test a master and a worker with health checks; the others one process
(master_process = false).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from clients import fetch
from dns import AddressEcho, TestDNS
from harness import Lab, free_port, wait_until

SRV = "_http._tcp.app.test"


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def config(ports, dns: TestDNS, members_from: str, balancer: str = "",
           processes: str = "worker_processes = 1") -> str:
    return f"""
[server]
access_log = "-"
{processes}
resolver = ["{dns.address}"]

[[listen]]
address = "127.0.0.1"
port = {ports[0]}

[admin]
port = {ports['admin']}

[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"

[balancer.farm]
members_from = {members_from}
resolve_every = 0.3
{balancer}
"""


def srv_records(*echos, **extra) -> dict:
    return {"ttl": 1, "srv": {SRV: [[1, 1, e.port, f"{e.name}.node.test"] for e in echos]},
            "a": {f"{e.name}.node.test": ["127.0.0.1"] for e in echos}, **extra}


def spread(port: int, n: int = 12) -> Counter:
    """Who served n requests; every one must have been answered 200."""
    served = Counter()
    for _ in range(n):
        r = fetch(port, "/")
        assert r.status == 200, (r.status, r.body[:200])
        served[r.echo["server"]] += 1
    return served


def served(port: int, n: int = 6) -> set:
    """Who served n requests, before the first DNS answer too (503 then)."""
    return {r.echo["server"] for r in (fetch(port, "/") for _ in range(n)) if r.status == 200}


def balancer(proxy) -> dict:
    port = proxy.ports["admin"]
    r = fetch(port, "/balancer-manager?format=json", host=f"127.0.0.1:{port}")
    assert r.status == 200, r
    (b,) = r.json()["balancers"]
    return b


def members(proxy) -> dict:
    return {m["name"]: m for m in balancer(proxy)["members"]}


def test_srv_members_join_drain_leave_and_survive_a_dns_outage(lab, tmp_path):
    a, b, c = lab.echos("a", "b", "c")
    dns = lab.add(TestDNS(tmp_path, srv_records(a, b)))
    proxy = lab.proxy(lambda ports: config(ports, dns, f'{{ srv = "{SRV}" }}'))

    # both records' members serve (through the worker: the master found them)
    wait_until(lambda: served(proxy.port) == {"a", "b"}, 10, "a and b serving")
    assert set(members(proxy)) == {a.url, b.url}

    # a third record: it joins
    dns.set(srv_records(a, b, c))
    wait_until(lambda: "c" in spread(proxy.port, 6), 10, "c serving")
    proxy.wait_for_log(f"member {c.url} found in DNS")

    # one record gone: drained (no new requests), then removed from the manager
    dns.set(srv_records(a, c))
    wait_until(lambda: b.url not in members(proxy), 10, "b removed from the manager")
    proxy.wait_for_log(f"member {b.url} is gone from DNS: draining")
    proxy.wait_for_log(f"member {b.url} removed")
    assert set(spread(proxy.port, 12)) == {"a", "c"}

    # the DNS server goes away: the last good set keeps serving, logged once
    dns.stop()
    proxy.wait_for_log("DNS lookup of SRV", timeout=10)
    deadline = time.monotonic() + 1.5          # while lookups go on failing
    while time.monotonic() < deadline:
        assert set(spread(proxy.port, 4)) == {"a", "c"}
    found = balancer(proxy)["members_from"]
    assert found["failing"] and found["failures"] >= 1
    assert found["last_good"] == sorted([a.url, c.url])
    assert set(members(proxy)) == {a.url, c.url}


def test_srv_answer_that_fails_keeps_the_set_and_a_recovery_is_logged(lab, tmp_path):
    a, b = lab.echos("a", "b")
    dns = lab.add(TestDNS(tmp_path, srv_records(a, b)))
    proxy = lab.proxy(lambda ports: config(ports, dns, f'{{ srv = "{SRV}" }}',
                                           processes="master_process = false"))
    wait_until(lambda: served(proxy.port) == {"a", "b"}, 10, "a and b serving")
    for fail, why in (("servfail", "SERVFAIL"), ("nxdomain", "NXDOMAIN"), ("drop", "timeout")):
        since = len(proxy.log())
        dns.set(srv_records(a, b, fail=fail))
        wait_until(lambda: f"({why}): keeping the last good member set (2 member(s))"
                   in proxy.log()[since:], 10, f"the {why} logged")
        failures = balancer(proxy)["members_from"]["failures"]
        if why != "timeout":       # several failed lookups, one line
            wait_until(lambda: balancer(proxy)["members_from"]["failures"] >= failures + 2,
                       10, "more failed lookups")
            assert proxy.log()[since:].count("keeping the last good member set") == 1
        assert set(spread(proxy.port, 6)) == {"a", "b"}
        dns.set(srv_records(a))            # answers again, without b
        wait_until(lambda: b.url not in members(proxy), 10, "b removed")
        assert "DNS answers again for _http._tcp.app.test (1 member(s))" in proxy.log()[since:]
        assert set(spread(proxy.port, 6)) == {"a"}
        dns.set(srv_records(a, b))
        wait_until(lambda: set(spread(proxy.port, 6)) == {"a", "b"}, 10, "b back")


def test_a_reload_keeps_the_found_members_and_goes_on_resolving(lab, tmp_path):
    import signal
    a, b, c = lab.echos("a", "b", "c")
    dns = lab.add(TestDNS(tmp_path, srv_records(a, b)))
    # with health checks: the master checks, its worker routes once C is cleared
    proxy = lab.proxy(lambda ports: config(ports, dns, f'{{ srv = "{SRV}" }}',
                                           'hcmethod = "GET"\nhcinterval = 0.2'))
    wait_until(lambda: served(proxy.port) == {"a", "b"}, 10, "a and b serving")
    dns.stop()                       # the new generation cannot ask DNS: it keeps a, b
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_line("reload: generation 2 serves", timeout=20)
    assert set(members(proxy)) == {a.url, b.url}
    assert set(spread(proxy.port, 8)) == {"a", "b"}
    assert "could not all be kept" not in proxy.log()
    lab.add(TestDNS(tmp_path, srv_records(a, c), port=dns.port))      # DNS is back
    wait_until(lambda: set(members(proxy)) == {a.url, c.url}, 10, "c in, b out")
    assert set(spread(proxy.port, 8)) == {"a", "c"}


def test_host_form_takes_every_a_and_aaaa_address(lab, tmp_path):
    port = free_port("127.0.0.2")
    for name, address in (("v4", "127.0.0.2"), ("v6", "::1"), ("more", "127.0.0.3")):
        lab.add(AddressEcho(name, address, port))
    dns = lab.add(TestDNS(tmp_path, {"ttl": 1, "a": {"app.test": ["127.0.0.2"]},
                                     "aaaa": {"app.test": ["::1"]}}))
    proxy = lab.proxy(lambda ports: config(ports, dns,
                                           f'{{ host = "app.test", port = {port} }}',
                                           processes="master_process = false"))
    wait_until(lambda: served(proxy.port) == {"v4", "v6"}, 10, "v4 and v6 serving")
    assert set(members(proxy)) == {f"http://127.0.0.2:{port}", f"http://[::1]:{port}"}
    dns.set({"ttl": 1, "a": {"app.test": ["127.0.0.2", "127.0.0.3"]}})    # AAAA gone
    wait_until(lambda: set(spread(proxy.port, 6)) == {"v4", "more"}, 10, "v6 out, more in")
    wait_until(lambda: f"http://[::1]:{port}" not in members(proxy), 10, "v6 removed")


def test_health_checked_join_only_after_a_passing_check(lab, tmp_path):
    a, b = lab.echos("a", "b")
    dead = free_port()              # nothing listens there: its check never passes
    records = srv_records(a)
    records["srv"][SRV].append([1, 1, dead, "dead.node.test"])
    records["a"]["dead.node.test"] = ["127.0.0.1"]
    dns = lab.add(TestDNS(tmp_path, records))
    proxy = lab.proxy(lambda ports: config(
        ports, dns, f'{{ srv = "{SRV}" }}', 'hcmethod = "GET"\nhcinterval = 0.2',
        processes="master_process = false"))
    dead_url = f"http://127.0.0.1:{dead}"
    wait_until(lambda: set(members(proxy)) == {a.url, dead_url}, 10, "both found")
    wait_until(lambda: members(proxy)[a.url]["usable"], 10, "a passed its check")
    assert "C" in members(proxy)[dead_url]["flags"]
    assert set(spread(proxy.port, 12)) == {"a"}         # and no request failed
    assert members(proxy)[dead_url]["elected"] == 0

    records["srv"][SRV].append([1, 1, b.port, "b.node.test"])
    records["a"]["b.node.test"] = ["127.0.0.1"]
    dns.set(records)
    wait_until(lambda: b.url in members(proxy), 10, "b found")
    wait_until(lambda: "b" in spread(proxy.port, 6), 10, "b serving after its check")
    proxy.wait_for_log(f"member {b.url} found in DNS (_http._tcp.app.test): joins after "
                       "a passing health check")
    assert members(proxy)[dead_url]["elected"] == 0


def test_no_answer_yet_is_503_and_every_admin_page_still_renders(lab, tmp_path):
    dns = lab.add(TestDNS(tmp_path, {"fail": "nxdomain"}))
    proxy = lab.proxy(lambda ports: config(ports, dns, f'{{ srv = "{SRV}" }}',
                                           processes="master_process = false"))
    proxy.wait_for_log("failed (NXDOMAIN): keeping the last good member set (0 member(s))")
    assert fetch(proxy.port, "/").status == 503
    admin = proxy.ports["admin"]
    for page in ("/balancer-manager", "/balancer-manager?xml=1", "/server-status",
                 "/metrics"):
        r = fetch(admin, page, host=f"127.0.0.1:{admin}")
        assert r.status == 200, (page, r.body[:300])
    found = balancer(proxy)
    assert found["members"] == [] and found["members_from"]["failing"]
    a = lab.echo("a")
    dns.set(srv_records(a))
    wait_until(lambda: served(proxy.port) == {"a"}, 10, "a serving")
    for page in ("/balancer-manager", "/metrics"):   # server-status: host, not port
        r = fetch(admin, page, host=f"127.0.0.1:{admin}")
        assert r.status == 200 and str(a.port).encode() in r.body, page

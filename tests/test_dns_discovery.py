"""Members found by DNS without sockets: the configuration's one-line errors, the
difference between what DNS names and what the balancer has (balancer/discovery.py
`plan`), the Runtime's discover_member / remove_member edits, and a Discovery on a
fake clock and resolver (failures keep the last good set, logged once; the TTL)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from twistproxy.admin import persist
from twistproxy.balancer import Balancer
from twistproxy.balancer.discovery import Discovery, Wanted, plan, srv_wanted
from twistproxy.config import ConfigError, loads
from twistproxy.process import control
from twistproxy.runtime import Edit, Invalid, Runtime


def doc(balancer: str, server: str = "") -> str:
    return f"""
[server]
{server}
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "x"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"
[balancer.farm]
{balancer}
"""


def fails(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, "site.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("site.toml: "), message
    return message


# -- configuration ---------------------------------------------------------------------

def test_members_from_alone_is_a_balancer():
    cfg = loads(doc('members_from = { srv = "_http._tcp.App.Service.Consul." }\n'
                    'resolve_every = "500ms"\nhcmethod = "GET"',
                    server='resolver = ["127.0.0.1:5353", "::1", "[::1]:53"]'))
    found = cfg.balancers["farm"].members_from
    assert cfg.balancers["farm"].members == ()
    assert (found.srv, found.kind, found.resolve_every) == \
        ("_http._tcp.app.service.consul", "SRV", 0.5)
    assert found.member.hcmethod == "GET"             # the balancer's hc* template
    assert cfg.server.resolver == (("127.0.0.1", 5353), ("::1", 53), ("::1", 53))


def test_host_form_and_member_parameters():
    cfg = loads(doc('members_from = { host = "app.internal", port = 8443, scheme = "https", '
                    'member = { timeout = 5, loadfactor = 2, hcmethod = "TCP" } }\n'
                    '  [[balancer.farm.member]]\n  url = "http://10.0.0.9:80"'))
    found = cfg.balancers["farm"].members_from
    assert (found.host, found.port, found.scheme, found.resolve_every) == \
        ("app.internal", 8443, "https", 30.0)
    assert found.member.worker.timeout == 5 and found.member.loadfactor == 2
    assert found.member.hcmethod == "TCP"
    assert len(cfg.balancers["farm"].members) == 1     # beside a fixed member


@pytest.mark.parametrize("balancer, server, expected", [
    ('members_from = { srv = "_a._tcp.x", host = "x", port = 1 }', "",
     "site.toml: balancer.farm.members_from: {...} needs one of srv (an SRV name) or "
     "host (A/AAAA) with port"),
    ("members_from = { }", "", "balancer.farm.members_from: {...} needs one of srv"),
    ('members_from = { host = "app.internal" }', "",
     "site.toml: balancer.farm.members_from.port: missing (required with host)"),
    ('members_from = { host = "app.internal", port = 0 }', "",
     "balancer.farm.members_from.port: 0 must be a whole number from 1 to 65535"),
    ('members_from = { srv = "_a._tcp.x", port = 80 }', "",
     "balancer.farm.members_from.port: 80 is for host (SRV records name their ports)"),
    ('members_from = { srv = "not a name" }', "",
     "balancer.farm.members_from.srv: 'not a name' is not a DNS name"),
    ('members_from = { srv = 5 }', "", "balancer.farm.members_from.srv: 5 must be a string"),
    ('members_from = { srv = "_a._tcp.x", scheme = "ftp" }', "",
     "balancer.farm.members_from.scheme: 'ftp' must be one of: http, https, ws, wss"),
    ('members_from = { srv = "_a._tcp.x", sr = 1 }', "",
     "balancer.farm.members_from.sr: unknown key (did you mean 'srv'?)"),
    ('members_from = { srv = "_a._tcp.x", member = { url = "http://x" } }', "",
     "balancer.farm.members_from.member.url: unknown key"),
    ('members_from = { srv = "_a._tcp.x", member = { route = "r1" } }', "",
     "balancer.farm.members_from.member.route: 'r1' would be every found member's route"),
    ('members_from = { srv = "_a._tcp.x", member = { timeout = -1 } }', "",
     "balancer.farm.members_from.member.timeout: -1 must be at least 0.001 seconds"),
    ('members_from = { srv = "_a._tcp.x" }\nresolve_every = 0.01', "",
     "balancer.farm.resolve_every: 0.01 must be at least 0.1 seconds"),
    ('members_from = "_a._tcp.x"', "",
     "balancer.farm.members_from: '_a._tcp.x' must be a table"),
    ("resolve_every = 5\n  [[balancer.farm.member]]\n  url = \"http://a\"", "",
     "balancer.farm.resolve_every: 5 needs members_from"),
    ("", "", "site.toml: balancer.farm.member: missing (required)"),
    ('members_from = { srv = "_a._tcp.x" }', 'resolver = ["dns.example:53"]',
     "server.resolver[0]: 'dns.example:53' must be an IP address, optionally with :PORT"),
    ('members_from = { srv = "_a._tcp.x" }', 'resolver = ["127.0.0.1:99999"]',
     "server.resolver[0]: '127.0.0.1:99999' has a port outside 1-65535"),
    ('members_from = { srv = "_a._tcp.x" }', "resolver = 53",
     "server.resolver: 53 must be a string or a list of strings"),
])
def test_config_errors(balancer, server, expected):
    assert expected in fails(doc(balancer, server))


# -- the difference --------------------------------------------------------------------

def discovered_runtime(hc: bool = False, fixed: str = "") -> Runtime:
    cfg = loads(doc('members_from = { srv = "_a._tcp.x" }\nresolve_every = 1\n'
                    + ('hcmethod = "GET"\n' if hc else "") + 'growth = 1\n' + fixed))
    return Runtime(Balancer(b) for b in cfg.balancers.values())


def wanted(*urls: str) -> dict:
    return {u: Wanted(u) for u in urls}


def run(rt: Runtime, want: dict, drained: dict, now: float, grace: float = 1.0,
        previous=None):
    adds, rest = plan("farm", rt.balancer("farm").members, want, drained, now, grace,
                      previous)
    for batch in (adds, rest):
        if batch:
            rt.apply(batch, "dns", now=now)
    return adds + rest


def names(rt: Runtime) -> dict:
    return {m.name: "".join(sorted(m.flags)) for m in rt.balancer("farm").members}


def test_plan_adds_drains_removes_and_undrains():
    rt, drained = discovered_runtime(), {}
    run(rt, wanted("http://10.0.0.1:80", "http://10.0.0.2:8080"), drained, 0)
    assert names(rt) == {"http://10.0.0.1": "", "http://10.0.0.2:8080": ""}
    assert run(rt, wanted("http://10.0.0.1:80", "http://10.0.0.2:8080"), drained, 1) == []
    run(rt, wanted("http://10.0.0.1:80"), drained, 2)               # gone: drained
    assert names(rt)["http://10.0.0.2:8080"] == "N"
    run(rt, wanted("http://10.0.0.1:80"), drained, 2.5)             # within grace: kept
    assert "http://10.0.0.2:8080" in names(rt)
    busy = rt.member("farm", "http://10.0.0.2:8080")
    busy.busy = 1
    run(rt, wanted("http://10.0.0.1:80"), drained, 3.5)             # in flight: kept
    assert "http://10.0.0.2:8080" in names(rt)
    busy.busy = 0
    run(rt, wanted("http://10.0.0.1:80"), drained, 4)               # removed
    assert names(rt) == {"http://10.0.0.1": ""} and drained == {}
    run(rt, wanted("http://10.0.0.1:80", "http://10.0.0.3:80"), drained, 5)
    run(rt, wanted("http://10.0.0.1:80"), drained, 6)
    run(rt, wanted("http://10.0.0.1:80", "http://10.0.0.3:80"), drained, 6.5)  # back
    assert names(rt) == {"http://10.0.0.1": "", "http://10.0.0.3": ""} and drained == {}


def test_plan_leaves_an_operators_drain_and_fixed_members_alone():
    rt = discovered_runtime(fixed='  [[balancer.farm.member]]\n  url = "http://10.9.9.9"')
    drained = {}
    run(rt, wanted("http://10.0.0.1:80"), drained, 0)
    rt.apply([Edit("farm", "status.N", True, member="http://10.0.0.1:80")], "manager")
    run(rt, wanted("http://10.0.0.1:80"), drained, 1)
    assert names(rt) == {"http://10.9.9.9": "", "http://10.0.0.1": "N"}   # still drained
    run(rt, wanted("http://10.0.0.1:80", "http://10.9.9.9:80"), drained, 1.5)
    assert len(names(rt)) == 2                          # a configured address: left to it
    run(rt, wanted(), drained, 2)                       # gone from DNS, then back
    run(rt, wanted("http://10.0.0.1:80"), drained, 2.5)
    assert names(rt)["http://10.0.0.1"] == "N"          # the operator's drain stays


def test_a_changed_record_changes_lbset_and_loadfactor_but_not_an_operators_edit():
    rt, drained = discovered_runtime(), {}
    first = {"http://10.0.0.1:80": Wanted("http://10.0.0.1:80", 0, 5.0)}
    run(rt, first, drained, 0)
    rt.apply([Edit("farm", "loadfactor", 9, member="http://10.0.0.1")], "manager")
    run(rt, first, drained, 1, previous=first)          # same record: the edit stays
    assert rt.member("farm", "http://10.0.0.1").lbfactor == 900
    second = {"http://10.0.0.1:80": Wanted("http://10.0.0.1:80", 1, 2.0)}
    run(rt, second, drained, 2, previous=first)         # the record changed: it wins
    m = rt.member("farm", "http://10.0.0.1")
    assert (m.lbfactor, m.lbset) == (200, 1)


def test_srv_priorities_are_lbsets_and_weights_loadfactors():
    w = srv_wanted("http", [(10, 5, 80, "a.x"), (20, 0, 81, "b.x"), (10, 500, 82, "c.x")],
                   {"a.x": ["10.0.0.1", "::1"], "b.x": ["10.0.0.2"]})
    assert w == {"http://10.0.0.1:80": Wanted("http://10.0.0.1:80", 0, 5.0),
                 "http://[::1]:80": Wanted("http://[::1]:80", 0, 5.0),
                 "http://10.0.0.2:81": Wanted("http://10.0.0.2:81", 1, 1.0)}
    rt = discovered_runtime()
    run(rt, w, {}, 0)
    m = rt.member("farm", "http://10.0.0.2:81")
    assert (m.lbset, m.lbfactor, rt.balancer("farm").max_lbset) == (1, 100, 1)


# -- the Runtime's edits ---------------------------------------------------------------

def test_discover_member_with_checks_starts_out_until_its_check_passes():
    rt = discovered_runtime(hc=True)
    seen = []
    rt.subscribe(seen.extend)
    rt.apply([Edit("farm", "discover_member", "http://10.0.0.1:8080")], "dns", "_a._tcp.x")
    m = rt.member("farm", "http://10.0.0.1:8080")
    assert m.discovered and m.flags == {"C"} and not m.usable()
    assert [(c.field, c.member, c.new, c.source) for c in seen] == \
        [("discover_member", "http://10.0.0.1:8080", "http://10.0.0.1:8080", "dns")]
    # found again (a worker synced twice, a reload): not a change
    assert rt.apply([Edit("farm", "discover_member", "http://10.0.0.1:8080")], "dns") == []
    # the broadcast rows make it again elsewhere, added first
    rows = control.edits_of(seen)
    assert rows == [["farm", None, "discover_member", "http://10.0.0.1:8080"]]
    assert control.batches(rows + [["farm", "x", "status.N", True]])[0] == rows


def test_discovered_members_take_no_growth_slot_and_are_not_persisted():
    rt = discovered_runtime()
    rt.apply([Edit("farm", "discover_member", "http://10.0.0.1:8080")], "dns")
    rt.apply([Edit("farm", "add_member", "http://10.0.0.7:80")], "manager")   # growth 1
    state = persist.state_of(rt)
    assert state["balancers"]["farm"]["added"] == ["http://10.0.0.7:80"]
    assert "http://10.0.0.1:8080" not in state["balancers"]["farm"]["members"]


def test_only_discovered_members_are_removed():
    rt = discovered_runtime(fixed='  [[balancer.farm.member]]\n  url = "http://10.9.9.9"')
    with pytest.raises(Invalid, match="was configured"):
        rt.apply([Edit("farm", "remove_member", True, member="http://10.9.9.9")], "dns")
    rt.apply([Edit("farm", "add_member", "http://10.0.0.7:80")], "manager")
    with pytest.raises(Invalid, match="was configured"):
        rt.apply([Edit("farm", "remove_member", True, member="http://10.0.0.7:80")], "dns")
    with pytest.raises(Invalid, match="already a member"):
        rt.apply([Edit("farm", "discover_member", "http://10.9.9.9")], "dns")
    rt.apply([Edit("farm", "discover_member", "http://10.0.0.1:80")], "dns")
    rt.apply([Edit("farm", "remove_member", True, member="http://10.0.0.1")], "dns")
    assert [m.name for m in rt.balancer("farm").members] == \
        ["http://10.9.9.9", "http://10.0.0.7"]


def test_a_balancer_without_members_from_takes_none_found():
    cfg = loads(doc('  [[balancer.farm.member]]\n  url = "http://a"'))
    rt = Runtime(Balancer(b) for b in cfg.balancers.values())
    with pytest.raises(Invalid, match="has no members_from"):
        rt.apply([Edit("farm", "discover_member", "http://10.0.0.1:80")], "dns")


# -- a Discovery on a fake clock ---------------------------------------------------------

class FakeResolver:
    def __init__(self):
        self.answer = None           # a list of (priority, weight, port, target, ttl)
        self.fail = None             # an exception to fail with
        self.queries = 0

    def lookupService(self, name, timeout=None):
        self.queries += 1
        if self.fail is not None:
            return defer.fail(self.fail)
        answers = [dns.RRHeader(name, dns.SRV, dns.IN, ttl,
                                dns.Record_SRV(p, w, port, target, ttl))
                   for p, w, port, target, ttl in self.answer]
        additional = [dns.RRHeader(target, dns.A, dns.IN, ttl, dns.Record_A("10.0.0.1", ttl))
                      for _, _, _, target, ttl in self.answer]
        return defer.succeed((answers, [], additional))


def test_discovery_keeps_the_last_good_set_logs_once_and_follows_the_ttl(caplog):
    from twisted.logger import globalLogPublisher
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        clock, resolver, rt = task.Clock(), FakeResolver(), discovered_runtime()
        found = Discovery(clock, rt, "farm", rt.balancer("farm").config.members_from,
                          resolver)
        found.config = type(found.config)(srv="_a._tcp.x", resolve_every=30,
                                          member=found.config.member)
        resolver.answer = [(1, 1, 8001, "a.x", 0), (1, 1, 8002, "a.x", 5)]
        found.start()
        assert set(names(rt)) == {"http://10.0.0.1:8001", "http://10.0.0.1:8002"}
        assert [c.getTime() for c in clock.getDelayedCalls()] == [1.0]   # TTL 0: 1 s
        resolver.fail = error.DNSServerError("SERVFAIL")
        for _ in range(3):
            clock.advance(30)
        assert resolver.queries == 4 and found.failures == 3 and found.failing
        assert set(names(rt)) == {"http://10.0.0.1:8001", "http://10.0.0.1:8002"}
        warned = [e for e in lines if "keeping the last good" in e.get("log_format", "")]
        assert len(warned) == 1 and warned[0]["why"] == "SERVFAIL"
        resolver.fail = None
        resolver.answer = [(1, 1, 8001, "a.x", 5)]
        clock.advance(30)
        assert not found.failing and names(rt)["http://10.0.0.1:8002"] == "N"
        assert [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()] == [5.0]
        found.stop()
        assert clock.getDelayedCalls() == []
    finally:
        globalLogPublisher.removeObserver(lines.append)


# -- the proxy's side: workers, checks and reverse maps of found members -------------------

def test_found_members_get_a_worker_a_check_when_owned_and_a_reverse_map_entry():
    from twistproxy.proxy import ProxyContext
    cfg = loads(doc('members_from = { srv = "_a._tcp.x" }\nhcmethod = "TCP"')
                .replace('url = "balancer://farm/"', 'url = "balancer://farm/"\n  reverse = true'))
    class Reactor(task.Clock):
        def connectTCP(self, *args, **kw):
            return type("Connector", (), {"disconnect": lambda self: None})()

    clock = Reactor()
    ctx = ProxyContext(cfg, clock)
    (rt,) = ctx.routes.values()
    assert rt.reverse_map is None                    # no member yet
    ctx.runtime.apply([Edit("farm", "discover_member", "http://10.0.0.1:8080")], "dns")
    m = ctx.runtime.member("farm", "http://10.0.0.1:8080")
    assert m.pool is not None and (m.pool.host, m.pool.port) == ("10.0.0.1", 8080)
    assert [h.member for h in ctx.health_checks] == [m]
    assert ctx.health_checks[0]._loop is None        # a worker: the master checks
    assert rt.reverse_map.location(b"http://10.0.0.1:8080/x", b"http://p") == b"http://p/x"
    ctx.discoveries = []                             # no DNS here
    ctx.start_owned()                                # the owner: found members checked
    ctx.runtime.apply([Edit("farm", "discover_member", "http://10.0.0.2:8080")], "dns")
    assert all(h._loop is not None and h._loop.running for h in ctx.health_checks)
    ctx.stop_owned()
    ctx.runtime.apply([Edit("farm", "remove_member", True, member="http://10.0.0.2:8080")],
                      "dns")
    ctx.runtime.apply([Edit("farm", "remove_member", True, member="http://10.0.0.1:8080")],
                      "dns")
    assert ctx.health_checks == [] and rt.reverse_map is None


class TargetResolver(FakeResolver):
    """SRV answers without additional records: each target is looked up."""

    def __init__(self):
        super().__init__()
        self.targets = {}            # name -> addresses, or an exception

    def lookupService(self, name, timeout=None):
        d = super().lookupService(name, timeout)
        return d.addCallback(lambda r: (r[0], [], []))

    def _target(self, name, kind):
        found = self.targets.get(name, error.DNSNameError(name))
        if isinstance(found, Exception):
            return defer.fail(found)
        rr = [dns.RRHeader(name, dns.A, dns.IN, 7, dns.Record_A(a, 7))
              for a in found if ":" not in a] if kind == dns.A else \
            [dns.RRHeader(name, dns.AAAA, dns.IN, 7, dns.Record_AAAA(a, 7))
             for a in found if ":" in a]
        return defer.succeed((rr, [], []))

    def lookupAddress(self, name, timeout=None):
        return self._target(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._target(name, dns.AAAA)


def lookup_of(resolver):
    rt = discovered_runtime()
    found = Discovery(task.Clock(), rt, "farm", rt.balancer("farm").config.members_from,
                      resolver)
    results = []
    found.lookup().addBoth(results.append)
    return results[0]


def test_srv_targets_without_additional_records_are_looked_up():
    r = TargetResolver()
    r.answer = [(1, 1, 80, "a.x", 30), (1, 1, 81, "gone.x", 30), (1, 1, 82, "", 30)]   # "": the root, "."
    r.targets = {"a.x": ["10.0.0.1", "::1"]}
    wanted, ttl = lookup_of(r)
    assert sorted(wanted) == ["http://10.0.0.1:80", "http://[::1]:80"] and ttl == 7
    r.targets["gone.x"] = error.DNSQueryTimeoutError("gone.x")     # passing failure
    failure = lookup_of(r)
    assert failure.check(error.DNSQueryTimeoutError)                # the set stays

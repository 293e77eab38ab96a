"""Member choice in a balancer group: lbmethods, stickiness, standby, lbsets, errors."""

from __future__ import annotations

from collections import Counter

from twistproxy.balancer import Balancer
from twistproxy.balancer.sticky import route_from_cookie, route_from_url, split_route
from twistproxy.config import loads
from twistproxy.runtime import Runtime


def in_error(member, now: float) -> None:
    """A failed connect, as the request path reports it: through the runtime."""
    Runtime([member.owner]).mark_error(member, now, "test")


def balancer(members: str, params: str = "") -> Balancer:
    cfg = loads(f"""
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "x"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"
[balancer.farm]
{params}
{members}
""")
    return Balancer(cfg.balancers["farm"])


def member(port: int, extra: str = "") -> str:
    return f'[[balancer.farm.member]]\nurl = "http://127.0.0.1:{port}"\n{extra}\n'


def pick(b: Balancer, n: int, url="/", cookie=None, now=0.0) -> Counter:
    seen = Counter()
    for _ in range(n):
        c = b.choose(url, cookie, now)
        seen[c.member.config.url.port if c.member else None] += 1
        if c.member:
            b.done(c.member, 0, 0)
    return seen


def test_byrequests_follows_loadfactors_exactly():
    b = balancer(member(1, "loadfactor = 3") + member(2, "loadfactor = 1"))
    assert pick(b, 400) == {1: 300, 2: 100}


def test_byrequests_equal_members_alternate_and_skip_disabled():
    b = balancer(member(1) + member(2, 'status = "+D"') + member(3))
    order = [b.choose("/", None, 0).member.config.url.port for _ in range(6)]
    assert order == [1, 3, 1, 3, 1, 3]


def test_bybusyness_prefers_the_idle_member():
    b = balancer(member(1, "loadfactor = 3") + member(2, "loadfactor = 1"),
                 'lbmethod = "bybusyness"')
    first = b.choose("/", None, 0).member          # all idle: the heavier member
    assert first.config.url.port == 1
    # while it is busy, every request goes to the idle one (byrequests would send 5 of
    # these 8 to the heavier member, busy or not)
    assert pick(b, 8) == {2: 8}
    b.done(first, 0, 0)
    assert pick(b, 1) == {1: 1}                     # idle again, and the weights rule


def test_sticky_cookie_and_url_route():
    params = 'stickysession = "BALANCEID"'
    b = balancer(member(1, 'route = "node1"') + member(2, 'route = "node2"'), params)
    assert pick(b, 10, cookie="a=b; BALANCEID=mycluster.node2") == {2: 10}
    assert pick(b, 10, url="/x?BALANCEID=mycluster.node1&z=1") == {1: 10}
    c = b.choose("/", "BALANCEID=mycluster.node1", 0)
    assert c.member.route == "node1" and not c.route_changed
    c = b.choose("/", None, 0)          # no route: chosen by load, route changes
    assert c.route_changed


def test_sticky_to_unusable_member_fails_over_or_503_with_nofailover():
    members = member(1, 'route = "n1"\nstatus = "+D"') + member(2, 'route = "n2"')
    b = balancer(members, 'stickysession = "ROUTEID"')
    c = b.choose("/", "ROUTEID=.n1", 0)
    assert c.member.route == "n2" and c.route_changed
    b = balancer(members, 'stickysession = "ROUTEID"\nnofailover = true')
    assert b.choose("/", "ROUTEID=.n1", 0).member is None


def test_hot_standby_only_when_the_others_are_down():
    b = balancer(member(1) + member(2) + member(3, 'status = "+H"'))
    assert 3 not in pick(b, 20)
    for m in b.members[:2]:
        in_error(m, 0.0)
    assert pick(b, 5, now=1.0) == {3: 5}


def test_lower_lbset_first():
    b = balancer(member(1, "lbset = 1") + member(2, "lbset = 0"))
    assert pick(b, 10) == {2: 10}
    b.members[1].flags.add("S")
    assert pick(b, 10) == {1: 10}


def test_error_state_retry_and_forced_recovery():
    b = balancer(member(1, "retry = 10") + member(2, "retry = 10"))
    in_error(b.members[0], 100.0)
    assert pick(b, 4, now=105.0) == {2: 4}
    assert 1 in pick(b, 4, now=111.0)           # retry elapsed: tried again
    in_error(b.members[0], 200.0)
    in_error(b.members[1], 200.0)
    assert pick(b, 2, now=201.0)[None] == 0     # forcerecovery clears all at once
    b2 = balancer(member(1) + member(2), "forcerecovery = false")
    for m in b2.members:
        in_error(m, 0.0)
    assert pick(b2, 1, now=1.0) == {None: 1}


def test_drain_gets_only_its_sticky_requests():
    b = balancer(member(1, 'route = "a"\nstatus = "+N"') + member(2, 'route = "b"'),
                 'stickysession = "S"')
    assert pick(b, 6) == {2: 6}
    assert pick(b, 3, cookie="S=x.a") == {1: 3}


def test_route_parsing():
    assert route_from_url("/a;jsessionid=abc.n1?x=1", "jsessionid", True) == "abc.n1"
    assert route_from_url("/a?x=1&jsessionid=abc.n1;z", "jsessionid", False) == "abc.n1;z"
    assert route_from_url("/a?xjsessionid=abc.n1", "jsessionid", False) is None
    assert route_from_cookie("a=1; ROUTEID=.n2, b=2", "ROUTEID") == ".n2"
    assert route_from_cookie("XROUTEID=.n2", "ROUTEID") is None
    assert split_route("mycluster.node1", ".") == "node1"
    assert split_route("nosep", ".") is None
    assert split_route("whole", "") == "whole"


def test_hot_spare_replaces_one_unusable_member_each():
    b = balancer(member(1) + member(2) + member(3, 'status = "+R"') +
                 member(4, 'status = "+R"'))
    assert set(pick(b, 20)) == {1, 2}            # spares idle while all are up
    in_error(b.members[0], 0.0)
    assert set(pick(b, 20, now=1.0)) == {2, 3}   # one spare steps in for one member
    in_error(b.members[1], 0.0)
    assert set(pick(b, 20, now=1.0)) == {3, 4}

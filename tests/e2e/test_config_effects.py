"""Configuration keys whose effect no other test shows, each against a setting where
the key's absence (or its default) would answer differently: balancer `timeout`,
`stickysessionsep`, member `redirect`, member flags E and C, a non-default `busy_poll`
and `keepalive_timeout`, and listeners on "::" and "*".

Real processes on loopback: the proxy and echo backends (whose JSON names the member
in "server"). mod_proxy's meaning of each key is in the reference, sections 2 and 3.
"""

from __future__ import annotations

import socket
import time
from collections import Counter

import pytest

from clients import HTTPClient, Session, fetch
from harness import Lab, basic_config
from test_balancer import FAILING_OVER, balancer, config, dead_url, route, servers


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def who(port: int, n: int, path: str = "/", headers=None) -> Counter:
    """n requests on one connection: which member served each."""
    with Session(port) as c:
        return servers(c, n, path, headers)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# balancers


def test_balancer_timeout_waits_for_a_usable_member(lab):
    """With `timeout`, a request that finds no usable member polls until one is (here:
    until the member's retry has passed); without it, the answer is 503 at once."""
    n1 = lab.echo("n1")
    member = [(n1.url, {"retry": 2})]
    p = lab.proxy(lambda ports: config(
        ports[0], balancer("waits", member, timeout=6, forcerecovery=False) +
        balancer("now", member, forcerecovery=False),
        route("/waits/", "waits") + route("/now/", "now")))
    n1.stop()
    assert fetch(p.port, "/waits/x").status == 503       # refused: the member is in error
    assert fetch(p.port, "/now/x").status == 503
    n1 = lab.echo("n1", n1.port)                           # back, but within retry
    t0 = time.monotonic()
    assert fetch(p.port, "/now/x").status == 503           # no timeout: not waited for
    assert time.monotonic() - t0 < 1
    r = fetch(p.port, "/waits/x")
    waited = time.monotonic() - t0
    assert r.status == 200 and r.server == "n1", r
    assert 0.5 < waited < 6, waited                        # it polled until retry passed
    assert "balancer://now: no usable member -> 503" in p.log()


def test_stickysessionsep_splits_the_route_at_its_own_character(lab):
    n1, n2 = lab.echos("n1", "n2")
    members = [(n1.url, {"route": "node1"}), (n2.url, {"route": "node2"})]
    p = lab.proxy(lambda ports: config(ports[0], balancer(
        "farm", members, stickysession="JSESSIONID", stickysessionsep="_")))
    assert who(p.port, 6, "/", {"Cookie": "JSESSIONID=abc_node2"}) == {"n2": 6}
    assert who(p.port, 6, "/?JSESSIONID=abc_node1") == {"n1": 6}
    # the default separator "." is not one here: no route, balanced as usual
    assert who(p.port, 4, "/", {"Cookie": "JSESSIONID=abc.node2"}) == {"n1": 2, "n2": 2}


def test_member_redirect_takes_the_sticky_requests_of_an_unusable_member(lab):
    n1, n2, n3 = lab.echos("n1", "n2", "n3")
    members = [(n1.url, {"route": "node1", "status": "+D", "redirect": "node3"}),
               (n2.url, {"route": "node2"}), (n3.url, {"route": "node3"})]
    p = lab.proxy(lambda ports: config(ports[0], balancer("farm", members,
                                                           stickysession="ROUTEID")))
    # without redirect they would be balanced over n2 and n3 (3 and 3)
    assert who(p.port, 6, "/", {"Cookie": "ROUTEID=x.node1"}) == {"n3": 6}
    assert who(p.port, 4).keys() <= {"n2", "n3"}            # the rest: balanced, never n1


def test_member_flag_c_gets_no_requests(lab):
    n1, n2 = lab.echos("n1", "n2")
    p = lab.proxy(lambda ports: config(ports[0], balancer(
        "farm", [(n1.url, {"status": "+C"}), n2.url])))
    assert who(p.port, 6) == {"n2": 6}                      # byrequests would give 3 / 3


def test_member_flag_e_is_unusable_until_retry_passes(lab):
    """In error (E): unusable until `retry` has passed. A member configured +E has no
    error time, so it is tried at the first request; failing, it is left alone for its
    retry (30 s), not tried again at every other request as byrequests would."""
    (n2,) = lab.echos("n2")
    dead = dead_url()
    p = lab.proxy(lambda ports: config(ports[0], balancer(
        "farm", [(dead, {"status": "+E", "retry": 30}), n2.url])))
    assert who(p.port, 6) == {"n2": 6}
    assert p.log().count(f"member {dead}: connection refused: {FAILING_OVER}") == 1, p.log()


# ---------------------------------------------------------------------------
# the server


def test_busy_poll_is_the_reactors(lab):
    echo = lab.echo("bp")
    routes = f'[[vhost.route]]\npath = "/"\nurl = "{echo.url}/"\n'
    p = lab.proxy(lambda ports: basic_config(routes, ports[0], server="busy_poll = 250"))
    assert fetch(p.port, "/").status == 200
    p.wait_for_log(" on ProxyReactor (busy_poll 250us)")
    off = lab.proxy(lambda ports: basic_config(routes, ports[0], server="busy_poll = 0"),
                    name="off.toml")
    off.wait_for_log(" on ProxyReactor (busy_poll off)")


def test_keepalive_timeout_longer_than_the_default(lab):
    """keepalive_timeout = 9: a connection idle for 6 s (longer than the default 5 s)
    is still open and serves the next request."""
    echo = lab.echo("ka")
    routes = f'[[vhost.route]]\npath = "/"\nurl = "{echo.url}/"\n'
    p = lab.proxy(lambda ports: basic_config(routes, ports[0],
                                             server="keepalive_timeout = 9"))
    with HTTPClient(p.port) as c:
        assert c.get("/one").status == 200
        closed, _ = c.wait_close(6.0)
        assert not closed, "closed before keepalive_timeout = 9"
        r = c.get("/two")
        assert r.status == 200 and r.json()["target"] == "/two", r


# ---------------------------------------------------------------------------
# listeners


def listener_config(address: str, port: int, echo_url: str) -> str:
    return f"""
[[listen]]
address = "{address}"
port = {port}
[[vhost]]
server_name = "any.test"
  [[vhost.route]]
  path = "/"
  url = "{echo_url}/"
"""


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback here")
def test_listen_on_ipv6_any(lab):
    echo = lab.echo("v6any")
    p = lab.proxy(lambda ports: listener_config("::", ports[0], echo.url))
    r = fetch(p.port, "/", address="::1")
    assert r.status == 200 and r.server == "v6any", r
    p.wait_for_log(f"listening on [::]:{p.port}")


def test_listen_on_star_serves_both_families(lab):
    echo = lab.echo("star")
    p = lab.proxy(lambda ports: listener_config("*", ports[0], echo.url))
    for address in ("127.0.0.1", "127.0.0.7") + (("::1",) if has_ipv6() else ()):
        r = fetch(p.port, "/", address=address)
        assert r.status == 200 and r.server == "star", (address, r)
    p.wait_for_log(f"listening on *:{p.port}")

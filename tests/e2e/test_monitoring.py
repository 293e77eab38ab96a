"""Watching the proxy from the admin listener: /server-status and /metrics of a real
proxy process, checked against the requests this test actually sent; then the
README's rolling deploy, seen in the metrics: drain a member, it stops getting
requests, bring it back."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import fetch
from harness import Lab
from test_admin import Manager, config, spread


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def metrics(port: int) -> dict:
    """{(name, frozenset(labels)): value} from the Prometheus text, read back by the
    library's own parser."""
    r = fetch(port, "/metrics", host=f"127.0.0.1:{port}")
    assert r.status == 200 and r.header("content-type").startswith("text/plain"), r
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def member_value(m: dict, name: str, member_url: str, **labels) -> float:
    want = {("balancer", "farm"), ("member", member_url), *labels.items()}
    found = [v for (n, ls), v in m.items() if n == name and want <= ls]
    assert len(found) == 1, (name, member_url, labels, found)
    return found[0]


def auto(port: int) -> dict:
    r = fetch(port, "/server-status?auto", host=f"127.0.0.1:{port}")
    assert r.status == 200, r
    return dict(line.split(": ", 1) for line in r.body.decode().splitlines()
                if ": " in line)


@pytest.fixture
def farm(lab):
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)]))
    return proxy, Manager(proxy.ports["admin"])


def test_metrics_and_server_status_count_the_requests_sent(farm):
    proxy, mgr = farm
    admin = mgr.port
    served = spread(proxy.port, 10)
    for _ in range(3):
        assert fetch(proxy.port, "/", {"Cookie": "ROUTEID=x.a"}).echo["server"] == "a"
    a, b = mgr.member_url("a"), mgr.member_url("b")
    m = metrics(admin)
    assert member_value(m, "twistproxy_server_sessions_total", a) == served["a"] + 3
    assert member_value(m, "twistproxy_server_sessions_total", b) == served["b"]
    assert member_value(m, "twistproxy_server_http_responses_total", a, code="2xx") == \
        served["a"] + 3
    assert member_value(m, "twistproxy_server_status", a, state="UP") == 1
    s = auto(admin)
    assert int(s["Total Accesses"]) == 13, s
    assert s["ProxyBalancer[0]Name"] == "balancer://farm"
    elected = {s[f"ProxyBalancer[0]Worker[{i}]Name"]: int(s[f"ProxyBalancer[0]Worker[{i}]Elected"])
               for i in range(2)}
    assert elected == {a: served["a"] + 3, b: served["b"]}


def test_a_drained_member_stands_still_in_the_metrics_and_comes_back(farm):
    proxy, mgr = farm
    admin = mgr.port
    a = mgr.member_url("a")
    spread(proxy.port, 4)
    before = member_value(metrics(admin), "twistproxy_server_sessions_total", a)
    mgr.change("a", w_status_N="1")
    m = metrics(admin)
    assert member_value(m, "twistproxy_server_status", a, state="DRAIN") == 1
    assert spread(proxy.port, 8) == Counter(b=8)
    m = metrics(admin)
    assert member_value(m, "twistproxy_server_sessions_total", a) == before, \
        "a drained member took new requests"
    assert member_value(m, "twistproxy_server_current_sessions", a) == 0
    mgr.change("a", w_status_N="0")
    assert member_value(metrics(admin), "twistproxy_server_status", a, state="UP") == 1
    assert set(spread(proxy.port, 6)) == {"a", "b"}
    assert member_value(metrics(admin), "twistproxy_server_sessions_total", a) > before

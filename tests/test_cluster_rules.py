"""[cluster] without Redis: the configuration's one-line errors, the reconciliation
rule (sync.plan) and how a cluster document becomes edits (sync.edits_to)."""

from __future__ import annotations

import pytest

from twistproxy.admin import persist
from twistproxy.balancer.group import Balancer
from twistproxy.cluster.sync import Pending, digest, edits_to, plan
from twistproxy.config import ConfigError, loads
from twistproxy.runtime.state import Edit, Runtime

BASE = """
[[listen]]
address = "127.0.0.1"
port = 8080

[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"

[balancer.farm]
growth = 1
  [[balancer.farm.member]]
  url = "http://127.0.0.1:9001"
  route = "a"
  [[balancer.farm.member]]
  url = "http://127.0.0.1:9002"
  route = "b"
"""


def cluster(text: str, path: str = "<config>"):
    return loads(BASE + "[cluster]\n" + text, path).cluster


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        cluster(text)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_off_when_absent():
    assert loads(BASE).cluster is None


def test_a_full_table():
    c = cluster('redis = "redis://app:s%40cret@10.0.0.9:6380/3"\nname = "edge"\n'
                'node = "web-1"')
    assert (c.host, c.port, c.db, c.username, c.password, c.name, c.node) == \
        ("10.0.0.9", 6380, 3, "app", "s@cret", "edge", "web-1")
    assert "s@cret" not in repr(c) and "cret" not in c.shown_url


def test_summary_names_the_cluster():
    config = loads(BASE + '[cluster]\nredis = "redis://:pw@10.0.0.9"\nname = "edge"\n'
                          'node = "a"')
    assert config.summary().endswith("; cluster edge as node a (redis://10.0.0.9:6379/0)")
    assert "cluster" not in loads(BASE).summary()


def test_rediss():
    c = cluster('redis = "rediss://:pw@redis.example:6390/1"\nname = "e"\nverify = false')
    assert (c.tls, c.verify, c.port, c.shown_url) == (True, False, 6390,
                                                     "rediss://redis.example:6390/1")


def test_defaults():
    import socket
    c = cluster('redis = "redis://127.0.0.1"\nname = "edge"')
    assert (c.port, c.db, c.password, c.share_health) == (6379, 0, None, False)
    assert cluster('redis = "redis://h"\nname = "e"\nshare_health = true').share_health
    assert c.node == socket.gethostname()


def test_password_file(tmp_path):
    (tmp_path / "pw").write_text("hunter2\n")
    path = str(tmp_path / "proxy.toml")
    c = cluster('redis = "redis://127.0.0.1"\nname = "e"\npassword_file = "pw"', path)
    assert c.password == "hunter2"
    with pytest.raises(ConfigError, match=r"cluster.password_file: 'nope' cannot be read"):
        cluster('redis = "redis://127.0.0.1"\nname = "e"\npassword_file = "nope"', path)
    with pytest.raises(ConfigError, match="has a password too"):
        cluster('redis = "redis://:x@127.0.0.1"\nname = "e"\npassword_file = "pw"', path)


@pytest.mark.parametrize("text, expected", [
    ('name = "e"', "<config>: cluster.redis: missing (required)"),
    ('redis = "redis://h"', "<config>: cluster.name: missing (required)"),
    ('redis = "http://h"\nname = "e"', "cluster.redis: 'http://h' must be a redis:// or rediss://"),
    ('redis = "redis://"\nname = "e"', "cluster.redis: 'redis://' names no host"),
    ('redis = "redis://h:99999"\nname = "e"', "cluster.redis: 'redis://h:99999' is not a "
                                               "Redis URL"),
    ('redis = "redis://h/x"\nname = "e"', "has database 'x': it must be a number"),
    ('redis = "redis://h?db=1"\nname = "e"', "has a query or fragment"),
    ('redis = "redis://h"\nname = "e"\nverify = false', "cluster.verify: false is for a "
                                                      "rediss:// (TLS) URL"),
    ('redis = "rediss://h"\nname = "e"\nca_file = "/nonexistent.pem"',
     "cluster.ca_file: '/nonexistent.pem' cannot be read"),
    ('redis = "redis://h"\nname = "a b"', "cluster.name: 'a b' must be 1 to 64 letters"),
    ('redis = "redis://h"\nname = "e"\nnode = ""', "cluster.node: '' must be 1 to 64"),
    ('redis = "redis://h"\nname = "e"\nshare_health = 1',
     "cluster.share_health: 1 must be true or false"),
    ('redis = "redis://h"\nname = "e"\nnodes = 3', "cluster.nodes: unknown key"),
    ('redis = 6379\nname = "e"', "cluster.redis: 6379 must be a string"),
])
def test_errors(text, expected):
    assert expected in error(text)


def test_errors_never_show_the_password():
    msg = error('redis = "redis://u:topsecret@h:99999"\nname = "e"')
    assert "topsecret" not in msg and "***" in msg


# -- the reconciliation rule ------------------------------------------------------------

def p(offline: bool) -> Pending:
    return Pending([["farm", "a", "status.D", True]], "manager", "-", offline)


def test_plan_nothing_to_do():
    assert plan(4, 4, []) == (False, [], [], None, 4)


def test_plan_a_newer_document_is_applied():
    assert plan(5, 4, []) == (True, [], [], None, 5)


def test_plan_local_changes_on_the_current_version_are_written_next():
    online, offline = p(False), p(True)
    assert plan(4, 4, [online, offline]) == (False, [online, offline], [], 5, 4)


def test_plan_offline_changes_lose_to_a_newer_cluster_version():
    online, offline = p(False), p(True)
    apply, kept, dropped, write, expect = plan(6, 4, [online, offline])
    assert apply and kept == [online] and dropped == [offline] and (write, expect) == (7, 6)
    assert plan(6, 4, [offline]) == (True, [], [offline], None, 6)


def test_plan_redis_came_back_empty():
    # this node writes its state back: as its version, or the next with changes
    assert plan(0, 4, []) == (False, [], [], 4, 0)
    assert plan(0, 4, [p(True)])[3:] == (5, 0)
    # another node behind it wrote first: the highest version still wins
    assert plan(3, 4, [])[3:] == (4, 3)


def test_plan_two_nodes_offline_one_wins():
    """A and B both changed something while Redis was away; A reaches it first."""
    a_pending, b_pending = [p(True)], [p(True)]
    _, _, _, write, _ = plan(0, 4, a_pending)            # A: Redis empty, writes 5
    assert write == 5
    apply, kept, dropped, write, _ = plan(5, 4, b_pending)   # B: 5 > 4
    assert apply and dropped == b_pending and write is None


# -- documents as edits ------------------------------------------------------------------

def runtime():
    config = loads(BASE)
    return config, Runtime(Balancer(b) for b in config.balancers.values())


def test_edits_to_the_cluster_state_and_back():
    config, mine = runtime()
    _, theirs = runtime()
    theirs.apply([Edit("farm", "status.N", True, member="http://127.0.0.1:9002"),
                  Edit("farm", "loadfactor", 5, member="http://127.0.0.1:9001"),
                  Edit("farm", "lbmethod", "bybusyness"),
                  Edit("farm", "add_member", "http://127.0.0.1:9003")], "manager")
    state = persist.state_of(theirs)
    edits, problems = edits_to(state, mine)
    assert problems == []
    for batch in ([e for e in edits if e.field == "add_member"],
                  [e for e in edits if e.field != "add_member"]):
        mine.apply(batch, "cluster")
    assert persist.state_of(mine) == state
    assert edits_to(state, mine) == ([], [])
    # the drain lifted elsewhere: the configuration's value comes back here
    theirs.apply([Edit("farm", "status.N", False, member="http://127.0.0.1:9002")],
                 "manager")
    edits, _ = edits_to(persist.state_of(theirs), mine)
    assert edits == [Edit("farm", "status.N", False, member="http://127.0.0.1:9002")]


def test_edits_to_a_document_of_another_configuration():
    _, mine = runtime()
    edits, problems = edits_to({"version": 1, "balancers": {"other": {}}}, mine)
    assert edits == [] and problems == ["balancer://other is not in this node's "
                                        "configuration"]


def test_digest_ignores_listeners():
    one = loads(BASE)
    two = loads(BASE.replace("127.0.0.1\"\nport = 8080", "127.0.0.2\"\nport = 8081"))
    three = loads(BASE.replace('route = "b"', 'route = "c"'))
    assert digest(one) == digest(two) != digest(three)


# -- the connection's log: bounded --------------------------------------------------------

def test_reconnect_attempts_are_logged_at_a_bounded_rate():
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from twistproxy.cluster import store
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        clock = Clock()
        link = store.Link(cluster('redis = "redis://127.0.0.1:1"\nname = "e"'), clock,
                          "e:changes", lambda cmd: None, lambda: None, lambda c, m: None)
        link._connect = lambda: None           # attempts are driven by hand here
        for _ in range(200):                   # 200 failed attempts, one a second
            link._failed_attempt(ConnectionRefusedError(111, "Connection refused"))
            clock.advance(1.0)
        assert link._delay == store.RETRY_MAX
    finally:
        globalLogPublisher.removeObserver(observer)
    mine = [e for e in events if e.get("log_namespace") == "twistproxy.cluster"]
    warned = [e for e in mine if e["log_level"].name == "warn"]
    assert len(mine) == 200
    assert 1 + 200 // store.LOG_EVERY - 1 <= len(warned) <= 1 + 200 // store.LOG_EVERY
    assert warned[0]["what"] == "cannot connect"
    assert all("still unreachable" in e["log_format"] for e in warned[1:])

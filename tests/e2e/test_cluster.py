"""[cluster] end to end: three twistproxy "hosts" on 127.0.0.2, .3 and .4 (each a
master and its worker) with one configuration (their listen address and node name
apart), a real redis-server of the test's own on a free loopback port.

The transcript: a drain made on host A's manager reaches B's and C's workers (new
non-sticky requests avoid the member); Redis killed: every host goes on serving, no
request fails; a change made on A meanwhile converges once Redis is back (empty: it
keeps nothing), by the documented rule; host C killed and started again takes the
cluster's state up.
"""

from __future__ import annotations

import time
from collections import Counter
from urllib.parse import urlencode

import pytest

from clients import fetch
from harness import Lab, Proxy, free_port, one_line_failure, run_cli, wait_until
from redisserver import RedisServer

HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}


def config(address: str, node: str, port: int, admin: int, redis_url: str, members,
           extra: str = "", server: str = "worker_processes = 1",
           member_extra: str = "") -> str:
    out = [f"""
[server]
access_log = "-"
{server}

[[listen]]
address = "{address}"
port = {port}

[admin]
address = "{address}"
port = {admin}
allow = ["127.0.0.0/8"]

[cluster]
redis = "{redis_url}"
name = "edge"
node = "{node}"
{extra}

[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"

[balancer.farm]
stickysession = "ROUTEID"
"""]
    for name, url in members:
        out.append(f'  [[balancer.farm.member]]\n  url = "{url}"\n  route = "{name}"\n'
                   f'{member_extra}')
    return "".join(out)


class Host:
    """One host: its proxy and a client of its pages."""

    def __init__(self, lab: Lab, node: str, port: int, admin: int, redis_url: str,
                 members, name: str | None = None, server: str = "worker_processes = 1",
                 **kw):
        self.node, self.address, self.port, self.admin = node, HOSTS[node], port, admin
        self.text = config(self.address, node, port, admin, redis_url, members,
                           server=server, **kw)
        self.lab = lab
        self.proxy = lab.add(Proxy(self.text, lab.tmp, name=name or f"{node}.toml"))

    def restart(self) -> None:
        self.proxy = self.lab.add(Proxy(self.text, self.lab.tmp, name=f"{self.node}-2.toml"))

    def get(self, query: str = ""):
        return fetch(self.admin, "/balancer-manager" + query, host=f"{self.address}:"
                     f"{self.admin}", address=self.address)

    def state(self) -> dict:
        r = self.get("?format=json")
        assert r.status == 200, r
        return r.json()

    def member(self, route: str) -> dict:
        (b,) = self.state()["balancers"]
        return next(m for m in b["members"] if m["route"] == route)

    def change(self, route: str, **fields) -> None:
        (b,) = self.state()["balancers"]
        form = {"b": "farm", "nonce": b["nonce"], "w": self.member(route)["name"], **fields}
        r = fetch(self.admin, "/balancer-manager", {
            "Content-Type": "application/x-www-form-urlencoded",
            "Referer": f"http://{self.address}:{self.admin}/balancer-manager"},
            host=f"{self.address}:{self.admin}", address=self.address, method="POST",
            body=urlencode(form).encode())
        assert r.status == 200, r.body

    def auto(self) -> dict:
        r = fetch(self.admin, "/server-status?auto", host=f"{self.address}:{self.admin}",
                  address=self.address)
        assert r.status == 200, r
        return dict(line.split(": ", 1) for line in r.body.decode().splitlines()
                    if ": " in line)

    def spread(self, n: int = 12) -> Counter:
        return Counter(fetch(self.port, "/", address=self.address).echo["server"]
                       for _ in range(n))


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def test_three_hosts_share_the_manager_state(lab):
    redis = lab.add(RedisServer(free_port()))
    a, b = lab.echos("a", "b")
    members = [("a", a.url), ("b", b.url)]
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    hosts = {n: Host(lab, n, port, admin, redis.url, members) for n in HOSTS}
    A, B, C = hosts["a"], hosts["b"], hosts["c"]
    for h in hosts.values():
        wait_until(lambda: h.auto().get("ClusterNodes") == "3", 10, f"{h.node} sees 3 nodes")
    # one configuration: the digests agree (the listen addresses are not in them)
    assert {n["node"]: n["same_config"] for n in A.state()["cluster"]["nodes"]} == \
        {"a": True, "b": True, "c": True}
    assert b"Cluster" in A.get().body and b"DIFFERS" not in A.get().body
    status = fetch(admin, "/server-status", host=f"{B.address}:{admin}", address=B.address)
    assert status.status == 200 and b"<h2>Cluster</h2>" in status.body, status

    # -- a drain on A's manager reaches B's and C's workers
    A.change("b", w_status_N="1")
    started = time.monotonic()
    for h in (B, C):
        wait_until(lambda: "N" in h.member("b")["flags"], 5, f"{h.node} has b drained")
    took = time.monotonic() - started
    for h in (B, C):
        assert h.spread() == Counter({"a": 12}), h.node
        last = h.state()["cluster"]["last_change"]
        assert last["node"] == "a" and last["source"] == "manager", last
        (change,) = h.state()["cluster"]["changes"]
        assert change["node"] == "a" and "status.N False -> True" in change["what"], change
        assert b"Recent changes" in h.get().body
    assert B.auto()["ClusterLastChange"].split()[1:] == ["a", "manager"]
    print(f"drain on a seen by b and c within {took:.2f}s")

    # -- Redis gone: every host serves, no request fails (traffic on all three hosts
    # from before the kill until after the restart)
    traffic = Traffic(hosts.values())
    redis.kill()
    for h in hosts.values():
        wait_until(lambda: h.auto()["ClusterConnected"] == "0", 5, f"{h.node} offline")
    for h in hosts.values():
        assert h.spread(20) == Counter({"a": 20}), h.node
    # a change on A meanwhile: applied on A at once, shared when Redis is back
    A.change("a", w_lf="5")
    assert A.member("a")["loadfactor"] == 5
    assert B.member("a")["loadfactor"] == 1
    assert A.auto()["ClusterPending"] == "1"

    # -- Redis back, empty: A's base version is still the highest, so its change wins
    redis.start()
    for h in hosts.values():
        wait_until(lambda: h.member("a")["loadfactor"] == 5 and
                   "N" in h.member("b")["flags"], 10, f"{h.node} converged")
    traffic.stop()
    assert traffic.failed == [] and len(traffic.served) > 30, (traffic.failed,
                                                               len(traffic.served))
    versions = {h.auto()["ClusterVersion"] for h in hosts.values()}
    assert len(versions) == 1, versions
    assert A.auto()["ClusterPending"] == "0"
    assert "is replaced by the cluster" not in A.proxy.log()

    # -- C killed and started again: it takes the state up from Redis
    C.proxy.proc.kill()
    C.proxy.proc.wait()
    wait_until(lambda: _free(C.address, C.port) and _free(C.address, C.admin), 10,
               "c's ports free")
    C.restart()
    wait_until(lambda: C.member("a")["loadfactor"] == 5 and "N" in C.member("b")["flags"],
               10, "c restarted has the state")
    assert C.spread() == Counter({"a": 12})
    for h in (A, B):
        assert "Traceback" not in h.proxy.log()


class Traffic:
    """One client per host, a request after another, until stop()."""

    def __init__(self, hosts):
        import threading
        self.served, self.failed = [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(h,), daemon=True)
                         for h in hosts]
        for t in self._threads:
            t.start()

    def _run(self, h) -> None:
        while not self._stop.is_set():
            try:
                r = fetch(h.port, "/", address=h.address, timeout=5)
                (self.served if r.status == 200 else self.failed).append((h.node, r.status))
            except OSError as e:
                self.failed.append((h.node, e))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _free(host: str, port: int) -> bool:
    import socket
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_one_process_hosts_changes_made_on_both_while_redis_was_away(lab):
    """master_process = false (the one process talks to Redis), a password in the URL;
    A and B both change something while Redis is down: the first back writes its
    change, the other's is replaced by it (and logged), and both converge."""
    redis = lab.add(RedisServer(free_port(), password="s3cret"))
    a, b = lab.echos("a", "b")
    members = [("a", a.url), ("b", b.url)]
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    one = "master_process = false"
    A, B = (Host(lab, n, port, admin, redis.url, members, server=one) for n in "ab")
    for h in (A, B):
        wait_until(lambda: h.auto().get("ClusterNodes") == "2", 10, f"{h.node} sees 2")
    A.change("a", w_status_N="1")
    wait_until(lambda: "N" in B.member("a")["flags"], 5, "b has a drained")
    redis.kill()
    for h in (A, B):
        wait_until(lambda: h.auto()["ClusterConnected"] == "0", 5, f"{h.node} offline")
    A.change("a", w_lf="3")
    B.change("b", w_lf="7")
    redis.start()

    def same():
        sa, sb = A.state(), B.state()
        lf = [{m["route"]: m["loadfactor"] for m in s["balancers"][0]["members"]}
              for s in (sa, sb)]
        return lf[0] == lf[1] and sa["cluster"]["version"] == sb["cluster"]["version"] \
            and sa["cluster"]["pending"] == sb["cluster"]["pending"] == 0 and lf[0]
    lf = wait_until(same, 10, "a and b converged")
    assert lf in ({"a": 3, "b": 1}, {"a": 1, "b": 7}), lf
    loser = B if lf["a"] == 3 else A
    winner = A if loser is B else B
    loser.proxy.wait_for_log("is replaced by the cluster's version")
    assert "is replaced by the cluster's version" not in winner.proxy.log()
    assert "N" in A.member("a")["flags"] and "N" in B.member("a")["flags"]
    assert A.spread() == B.spread() == Counter({"b": 12})


def test_a_wrong_password_is_a_start_up_error(lab, tmp_path):
    redis = lab.add(RedisServer(free_port(), password="right"))
    path = tmp_path / "bad.toml"
    path.write_text(config("127.0.0.2", "a", free_port("127.0.0.2"), free_port("127.0.0.2"),
                           redis.url.replace("right", "pw-x7q"), [("a", "http://127.0.0.1:1")]))
    result = run_cli("run", str(path))
    assert result.returncode != 0
    line = one_line_failure(result, "cluster.redis: redis://127.0.0.1:", "authentication "
                            "failed")
    assert "pw-x7q" not in line


def test_unreachable_redis_at_start_is_not_an_error(lab):
    """A node starts (and serves) with Redis down, and joins once it is there."""
    redis_port = free_port()
    a = lab.echo("a")
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    A = Host(lab, "a", port, admin, f"redis://127.0.0.1:{redis_port}/0", [("a", a.url)])
    assert A.spread(3) == Counter({"a": 3})
    assert A.auto()["ClusterConnected"] == "0"
    A.proxy.wait_for_log("not reachable at start-up")
    lab.add(RedisServer(redis_port))
    wait_until(lambda: A.auto()["ClusterConnected"] == "1", 10, "a connected")
    wait_until(lambda: A.auto().get("ClusterNodes") == "1", 5, "a's heartbeat")


def test_share_health_one_checker_per_balancer(lab):
    """share_health: one node checks balancer://farm (the lease holder), the others
    take its results; the holder killed, another takes the lease over."""
    redis = lab.add(RedisServer(free_port()))
    a, b = lab.echos("a", "b")
    members = [("a", a.url), ("b", b.url)]
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    hosts = {n: Host(lab, n, port, admin, redis.url, members, extra="share_health = true",
                     member_extra='  hcmethod = "TCP"\n  hcinterval = 0.2\n')
             for n in HOSTS}

    def checkers():
        return {h.node: h.auto().get("ClusterHealthChecker") for h in hosts.values()}
    seen = wait_until(lambda: (lambda c: len(set(c.values())) == 1 and None not in
                               c.values() and c)(checkers()), 10, "one checker for all")
    holder = next(iter(seen.values())).split()[1]
    others = [h for n, h in hosts.items() if n != holder]
    # only the holder's checks run
    counts = {h.node: h.member("b")["hc_passed"] for h in others}
    time.sleep(0.6)
    assert {h.node: h.member("b")["hc_passed"] for h in others} == counts
    assert hosts[holder].member("b")["hc_passed"] > 0
    # b down: the holder sees it, every node takes it out
    b.kill()
    for h in hosts.values():
        wait_until(lambda: "C" in h.member("b")["flags"], 5, f"{h.node} has b down")
    for h in others:
        assert h.spread(6) == Counter({"a": 6})
    # the holder dies: its lease expires, another node checks (and sees b back)
    hosts[holder].proxy.proc.kill()
    hosts[holder].proxy.proc.wait()
    wait_until(lambda: all(h.auto().get("ClusterHealthChecker", "").split()[1:] !=
                           [holder] for h in others) and
               len({h.auto().get("ClusterHealthChecker") for h in others}) == 1, 12,
               "another checker")
    lab.add(type(b)("b", b.port))
    for h in others:
        wait_until(lambda: "C" not in h.member("b")["flags"], 5, f"{h.node} has b back")


def test_rediss_with_the_projects_client_tls(lab, tmp_path):
    """rediss:// with cluster.ca_file: connected and sharing; a CA that did not issue
    the server's certificate is a one-line start-up error."""
    import trustme
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "redis.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "redis.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "redis.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    redis = lab.add(RedisServer(free_port(), password="pw",
                                tls=(tmp_path / "redis.crt", tmp_path / "redis.key")))
    a = lab.echo("a")
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    # B's configuration differs (a loadfactor): flagged on the pages, still sharing
    A, B = (Host(lab, n, port, admin, redis.url, [("a", a.url)],
                 extra=f'ca_file = "{tmp_path / "ca.pem"}"',
                 member_extra="  loadfactor = 2\n" if n == "b" else "") for n in "ab")
    for h in (A, B):
        wait_until(lambda: h.auto().get("ClusterNodes") == "2", 10, f"{h.node} sees 2")
    assert A.auto()["ClusterNodesOtherConfig"] == "1"
    assert {n["node"]: n["same_config"] for n in A.state()["cluster"]["nodes"]} == \
        {"a": True, "b": False}
    assert b"(DIFFERS from this node's)" in A.get().body
    A.change("a", w_status_N="1")
    wait_until(lambda: "N" in B.member("a")["flags"], 5, "b has a drained")
    assert B.state()["cluster"]["redis"].startswith("rediss://127.0.0.1:")
    bad = tmp_path / "bad.toml"
    bad.write_text(config("127.0.0.4", "c", port, admin, redis.url, [("a", a.url)],
                          extra=f'ca_file = "{tmp_path / "other-ca.pem"}"'))
    result = run_cli("run", str(bad))
    assert result.returncode != 0
    one_line_failure(result, "cluster.redis: rediss://127.0.0.1:", "TLS certificate is "
                     "not trusted")


def test_a_frozen_redis_is_noticed_and_traffic_does_not_wait(lab):
    """Redis stopped (SIGSTOP: connections open, no answers), as behind a partition:
    replies time out, the node says it is offline, requests are answered meanwhile,
    and it is back once Redis answers again."""
    import signal
    redis = lab.add(RedisServer(free_port()))
    a = lab.echo("a")
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    A = Host(lab, "a", port, admin, redis.url, [("a", a.url)])
    wait_until(lambda: A.auto().get("ClusterNodes") == "1", 10, "a joined")
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        traffic = Traffic([A])
        wait_until(lambda: A.auto()["ClusterConnected"] == "0", 10, "a offline")
        traffic.stop()
        assert traffic.failed == [] and traffic.served
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: A.auto()["ClusterConnected"] == "1", 10, "a back")
    assert A.proxy.log().count("connection lost") == 1


def test_a_reloaded_host_goes_on_sharing(lab):
    """SIGHUP on B: its new generation's runtime is the one shared, both ways."""
    import signal
    redis = lab.add(RedisServer(free_port()))
    a, b = lab.echos("a", "b")
    members = [("a", a.url), ("b", b.url)]
    port, admin = free_port("127.0.0.2"), free_port("127.0.0.2")
    A, B = (Host(lab, n, port, admin, redis.url, members) for n in "ab")
    for h in (A, B):
        wait_until(lambda: h.auto().get("ClusterNodes") == "2", 10, f"{h.node} sees 2")
    A.change("a", w_status_N="1")
    wait_until(lambda: "N" in B.member("a")["flags"], 5, "b has a drained")
    B.proxy.proc.send_signal(signal.SIGHUP)
    B.proxy.wait_for_log("generation 2 serves", timeout=15)
    assert "N" in B.member("a")["flags"]          # kept by the reload
    A.change("b", w_lf="4")
    wait_until(lambda: B.member("b")["loadfactor"] == 4, 5, "b has A's change")
    B.change("a", w_status_N="0")
    wait_until(lambda: "N" not in A.member("a")["flags"], 5, "a has B's change")
    assert set(B.spread(20)) == {"a", "b"}

"""A master with several workers, read and steered while it runs, and reloaded under load.

Transcripts of what an operator does: disables a member in the manager and expects no
worker to use it from the answer on; reads status and metrics and expects every
worker's requests counted; sends SIGHUP (or `twistproxy reload`) ten times under
steady load and expects no request to fail; breaks the file and expects nothing to
change; adds and drops a listener; keeps a manager change across a reload.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from collections import Counter

from harness import Lab, Load, free_port, run_cli, wait_until, worker_pids

SERVED = re.compile(r"twistproxy worker (\d+) pid (\d+)")


def config(ports, a: str, b: str, workers: int = 2, listeners=(0,), extra: str = "",
           admin: bool = True) -> str:
    listen = "".join(f'\n[[listen]]\naddress = "127.0.0.1"\nport = {ports[n]}\n'
                     for n in listeners)
    admin_table = f'\n[admin]\nport = {ports["admin"]}\n' if admin else ""
    return f"""
[server]
access_log = "-"
worker_processes = {workers}
served_by_header = "X-Served-By"
graceful_timeout = 5
{listen}
{admin_table}
[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/route-status"
  handler = "server-status"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"
{extra}
[balancer.farm]
  [[balancer.farm.member]]
  url = "{a}"
  route = "a"
  [[balancer.farm.member]]
  url = "{b}"
  route = "b"
"""


def get(port: int, path: str = "/", headers=None) -> tuple[int, str, str, bytes]:
    """(status, backend name, X-Served-By, body) of one request on its own connection."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Host": "proxy.test", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body)["server"], r.headers.get("X-Served-By", ""), body
    except urllib.error.HTTPError as e:
        return e.code, "", e.headers.get("X-Served-By", ""), e.read()


def backends(port: int, n: int = 24) -> tuple[Counter, set]:
    """Which backend answered n requests, four at a time (so that every worker takes
    some), and which worker pids served them."""
    from concurrent.futures import ThreadPoolExecutor
    names, pids = Counter(), set()
    with ThreadPoolExecutor(4) as pool:
        for status, name, served, body in pool.map(lambda _: get(port), range(n)):
            assert status == 200, (status, body[:200])
            names[name] += 1
            pids.add(int(SERVED.search(served).group(2)))
    return names, pids


def every_worker_serves(port: int, n: int = 2) -> None:
    wait_until(lambda: len(backends(port, 16)[1]) == n, 10, f"{n} workers answering")


def manager_post(admin_port: int, **fields) -> int:
    page = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/balancer-manager?"
                                  "b=farm&format=json", timeout=10).read().decode()
    nonce = re.search(r'nonce=([0-9a-f-]{36})', page).group(1)
    data = "&".join(f"{k}={v}" for k, v in {"b": "farm", "nonce": nonce, **fields}.items())
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/balancer-manager",
                                 data=data.encode(), headers={
                                     "Referer": f"http://127.0.0.1:{admin_port}/balancer-manager",
                                     "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def status_auto(port: int, path: str = "/server-status?auto", host: str | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Host": host} if host else {})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def farm(lab, workers: int = 2):
    """A master with `workers` workers serving, in front of backends a and b."""
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, a.url, b.url, workers=workers))
    serving(proxy, workers)
    return proxy


def serving(proxy, n: int = 2) -> None:
    wait_until(lambda: len(proxy.log_lines(" serving")) >= n, 15, f"{n} workers serving")


def reloaded(proxy, generation: int) -> None:
    proxy.wait_for_line(f"reload: generation {generation} serves", timeout=20)


def test_a_manager_change_is_in_force_in_every_worker_when_the_post_is_answered(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab)
        every_worker_serves(proxy.port)
        assert set(backends(proxy.port)[0]) == {"a", "b"}
        assert manager_post(proxy.ports["admin"], w="b", w_status_D="1") == 200
        # from the answer on, no worker sends anything to b: never once
        names, pids = backends(proxy.port, 60)
        assert names == Counter(a=60), names
        assert manager_post(proxy.ports["admin"], w="b", w_status_D="0") == 200
        assert set(backends(proxy.port)[0]) == {"a", "b"}
        proxy.assert_clean()


def test_status_and_metrics_count_every_workers_requests(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab)
        every_worker_serves(proxy.port)
        before = int(status_auto(proxy.ports["admin"])["Total Accesses"])
        names, pids = backends(proxy.port, 30)
        assert len(pids) == 2, "both workers answered some"
        st = status_auto(proxy.ports["admin"])
        assert st["Processes"] == "2" and int(st["Total Accesses"]) == before + 30
        elected = sum(int(v) for k, v in st.items() if k.endswith("Elected"))
        assert elected == before + 30
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{proxy.ports['admin']}/metrics", timeout=10).read().decode()
        assert re.search(rf'^twistproxy_process_requests_total {before + 30}\.0$', metrics,
                         re.M), metrics
        # the same page on a vhost route: asked of a worker, answered by the master
        st = status_auto(proxy.port, "/route-status?auto", host="proxy.test")
        assert st["Processes"] == "2" and int(st["Total Accesses"]) >= 30


def test_ten_reloads_under_load_fail_no_request(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab)
        load = Load(proxy.port, threads=3)
        try:
            for generation in range(2, 12):
                proxy.proc.send_signal(signal.SIGHUP)
                reloaded(proxy, generation)
                time.sleep(0.2)
        finally:
            load.stop()
        assert not load.failed(), load.failed()[:5]
        served = load.served()
        assert len(served) > 100
        # the first and the last generation's workers both answered
        pids = {int(SERVED.search(s).group(2)) for s in served}
        started = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", proxy.log())]
        assert len(started) == 22                      # 11 generations of 2
        assert set(started[:2]) <= pids, "generation 1 served"
        assert set(worker_pids(proxy).values()) == set(started[-2:])
        assert set(started[-2:]) & pids, "generation 11 served"
        st = status_auto(proxy.ports["admin"])
        assert st["ParentServerConfigGeneration"] == "11"
        proxy.assert_clean()


def test_a_broken_file_at_reload_changes_nothing(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab)
        before = backends(proxy.port)[1]
        good = proxy.path.read_text()
        proxy.path.write_text(good.replace('route = "b"', 'route = "b"\n  loadfactor = 900'))
        result = run_cli("reload", "--pidfile", str(write_pid(tmp_path, proxy)))
        assert result.returncode == 0 and "sent SIGHUP" in result.stdout
        line = proxy.wait_for_line("reload: ", "nothing changed")
        assert "balancer.farm.member[1].loadfactor: 900" in line, line
        assert backends(proxy.port)[1] == before       # the same workers serve
        assert "generation 2" not in proxy.log()
        proxy.path.write_text(good)
        proxy.proc.send_signal(signal.SIGHUP)
        reloaded(proxy, 2)
        wait_until(lambda: backends(proxy.port, 8)[1].isdisjoint(before), 10,
                   "new workers only")


def write_pid(tmp_path, proxy):
    path = tmp_path / "master.pid"
    path.write_text(f"{proxy.proc.pid}\n")
    return path


def test_reload_adds_and_drops_listeners_and_keeps_the_unchanged_one_open(tmp_path):
    with Lab(tmp_path) as lab:
        a, b = lab.echos("a", "b")
        text = {}

        def first(ports):
            text["ports"] = ports
            return config(ports, a.url, b.url, listeners=(0, 1))
        proxy = lab.proxy(first)
        serving(proxy)
        ports = text["ports"]
        kept, dropped, added = ports[0], ports[1], free_port()
        assert get(dropped)[0] == 200
        load = Load(kept, threads=2)
        try:
            proxy.path.write_text(config({0: kept, 1: added, "admin": ports["admin"]},
                                         a.url, b.url, listeners=(0, 1)))
            proxy.proc.send_signal(signal.SIGHUP)
            reloaded(proxy, 2)
            proxy.wait_for_line("generation 1 has exited", timeout=15)
        finally:
            load.stop()
        assert not load.failed(), load.failed()[:5]   # the kept port was never closed
        assert get(added)[0] == 200
        try:
            get(dropped)
            raise AssertionError("the dropped listener still answers")
        except OSError:
            pass
        assert f"reload: no longer listening on 127.0.0.1:{dropped}" in proxy.log()


def test_a_manager_change_survives_a_reload(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab, workers=1)
        assert manager_post(proxy.ports["admin"], w="b", w_status_D="1") == 200
        proxy.proc.send_signal(signal.SIGHUP)
        reloaded(proxy, 2)
        assert "1 admin change(s) kept" in proxy.log()
        names, _ = backends(proxy.port, 12)
        assert names == Counter(a=12)


def test_a_request_in_flight_finishes_across_a_reload(tmp_path):
    with Lab(tmp_path) as lab:
        proxy = farm(lab)
        out = {}
        slow = threading.Thread(target=lambda: out.setdefault(
            "r", get(proxy.port, "/slow", {"X-Echo-Delay": "2"})))
        slow.start()
        time.sleep(0.5)
        proxy.proc.send_signal(signal.SIGHUP)
        reloaded(proxy, 2)
        slow.join(15)
        assert out["r"][0] == 200, out
        proxy.wait_for_line("generation 1 has exited", timeout=15)


def test_twistproxy_reload_with_no_master_is_one_line(tmp_path):
    missing = run_cli("reload", "--pidfile", str(tmp_path / "nope.pid"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "cannot be read" in missing.stderr and "Traceback" not in missing.stderr
    stale = tmp_path / "stale.pid"
    stale.write_text("999999999\n")
    gone = run_cli("reload", "--pidfile", str(stale))
    assert gone.returncode == 1 and "twistproxy is not running" in gone.stderr

"""Worker processes ([server] worker_processes > 1) end to end: a master that binds, N
workers that share its listening sockets, a worker killed and replaced, the access log
whole under load, a graceful stop with a request in flight, the same bind error, twistd.

Which worker answered is visible through [server] served_by_header.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from clients import PKI
from harness import (ROOT, Lab, free_port, one_line_failure, read_head, script, wait_port,
                     wait_until, worker_pids)

SERVED = re.compile(r"twistproxy worker (\d+) pid (\d+)")
# the access log's line (access.py / accesslog.py): Combined Log Format, then the
# microseconds and the backend
LINE = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
                  r'"GET /n/(\d+)/(\d+) HTTP/1\.1" 200 \d+ "-" "(x+)" \d+ http://127\.0\.0\.1:\d+$')


def config(ports, backend: str, workers=2, server: str = "", listen_extra: str = "") -> str:
    return f"""
[server]
access_log = "-"
worker_processes = {workers}
served_by_header = "X-Served-By"
{server}

[[listen]]
address = "127.0.0.1"
port = {ports[0]}
{listen_extra}

[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "{backend}/"
"""


def get(port: int, path: str = "/", headers=None, timeout=10.0, context=None):
    """(status, which worker, pid, body) of one request on a connection of its own."""
    if context is None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        c.request("GET", path, headers={"Host": "proxy.test", **(headers or {})})
        r = c.getresponse()
        body = r.read()
        m = SERVED.fullmatch(r.getheader("X-Served-By", ""))
        return r.status, int(m.group(1)), int(m.group(2)), body
    finally:
        c.close()


def served_by_header(port: int) -> tuple[int, str | None]:
    """(status, the X-Served-By header or None) of one request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/", headers={"Host": "proxy.test"})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("X-Served-By")
    finally:
        c.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def served_by_all(port: int, n: int, **kw) -> dict[int, int]:
    """Requests from 4 threads until every one of `n` workers has answered one."""
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def client():
        for _ in range(100):
            with lock:
                if len(seen) == n:
                    return
            status, worker, pid, _ = get(port, **kw)
            assert status == 200
            with lock:
                seen[worker] = pid
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def test_two_workers_both_serve(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        seen = served_by_all(proxy.port, 2)
        # both answered, and each is the process the master started
        assert sorted(seen) == [1, 2]
        assert seen == worker_pids(proxy)
        assert proxy.proc.pid not in seen.values()
        log = proxy.log()
        assert f"master pid {proxy.proc.pid}, 2 worker processes" in log
        assert "worker 1: listening on 127.0.0.1:" in log
        assert "worker 2: listening on 127.0.0.1:" in log
        # access_log = "-": both workers' lines on the master's stdout, whole
        lines = proxy.wait_for_access_lines(2, '"GET / HTTP/1.1" 200 ')
        assert all(line.startswith("127.0.0.1 - - [") for line in proxy.access_lines())
        assert len(lines) == len(proxy.access_lines())


def test_default_is_a_master_and_one_worker_and_header_is_off(tmp_path):
    """worker_processes = 1 (the default): a master and one worker (so reloads work the
    same), and no header unless configured."""
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url, workers=1).replace(
            'served_by_header = "X-Served-By"', ""))
        assert served_by_header(proxy.port) == (200, None)
        assert f"master pid {proxy.proc.pid}, 1 worker process\n" in proxy.log()
        assert len(worker_pids(proxy)) == 1


def test_master_process_false_is_one_process(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url, workers=1).replace(
            "[server]", "[server]\nmaster_process = false"))
        assert served_by_header(proxy.port) == (200, f"twistproxy pid {proxy.proc.pid}")
        assert "master pid" not in proxy.log() and worker_pids(proxy) == {}


def test_killed_worker_is_replaced_and_queued_connections_survive(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        victim = worker_pids(proxy)[1]
        stop = threading.Event()
        killed_at: list[float] = []
        results = []                     # (started, ended, worker or exception)
        lock = threading.Lock()

        def client():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status, worker, pid, _ = get(proxy.port)
                    outcome = (worker, pid) if status == 200 else status
                except OSError as e:
                    outcome = e
                with lock:
                    results.append((started, time.monotonic(), outcome))
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sum(1 for r in results if r[2] == (1, victim)) >= 5, 10,
                       "worker 1 serving the loop")
            killed_at.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)
            line = proxy.wait_for_line(f"worker 1 (pid {victim}) was killed by signal 9 "
                                       "(SIGKILL); replacing it", timeout=10)
            assert "[twistproxy#warn]" in line
            wait_until(lambda: worker_pids(proxy)[1] != victim, 10, "a new worker 1")
            replacement = worker_pids(proxy)[1]
            wait_until(lambda: any(r[2] == (1, replacement) for r in results), 15,
                       "the replacement answering")
        finally:
            stop.set()
            for t in threads:
                t.join()
        # a request may fail only if it was in flight when worker 1 died (it reached
        # it); none that started after the kill failed: the accept queue is the master's
        failed = [r for r in results if not isinstance(r[2], tuple)]
        assert all(started < killed_at[0] for started, _, _ in failed), failed
        assert len(failed) <= len(threads)
        assert any(r[2][0] == 2 for r in results if isinstance(r[2], tuple))
        assert proxy.proc.poll() is None           # the master lives on
        assert proxy.stop() == 0


def test_access_log_lines_whole_with_four_workers_under_load(tmp_path):
    log_file = tmp_path / "access.log"
    clients, each = 8, 60
    agent = "x" * 700                    # ~900-byte lines: a batch spans several writes
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url, workers=4).replace(
            'access_log = "-"', f'access_log = "{log_file}"'))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 4, 15, "four workers")
        workers = set()
        errors = []

        def client(c):
            for i in range(each):
                try:
                    status, worker, _, _ = get(proxy.port, f"/n/{c}/{i}",
                                               {"User-Agent": agent})
                    assert status == 200
                    workers.add(worker)
                except Exception as e:     # noqa: BLE001 - counted below
                    errors.append(e)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(workers) >= 2
        assert proxy.stop() == 0           # the workers flush their last lines
    data = log_file.read_bytes()
    assert data.endswith(b"\n")
    lines = data.decode("ascii").split("\n")[:-1]
    assert len(lines) == clients * each
    seen = set()
    for line in lines:
        m = LINE.match(line)
        assert m, f"a torn or interleaved line: {line[:200]!r}"
        assert m.group(3) == agent
        seen.add((int(m.group(1)), int(m.group(2))))
    assert seen == {(c, i) for c in range(clients) for i in range(each)}


def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    arrived, release = threading.Event(), threading.Event()

    def slow(conn):
        read_head(conn)
        arrived.set()
        release.wait(20)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    with Lab(tmp_path) as lab:
        backend = lab.raw(slow)
        proxy = lab.proxy(lambda ports: config(ports, backend.url,
                                               server="graceful_timeout = 20"))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        pids = list(worker_pids(proxy).values())
        result = []
        t = threading.Thread(target=lambda: result.append(get(proxy.port, timeout=30)))
        t.start()
        assert arrived.wait(10)
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for_line("stopping: 2 worker(s) finish in-flight requests (at most 20s)")
        # the listeners close: nobody takes new connections while the request finishes
        wait_until(lambda: len(proxy.log_lines("TCP Port", "Closed")) == 2, 10,
                   "both workers stop listening")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        assert proxy.proc.poll() is None       # still finishing
        release.set()
        t.join(30)
        assert result and result[0][0] == 200 and result[0][3] == b"slow"
        assert proxy.proc.wait(30) == 0
        assert not any(alive(p) for p in pids)
        log = proxy.log()
        for i, p in enumerate(pids, 1):
            assert f"worker {i} (pid {p}) exited with status 0" in log
        assert "all workers have exited" in log


def test_tls_listener_with_workers(tmp_path):
    pki = PKI(tmp_path).leaf("site", "site.test")
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(
            ports, echo.url, listen_extra='tls = { cert = "site.pem", key = "site.key" }'))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        ctx = pki.client_context()
        ctx.check_hostname = False           # 127.0.0.1 is not site.test; the CA is checked
        seen = served_by_all(proxy.port, 2, context=ctx)
        assert sorted(seen) == [1, 2]        # each worker wraps the adopted port in TLS


def _unchecked(pki):
    ctx = pki.client_context()
    ctx.check_hostname = False           # 127.0.0.1 is not site.test; the CA is checked
    return ctx




def test_bind_error_with_workers_is_todays_line_and_status(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    free = free_port()
    outcomes = []
    try:
        for workers in (1, 2):
            cfg = tmp_path / f"c{workers}.toml"
            cfg.write_text(f"""
[server]
worker_processes = {workers}
[[listen]]
address = "127.0.0.1"
port = {free}
[[listen]]
address = "127.0.0.1"
port = {port}
[[vhost]]
server_name = "x"
""")
            result = subprocess.run([sys.executable, "-m", "twistproxy.cli", "run", str(cfg)],
                                    capture_output=True, text=True, timeout=30, cwd=ROOT)
            err = one_line_failure(result, f"cannot listen on 127.0.0.1:{port}",
                            "address already in use (another process owns it)")
            outcomes.append((result.returncode, err))
        assert outcomes[0] == outcomes[1] and outcomes[0][0] == 1
        socket.socket().bind(("127.0.0.1", free))      # nothing left bound
    finally:
        taken.close()


@pytest.mark.parametrize("value, problem", [
    ("0", 'worker_processes: 0 must be a whole number from 1 to 256 or "auto"'),
    ('"many"', 'worker_processes: \'many\' must be a whole number from 1 to 256 or "auto"'),
])
def test_worker_processes_config_errors(tmp_path, value, problem):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nworker_processes = {value}\n[[listen]]\naddress = "127.0.0.1"'
                   f'\nport = {free_port()}\n[[vhost]]\nserver_name = "x"\n')
    result = subprocess.run([sys.executable, "-m", "twistproxy.cli", "run", str(cfg)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    one_line_failure(result, f"server.{problem}")


def test_twistd_runs_workers_and_pidfile_names_the_master(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        port = free_port()
        cfg = tmp_path / "t.toml"
        cfg.write_text(config({0: port}, echo.url).replace(
            'access_log = "-"', f'access_log = "{tmp_path / "access.log"}"'))
        pidfile = tmp_path / "twistd.pid"
        logfile = tmp_path / "twistd.log"
        proc = subprocess.Popen([script("twistd"), "-n", "--pidfile", str(pidfile),
                                 "--logfile", str(logfile), "twistproxy", "--config",
                                 str(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", port, proc=proc)
            # (the port opens at bind, before twistd writes its pid file)
            wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pid")
            assert int(pidfile.read_text()) == proc.pid
            wait_until(lambda: logfile.read_text().count(" serving\n") == 2, 15,
                       "both workers serving")
            seen = served_by_all(port, 2)
            assert sorted(seen) == [1, 2] and proc.pid not in seen.values()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) in (0, -signal.SIGTERM)     # as twistd without workers
        assert not pidfile.exists()
        log = logfile.read_text()
        # the workers' log lines go through the master, into twistd's log file
        assert "[twistproxy#info] worker 1: listening on 127.0.0.1:" in log
        assert "worker 2 (pid " in log and "exited with status 0" in log
        assert "Traceback" not in log
        assert not any(alive(p) for p in seen.values())


def test_worker_that_cannot_start_is_retried_with_back_off(tmp_path):
    """A replacement that dies at once (its key file is gone) is retried after a
    growing delay; the master lives on, and once the file is back a worker serves."""
    pki = PKI(tmp_path).leaf("site", "site.test")
    key = tmp_path / "site.key"
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(
            ports, echo.url, listen_extra='tls = { cert = "site.pem", key = "site.key" }'))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        victim = worker_pids(proxy)[1]
        saved = key.read_bytes()
        key.unlink()
        os.kill(victim, signal.SIGKILL)
        proxy.wait_for_line(f"worker 1 (pid {victim}) was killed by signal 9 (SIGKILL); "
                            "replacing it", timeout=10)
        first = proxy.wait_for_line("exited with status 2; replacing it in 0.5s (it died "
                                    "at once 1 time(s) in a row)", timeout=10)
        proxy.wait_for_line("exited with status 2; replacing it in 1s (it died at once 2 "
                            "time(s) in a row)", timeout=10)
        assert "worker 1 (pid " in first
        # the worker's own one-line reason reaches the master's log
        assert proxy.log_lines("worker 1: ", "site.key")
        assert proxy.proc.poll() is None
        # worker 2 serves meanwhile
        status, worker, _, _ = get(proxy.port, context=_unchecked(pki))
        assert (status, worker) == (200, 2)
        key.write_bytes(saved)
        wait_until(lambda: len(proxy.log_lines("worker 1: pid ", " serving")) == 2, 15,
                   "a replacement worker 1 serving")
        assert proxy.stop() == 0


def test_workers_stop_when_the_master_is_killed(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url))
        wait_until(lambda: len(proxy.log_lines("pid ", " serving")) == 2, 10, "two workers")
        pids = list(worker_pids(proxy).values())
        proxy.proc.kill()
        proxy.proc.wait()
        wait_until(lambda: not any(alive(p) for p in pids), 15, "the workers exit")


def test_ctrl_c_to_the_process_group_stops_everything_once(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the master and every worker at once: each
    stops gracefully once, none is replaced, all exit with status 0."""
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        port = free_port()
        cfg = tmp_path / "g.toml"
        cfg.write_text(config({0: port}, echo.url))
        err = open(tmp_path / "g.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "twistproxy.cli", "run", str(cfg)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_port("127.0.0.1", port, proc=proc)
            wait_until(lambda: (tmp_path / "g.log").read_text().count(" serving") == 2, 10,
                       "two workers")
            assert get(port)[0] == 200
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            err.close()
        log = (tmp_path / "g.log").read_text()
        assert "worker 1: stopping (SIGINT)" in log and "worker 2: stopping (SIGINT)" in log
        assert log.count("exited with status 0") == 2 and "replacing" not in log
        assert "Traceback" not in log and "Unhandled" not in log

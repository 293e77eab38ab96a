"""Listening sockets that are not bound but inherited, so a restart never closes the port:
hand-over from a running master (`[server] handover_socket`, `twistproxy run --takeover`)
and systemd socket activation (LISTEN_FDS), with real processes on loopback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from harness import (ROOT, Lab, Load, free_port, one_line_failure, run_cli, wait_until,
                     worker_pids)

SERVED = re.compile(r"twistproxy (?:worker \d+ )?pid (\d+)")


def config(ports, backend: str, sock, listeners=(0,), workers: int = 2) -> str:
    listen = "".join(f'\n[[listen]]\naddress = "127.0.0.1"\nport = {ports[n]}\n'
                     for n in listeners)
    return f"""
[server]
access_log = "-"
worker_processes = {workers}
served_by_header = "X-Served-By"
handover_socket = "{sock}"
{listen}
[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "{backend}/"
"""


def serving(proxy, n: int = 2) -> None:
    wait_until(lambda: len(proxy.log_lines("pid ", " serving")) >= n, 15, f"{n} workers")


def old_master(lab, sock, **kw):
    """(the backend, a master serving with its handover socket at `sock`)."""
    echo = lab.echo("app")
    old = lab.proxy(lambda ports: config(ports, echo.url, sock, **kw))
    serving(old)
    return echo, old


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def served_by(port: int) -> int:
    """The pid of the worker that answered one request."""
    load = Load(port, threads=1)
    wait_until(lambda: load.results, 10, "an answer")
    load.stop()
    assert not load.failed(), load.failed()
    return int(SERVED.fullmatch(load.served()[0]).group(1))


def test_takeover_under_steady_load(tmp_path):
    sock = tmp_path / "handover.sock"
    with Lab(tmp_path) as lab:
        echo, old = old_master(lab, sock)
        assert old.wait_for_line(f"handover socket {sock}")
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        load = Load(old.port, threads=2)
        try:
            wait_until(lambda: len(load.served()) >= 20, 10, "the old one serving the load")
            new = lab.proxy(config(old.ports, echo.url, sock), name="new.toml",
                            args=["--takeover"])
            # the old one stops by itself once the new one serves
            assert old.proc.wait(30) == 0
            old.wait_for_line(f"handed the listening sockets to pid {new.proc.pid}; "
                              "stopping")
            serving(new)
            new_pids = {str(p) for p in worker_pids(new).values()}
            wait_until(lambda: sum(1 for s in load.served()
                                   if SERVED.fullmatch(s).group(1) in new_pids) >= 20,
                       10, "the new one serving the load")
        finally:
            load.stop()
        # not one connection refused, not one request failed, at any moment
        assert load.failed() == []
        old_pids = {str(p) for p in worker_pids(old).values()}
        answered = {SERVED.fullmatch(s).group(1) for s in load.served()}
        assert answered & old_pids and answered & new_pids
        new.wait_for_line(f"took 1 listening socket(s) over from pid {old.proc.pid}: "
                          f"127.0.0.1:{old.port}")
        new.wait_for_line(f"pid {old.proc.pid} handed over and stops")
        assert "cannot listen" not in new.log()
        # the new one listens on the handover socket in its turn
        new.wait_for_line(f"handover socket {sock}")
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        assert new.stop() == 0
        assert not sock.exists()


@pytest.mark.parametrize("new_workers", [2, 1])
def test_takeover_binds_an_added_listener_and_closes_a_dropped_one(tmp_path, new_workers):
    sock = tmp_path / "handover.sock"
    with Lab(tmp_path) as lab:
        echo, old = old_master(lab, sock, listeners=(0, "dropped"))
        kept, dropped = old.ports[0], old.ports["dropped"]
        added = free_port()
        new = lab.proxy(config({0: kept, "added": added}, echo.url, sock,
                               listeners=(0, "added"), workers=new_workers),
                        name="new.toml", args=["--takeover"])
        assert old.proc.wait(30) == 0
        new.wait_for_line(f"pid {old.proc.pid} handed over and stops", timeout=15)
        new_pids = set(worker_pids(new).values()) or {new.proc.pid}
        assert served_by(kept) in new_pids            # the inherited socket
        assert served_by(added) in new_pids           # bound by the new one
        assert refused(dropped)                       # nobody holds it any more
        new.wait_for_line(f"inherited socket 127.0.0.1:{dropped}: not in this "
                          "configuration; closed")
        new.wait_for_line(f"listening on 127.0.0.1:{added}")


def test_a_takeover_that_fails_leaves_the_old_one_serving(tmp_path):
    sock = tmp_path / "handover.sock"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        with Lab(tmp_path) as lab:
            echo, old = old_master(lab, sock)
            cfg = tmp_path / "new.toml"
            cfg.write_text(config({0: old.port, "busy": busy}, echo.url, sock,
                                  listeners=(0, "busy")))
            result = run_cli("run", "--takeover", str(cfg))
            assert result.returncode == 1
            one_line_failure(result, f"cannot listen on 127.0.0.1:{busy}: address already "
                             "in use")
            old.wait_for_line("the takeover was abandoned (the new process went away "
                              "before it served); still serving")
            assert old.proc.poll() is None
            assert served_by(old.port) in worker_pids(old).values()
            # and a later takeover still works
            new = lab.proxy(config({0: old.port}, echo.url, sock), name="later.toml",
                            args=["--takeover"])
            assert old.proc.wait(30) == 0
            new.wait_for_line(f"pid {old.proc.pid} handed over and stops", timeout=15)
    finally:
        taken.close()


def test_takeover_with_nobody_on_the_socket_is_one_line_and_status_1(tmp_path):
    sock = tmp_path / "nobody.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(config({0: free_port()}, "http://127.0.0.1:9", sock))
    result = run_cli("run", "--takeover", str(cfg))
    assert result.returncode == 1
    one_line_failure(result, f"--takeover: nothing answers on the handover socket {sock}")


def test_a_live_handover_socket_is_not_stolen_by_a_plain_start(tmp_path):
    sock = tmp_path / "handover.sock"
    with Lab(tmp_path) as lab:
        echo, old = old_master(lab, sock)
        cfg = tmp_path / "second.toml"
        cfg.write_text(config({0: free_port()}, echo.url, sock))
        result = run_cli("run", str(cfg))
        assert result.returncode == 1
        one_line_failure(result, f"cannot listen on the handover socket {sock}: a running "
                         "process answers there")
        assert old.proc.poll() is None and served_by(old.port)   # undisturbed
    # a socket file left by a dead process is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    with Lab(tmp_path) as lab:
        echo = lab.echo("app")
        proxy = lab.proxy(lambda ports: config(ports, echo.url, sock), name="again.toml")
        proxy.wait_for_line(f"handover socket {sock}")


@pytest.mark.parametrize("value, problem", [
    ("5", "server.handover_socket: 5 must be a string"),
    ('"/nonexistent/folder/h.sock"', "server.handover_socket: '/nonexistent/folder/h.sock' "
     "cannot be created: the folder /nonexistent/folder does not exist"),
    (f'"/tmp/{"x" * 120}"', "is too long for a UNIX socket path (at most 107 bytes"),
])
def test_bad_handover_socket_is_a_config_error(tmp_path, value, problem):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nhandover_socket = {value}\n[[listen]]\naddress = "127.0.0.1"'
                   f'\nport = {free_port()}\n[[vhost]]\nserver_name = "x"\n')
    result = run_cli("run", str(cfg))
    assert result.returncode == 2
    one_line_failure(result, problem)


def _listening(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation(tmp_path, workers):
    """As systemd starts it: the listener's socket is fd 3 (named by its key), a stray
    one fd 4; LISTEN_PID is the proxy's own pid (bash execs it)."""
    port, stray_port = free_port(), free_port()
    mine, stray = _listening(port), _listening(stray_port)
    cfg = tmp_path / "c.toml"
    cfg.write_text(config({0: port}, "ECHO", tmp_path / "h.sock", workers=workers)
                   .replace('handover_socket = ', '# handover_socket = '))
    log_path = tmp_path / "proxy.log"
    with Lab(tmp_path) as lab, open(log_path, "wb") as log:
        echo = lab.echo("app")
        cfg.write_text(cfg.read_text().replace("ECHO", echo.url))
        env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES=f"127.0.0.1_{port}:stray")
        proc = subprocess.Popen(
            ["bash", "-c", f'LISTEN_PID=$$ exec {sys.executable} -m twistproxy.cli run '
             f'{cfg} 3<&{mine.fileno()} 4<&{stray.fileno()} '
             f'{mine.fileno()}<&- {stray.fileno()}<&-'],
            pass_fds=(mine.fileno(), stray.fileno()), env=env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=log)
        try:
            # `mine` stays open here all along: a bind of `port` by the proxy would fail
            # with "address already in use"; the proxy accepts from the same socket
            wait_until(lambda: b" serving" in log_path.read_bytes() or
                       b"listening on" in log_path.read_bytes(), 15, "serving")
            stray.close()                              # the proxy's copy is the last
            pid = served_by(port)
            assert pid != proc.pid                         # a worker of the master
            text = log_path.read_text()
            assert f"using the socket systemd passed (fd 3 (127.0.0.1_{port}) bound to " \
                   f"127.0.0.1:{port}) for 127.0.0.1:{port}" in text
            assert f"systemd passed fd 4 (stray) bound to 127.0.0.1:{stray_port}, which " \
                   "matches no [[listen]] or [admin] listener" in text
            assert "cannot listen" not in text and "Traceback" not in text
            assert refused(stray_port)                 # the stray one was closed
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            mine.close()

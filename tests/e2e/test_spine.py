"""The spine end to end: listeners per IP, bind failures, the commands, twistd, the demo."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from clients import Response, fetch
from harness import ROOT, Echo, Proxy, free_port, one_line_failure, script, wait_port


def run(*args, timeout=30, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kw)


def get(address, port, path="/", headers=None) -> Response:
    """A GET to `address` with the Host http.client would send (address:port) unless
    `headers` names one."""
    headers = dict(headers or {})
    host = headers.pop("Host", f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return fetch(port, path, headers, host=host, address=address, timeout=10)


@pytest.fixture
def echoes():
    started = [Echo("site-a"), Echo("site-b")]
    yield started
    for e in started:
        e.stop()


def test_two_listeners_same_port_on_two_ips(tmp_path, echoes, each_reactor):
    a, b = echoes
    port = free_port("127.0.0.2")
    cfg = f"""
[server]
access_log = "-"
[[listen]]
address = "127.0.0.2"
port = {port}
[[listen]]
address = "127.0.0.3"
port = {port}
[[vhost]]
server_name = "a.test"
listen = ["127.0.0.2:{port}"]
  [[vhost.route]]
  path = "/"
  url = "{a.url}/"
[[vhost]]
server_name = "b.test"
listen = ["127.0.0.3:{port}"]
  [[vhost.route]]
  path = "/"
  url = "{b.url}/"
"""
    proxy = Proxy(cfg, tmp_path)
    try:
        wait_port("127.0.0.3", port)
        # Whatever Host says, each IP's listener serves only its own vhost.
        for host, expected in (("127.0.0.2", "site-a"), ("127.0.0.3", "site-b")):
            for hostname in ("a.test", "b.test", "other"):
                r = get(host, port, headers={"Host": hostname})
                assert r.status == 200
                assert r.json()["server"] == expected
        # 127.0.0.1 on that port is not ours: binding exactly the IPs listed
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        assert proxy.stop() == 0
    if each_reactor == "epoll":
        # `twistproxy run` installs the proxy's own epoll reactor (twistproxy/reactor.py)
        assert "twistproxy 0." in proxy.log() and " on ProxyReactor (busy_poll 100us)" \
            in proxy.log()
    else:      # as on Windows: the reactor bound the listeners again itself
        assert " on SelectReactor (it binds each listener itself: no socket adoption)" \
            in proxy.log()


@pytest.mark.usefixtures("each_reactor")
def test_wildcard_listener_serves_every_loopback_address(tmp_path, echoes):
    port = free_port()
    cfg = f"""
[[listen]]
address = "0.0.0.0"
port = {port}
[[vhost]]
server_name = "any.test"
  [[vhost.route]]
  path = "/"
  url = "{echoes[0].url}/"
"""
    proxy = Proxy(cfg, tmp_path)
    try:
        for host in ("127.0.0.1", "127.0.0.5"):
            r = get(host, port)
            assert r.status == 200 and r.json()["server"] == "site-a"
    finally:
        proxy.stop()


@pytest.mark.usefixtures("each_reactor")
def test_star_listener_serves_ipv4_and_ipv6(tmp_path, echoes):
    """"*" is every address of both families: one dual-stack socket (IPV6_V6ONLY off,
    which Windows would not give by default), rebound the same way by the reactor."""
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    cfg = f"""
[[listen]]
address = "*"
port = {port}
[[vhost]]
server_name = "star.test"
  [[vhost.route]]
  path = "/"
  url = "{echoes[0].url}/"
"""
    proxy = Proxy(cfg, tmp_path)
    try:
        for host in ("127.0.0.1", "::1"):
            r = get(host, port)
            assert r.status == 200 and r.json()["server"] == "site-a"
    finally:
        proxy.stop()


@pytest.mark.usefixtures("each_reactor")
def test_ipv6_loopback_listener(tmp_path, echoes):
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    cfg = f"""
[[listen]]
address = "::1"
port = {port}
[[vhost]]
server_name = "v6.test"
  [[vhost.route]]
  path = "/"
  url = "{echoes[0].url}/"
"""
    proxy = Proxy(cfg, tmp_path)
    try:
        r = get("::1", port)
        assert r.status == 200
        assert r.json()["server"] == "site-a"
    finally:
        proxy.stop()




def test_port_in_use_stops_startup_with_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    free = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[[listen]]
address = "127.0.0.1"
port = {free}
[[listen]]
address = "127.0.0.1"
port = {port}
[[vhost]]
server_name = "x"
""")
    try:
        result = run(sys.executable, "-m", "twistproxy.cli", "run", str(cfg))
        assert result.returncode != 0
        one_line_failure(result, f"cannot listen on 127.0.0.1:{port}",
                          "address already in use (another process owns it)")
        # nothing half-started: the first listener was released again
        s = socket.socket()
        s.bind(("127.0.0.1", free))
        s.close()
    finally:
        taken.close()


def _without_bind_privilege(cfg) -> list[str]:
    """`twistproxy run cfg` as it runs without the right to bind ports below 1024. As
    root: as the user nobody when nobody can `check` cfg with this interpreter, else as
    root with CAP_NET_BIND_SERVICE dropped (an interpreter or checkout under /root)."""
    cmd = [sys.executable, "-m", "twistproxy.cli"]
    if os.geteuid() != 0:
        return [*cmd, "run", cfg]
    import pwd
    nobody = pwd.getpwnam("nobody")
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                 "--clear-groups", "--"]
    if run(*as_nobody, *cmd, "check", cfg).returncode == 0:
        return [*as_nobody, *cmd, "run", cfg]
    return ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service",
            "--", *cmd, "run", cfg]


def test_privileged_port_message():
    start = int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read())
    if start <= 80:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start is {start}: anyone may bind 80")
    # a folder any user can read (pytest's tmp_path is private to its owner)
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o755)
        cfg = os.path.join(shared, "c.toml")
        with open(cfg, "w") as f:
            f.write('[[listen]]\naddress = "127.0.0.1"\nport = 80\n[[vhost]]\nserver_name = "x"\n')
        os.chmod(cfg, 0o644)
        result = run(*_without_bind_privilege(cfg))
    assert result.returncode != 0
    one_line_failure(result, "cannot listen on 127.0.0.1:80: permission denied")


def test_address_not_on_this_machine(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[listen]]\naddress = "192.0.2.77"\nport = 8080\n'
                   '[[vhost]]\nserver_name = "x"\n')
    result = run(sys.executable, "-m", "twistproxy.cli", "run", str(cfg))
    assert result.returncode != 0
    one_line_failure(result, "cannot listen on 192.0.2.77:8080: address not available")


def test_check_command_exit_codes(tmp_path):
    good = ROOT / "etc" / "twistproxy.toml"
    result = run(sys.executable, "-m", "twistproxy.cli", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert re.search(r"ok: \d+ listener\(s\).*vhost\(s\).*route\(s\).*balancer\(s\)",
                     result.stdout)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listen]]\naddress = "127.0.0.1"\nport = 80\n[[vhost]]\n'
                   'server_name = "a"\n[[vhost.route]]\npath = "/"\nurl = "htp://x"\n')
    result = run(sys.executable, "-m", "twistproxy.cli", "check", str(bad))
    assert result.returncode == 2
    err = one_line_failure(result)
    assert err == (f"{bad}: vhost[0].route[0].url: 'htp://x' is not an http, https, "
                   "ws, wss or balancer URL")
    result = run(sys.executable, "-m", "twistproxy.cli", "check", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    one_line_failure(result, "none.toml: cannot read")


def test_console_script_version_and_check():
    result = run(script("twistproxy"), "--version")
    assert result.returncode == 0
    from twistproxy import __version__
    assert result.stdout.strip() == f"twistproxy {__version__}"
    result = run(script("twistproxy"), "check", str(ROOT / "etc" / "twistproxy.toml"))
    assert result.returncode == 0


def test_run_with_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listen]]\naddress = "127.0.0.1"\nport = 8080\n[[vhost]]\nserver_nme = "a"\n')
    result = run(sys.executable, "-m", "twistproxy.cli", "run", str(bad))
    assert result.returncode == 2
    one_line_failure(result, "vhost[0].server_nme: unknown key (did you mean 'server_name'?)")


def test_twistd_plugin_is_listed():
    result = run(script("twistd"), "--help")
    assert "twistproxy" in result.stdout


@pytest.mark.parametrize("reactor", [None, "twistproxy"])
def test_twistd_runs_the_service_and_stops_on_sigterm(tmp_path, echoes, reactor):
    port = free_port()
    cfg = tmp_path / "t.toml"
    cfg.write_text(f"""
[server]
access_log = "{tmp_path / 'access.log'}"
[[listen]]
address = "127.0.0.1"
port = {port}
[[vhost]]
server_name = "t"
  [[vhost.route]]
  path = "/"
  url = "{echoes[0].url}/"
""")
    logfile = tmp_path / "twistd.log"
    pidfile = tmp_path / "twistd.pid"
    chosen = [f"--reactor={reactor}"] if reactor else []
    proc = subprocess.Popen([script("twistd"), "-n", *chosen, "--logfile", str(logfile),
                             "--pidfile", str(pidfile), "twistproxy", "--config", str(cfg)],
                            cwd=tmp_path)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        r = get("127.0.0.1", port, "/via-twistd")
        assert r.status == 200 and r.json()["target"] == "/via-twistd"
        assert int(pidfile.read_text()) == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        # twistd reports the signal that stopped it as its exit status, after a clean stop
        assert proc.wait(15) in (0, -signal.SIGTERM)
    assert "/via-twistd" in (tmp_path / "access.log").read_text()
    log = logfile.read_text()
    assert "listening on 127.0.0.1" in log
    assert "Main loop terminated" in log and "Traceback" not in log
    assert not pidfile.exists()
    if reactor:
        assert "reactor class: twistproxy.reactor.ProxyReactor" in log
    # whatever reactor twistd gave the master, its worker serves on the proxy's own
    assert "worker 1: twistproxy 0.1.0 on ProxyReactor (busy_poll 100us)" in log


# twistd as on Windows: Twisted's Windows runner (no fork, no pid file, no privileges),
# which is plain Python and runs here too, on the select reactor
TWISTW = ("import sys; from twisted.application import app; "
          "from twisted.scripts._twistw import ServerOptions, WindowsApplicationRunner; "
          "app.run(lambda config: WindowsApplicationRunner(config).run(), ServerOptions)")


def test_twistd_windows_runner_runs_the_plugin(tmp_path, echoes):
    port = free_port()
    cfg = tmp_path / "w.toml"
    cfg.write_text(f"""
[server]
master_process = false        # what Windows gets by default (README, Windows)
access_log = 'access.log'     # relative: beside this file
[[listen]]
address = "127.0.0.1"
port = {port}
[[vhost]]
server_name = "w"
  [[vhost.route]]
  path = "/"
  url = "{echoes[0].url}/"
""")
    logfile = tmp_path / "twistw.log"
    proc = subprocess.Popen([sys.executable, "-c", TWISTW, "--reactor=select",
                             "--logfile", str(logfile), "twistproxy", "--config", str(cfg)],
                            cwd=tmp_path)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        r = get("127.0.0.1", port, "/via-windows-runner")
        assert r.status == 200 and r.json()["target"] == "/via-windows-runner"
    finally:
        proc.send_signal(signal.SIGINT)        # Ctrl+C, the console's stop
        assert proc.wait(15) == 0          # a clean, graceful stop
    assert "/via-windows-runner" in (tmp_path / "access.log").read_text()
    log = logfile.read_text()
    assert "on SelectReactor" in log and "listening on 127.0.0.1" in log
    assert "Traceback" not in log


def test_twistd_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listen]]\naddress = "127.0.0.1"\nport = 99999\n[[vhost]]\nserver_name="a"\n')
    result = run(script("twistd"), "-n", "--pidfile", "", "twistproxy", "--config", str(bad))
    assert result.returncode == 2
    one_line_failure(result, "listen[0].port: 99999 must be a whole number from 1 to 65535")


def test_twistd_port_in_use(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[listen]]\naddress = "127.0.0.1"\nport = {port}\n'
                   '[[vhost]]\nserver_name = "x"\n')
    try:
        result = run(script("twistd"), "-n", "--pidfile", "", "twistproxy", "--config", str(cfg))
        assert result.returncode != 0
        one_line_failure(result, f"cannot listen on 127.0.0.1:{port}: address already in use")
    finally:
        taken.close()


def test_demo_works_end_to_end():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "twistproxy.cli", "demo", "--listen",
                             f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        servers = set()
        for _ in range(4):
            r = get("127.0.0.1", port, "/hello")
            assert r.status == 200
            servers.add(r.json()["server"])
            cookie = r.header("Set-Cookie")
            assert cookie and cookie.startswith("ROUTEID=.app")
        assert servers == {"app1", "app2"}          # balanced
        # sticky: with the cookie, always the same app
        seen = {get("127.0.0.1", port, "/s", {"Cookie": "ROUTEID=.app2"}).json()["server"]
                for _ in range(4)}
        assert seen == {"app2"}
        data = get("127.0.0.1", port, "/app1/some/path?q=1").json()
        assert data["server"] == "app1" and data["target"] == "/some/path?q=1"
        import asyncio

        import websockets

        async def echo():
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("demo")
                return await ws.recv()
        assert asyncio.run(echo()) == "demo"           # the WebSocket echo route
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert b"curl" in out           # it tells the newcomer what to try
    assert b'"GET /hello HTTP/1.1" 200' in out

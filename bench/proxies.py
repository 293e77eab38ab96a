"""The proxies compared, each configured alike: one process (or worker), HTTP/1.1 with
keep-alive to the backend where the proxy can, client keep-alive without a request
limit, and an access log to a file in the run's temp dir.

Each `start(workdir, port, members, tag, mode)` writes its configuration and starts the
proxy on 127.0.0.1:port in front of `members` (backend ports; two of them make a
balancer), returning the Proc. `mode` is "http" (reverse proxy), "websocket" (the same,
passing WebSocket upgrades on as a tunnel to the one member, a ws:// echo) or "connect"
(a forward proxy that takes `CONNECT 127.0.0.1:<member>`; no reverse route).
`available()` says why a proxy cannot run here, or None; `unsupported(mode)` why it
cannot run in that mode, or None.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .procs import Proc, fd_limit, find_tool

APACHE_MODULES = Path("/usr/lib/apache2/modules")


class Proxy:
    name = ""
    label = ""
    balancer = True          # can put two members behind one route
    notes = ""               # how its settings differ from the others'
    cannot: dict[str, str] = {}     # mode -> why this proxy cannot run in it
    only: tuple[str, ...] = ()      # when set, the only scenarios it runs in

    def available(self) -> str | None:
        return None

    def unsupported(self, mode: str) -> str | None:
        return self.cannot.get(mode)

    def start(self, workdir: Path, port: int, members: list[int], tag: str,
              mode: str = "http") -> Proc:
        raise NotImplementedError


class Direct(Proxy):
    """No proxy: wrk talks to the backend itself (the ceiling of this machine)."""
    name, label = "direct", "(backend, no proxy)"
    balancer = False

    def start(self, workdir, port, members, tag, mode="http"):
        return None


class TwistProxy(Proxy):
    name, label = "twistproxy", "twistproxy (1 process)"    # one worker, and its master
    server = ""                       # extra [server] lines
    tree = None                       # run the twistproxy of another checkout (its folder)

    def start(self, workdir, port, members, tag, mode="http"):
        conf = workdir / f"{tag}.toml"
        head = f"""\
[server]
access_log = "{workdir / (tag + '.access.log')}"
keepalive_timeout = 300
{self.server}
[[listen]]
address = "127.0.0.1"
port = {port}

[[vhost]]
server_name = "localhost"
"""
        if mode == "connect":             # a forward proxy; clients on loopback may use it
            conf.write_text(head + f"proxy_requests = true\nallow_connect = [{members[0]}]\n")
            return Proc(tag, [sys.executable, "-m", "twistproxy.cli", "run", str(conf)],
                        workdir, cwd=self.tree)
        scheme = "ws" if mode == "websocket" else "http"
        if len(members) == 1:
            route = f'url = "{scheme}://127.0.0.1:{members[0]}/"'
            balancer = ""
        else:
            route = 'url = "balancer://pair/"'
            balancer = "[balancer.pair]\n" + "".join(
                f'[[balancer.pair.member]]\nurl = "http://127.0.0.1:{m}"\n' for m in members)
        conf.write_text(head + f"""
  [[vhost.route]]
  path = "/"
  {route}

{balancer}""")
        return Proc(tag, [sys.executable, "-m", "twistproxy.cli", "run", str(conf)], workdir,
                    cwd=self.tree)


class Nginx(Proxy):
    name, label = "nginx", "nginx (1 worker)"
    workers = 1
    cannot = {"connect": "nginx has no CONNECT (forward proxy) support"}

    def available(self):
        return None if find_tool("nginx") else "nginx not installed (apt-get install nginx)"

    def start(self, workdir, port, members, tag, mode="http"):
        servers = "".join(f"server 127.0.0.1:{m};" for m in members)
        if mode == "websocket":           # the Upgrade passed on; upgraded, it is a tunnel
            conn = ('proxy_set_header Upgrade $http_upgrade;\n'
                    '            proxy_set_header Connection "upgrade";\n'
                    '            proxy_read_timeout 300s;')
        else:
            conn = 'proxy_set_header Connection "";'
        d = workdir
        conf = d / f"{tag}.conf"
        conf.write_text(f"""\
worker_processes {self.workers};
worker_rlimit_nofile {fd_limit()};
daemon off;
pid {d}/{tag}.pid;
error_log {d}/{tag}.error.log warn;
events {{ worker_connections {fd_limit() // 2}; }}
http {{
    access_log {d}/{tag}.access.log;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_max_body_size 0;
    client_body_temp_path {d}/{tag}-client;
    proxy_temp_path {d}/{tag}-proxy;
    fastcgi_temp_path {d}/{tag}-fastcgi;
    uwsgi_temp_path {d}/{tag}-uwsgi;
    scgi_temp_path {d}/{tag}-scgi;
    upstream be {{ {servers} keepalive 64; keepalive_requests 100000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            {conn}
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
""")
        return Proc(tag, [find_tool("nginx"), "-p", str(d), "-c", str(conf)], workdir)


class TwistProxyNoSpin(TwistProxy):
    """The same with adaptive busy polling off, to show what it does to latency."""
    name, label = "twistproxy-nospin", "twistproxy, busy_poll = 0"
    server = "busy_poll = 0\n"
    notes = "busy_poll = 0: sleeps in epoll at once, as nginx and Apache do"
    only = ("small", "latency")


class HAProxy(Proxy):
    name, label = "haproxy", "haproxy (1 thread)"
    threads = 1
    cannot = {"connect": "haproxy cannot serve CONNECT (it is no forward proxy)"}

    def available(self):
        return None if find_tool("haproxy") else "haproxy not installed (apt-get install haproxy)"

    def start(self, workdir, port, members, tag, mode="http"):
        servers = "".join(f"    server s{i} 127.0.0.1:{m}\n" for i, m in enumerate(members))
        # mode http relays a WebSocket upgrade as it is; the tunnel's idle timeout:
        tunnel = "    timeout tunnel 300s\n" if mode == "websocket" else ""
        conf = workdir / f"{tag}.cfg"
        conf.write_text(f"""\
global
    nbthread {self.threads}
    maxconn {fd_limit() // 2 - 100}
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
{tunnel}    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
{servers}""")
        # `log stdout` lines land in the Proc's output file: that is its access log
        return Proc(tag, [find_tool("haproxy"), "-db", "-f", str(conf)], workdir)


class Apache(Proxy):
    name, label = "apache", "Apache mod_proxy (event, 1 process)"
    notes = "ServerLimit 1, ThreadsPerChild 64"

    def available(self):
        if not find_tool("apache2"):
            return "apache2 not installed (apt-get install apache2)"
        if not (APACHE_MODULES / "mod_proxy_http.so").exists():
            return f"mod_proxy_http.so not in {APACHE_MODULES}"
        return None

    MODE_MODULES = {"websocket": "proxy_wstunnel", "connect": "proxy_connect"}

    def unsupported(self, mode):
        m = self.MODE_MODULES.get(mode)
        if m and not (APACHE_MODULES / f"mod_{m}.so").exists():
            return f"mod_{m}.so not in {APACHE_MODULES}"
        return None

    def start(self, workdir, port, members, tag, mode="http"):
        mods = ["mpm_event", "authz_core", "proxy", "proxy_http", "log_config", "unixd"]
        if len(members) > 1:
            mods += ["slotmem_shm", "proxy_balancer", "lbmethod_byrequests"]
        if mode in self.MODE_MODULES:
            mods.append(self.MODE_MODULES[mode])
        load = "".join(f"<IfModule !mod_{m}.c>\nLoadModule {m}_module "
                       f"{APACHE_MODULES}/mod_{m}.so\n</IfModule>\n" for m in mods)
        requests = "Off"
        if mode == "connect":
            # a forward proxy (for loopback only: the listener is on 127.0.0.1)
            requests = "On"
            proxy = (f"AllowCONNECT {members[0]}\n"
                     "<Proxy *>\n    Require all granted\n</Proxy>\n")
        elif mode == "websocket":
            # 2.4.47+: mod_proxy_wstunnel hands ws:// to mod_proxy_http's upgrade tunnel
            proxy = f"ProxyPass / ws://127.0.0.1:{members[0]}/\n"
        elif len(members) == 1:
            proxy = f"ProxyPass / http://127.0.0.1:{members[0]}/ keepalive=On\n"
        else:
            proxy = ("<Proxy balancer://pair>\n" + "".join(
                f"    BalancerMember http://127.0.0.1:{m} keepalive=On\n" for m in members)
                + "</Proxy>\nProxyPass / balancer://pair/\n")
        d = workdir
        run = d / f"{tag}-run"
        run.mkdir(exist_ok=True)
        run.chmod(0o777)
        conf = d / f"{tag}.conf"
        conf.write_text(f"""\
ServerRoot {d}
ServerName localhost
{load}
Listen 127.0.0.1:{port}
User nobody
Group nogroup
PidFile {run}/httpd.pid
DefaultRuntimeDir {run}
Mutex file:{run} default
ErrorLog {d}/{tag}.error.log
LogLevel warn
LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{{Referer}}i\\" \\"%{{User-Agent}}i\\" %D" bench
CustomLog {d}/{tag}.access.log bench
ServerLimit 1
StartServers 1
ThreadsPerChild 64
ThreadLimit 64
MaxRequestWorkers 64
MinSpareThreads 1
MaxSpareThreads 64
MaxConnectionsPerChild 0
KeepAlive On
KeepAliveTimeout 300
MaxKeepAliveRequests 0
LimitRequestBody 0
Timeout 300
ProxyRequests {requests}
{proxy}""")
        return Proc(tag, [find_tool("apache2"), "-f", str(conf), "-DFOREGROUND"], workdir)


class TwistedWeb(Proxy):
    name, label = "twisted", "twisted.web.proxy"
    balancer = False
    notes = "ReverseProxyResource: a new backend connection per request, bodies held"
    cannot = {"websocket": "twisted.web.proxy's ReverseProxyResource has no WebSocket "
                           "(Upgrade) support",
              "connect": "twisted.web.proxy serves no CONNECT"}

    def start(self, workdir, port, members, tag, mode="http"):
        return Proc(tag, [sys.executable, "-m", "bench.twisted_reverse", str(port),
                          str(members[0]), str(workdir / f"{tag}.access.log")], workdir)


class ProxyPy(Proxy):
    name, label = "proxy.py", "proxy.py (1 worker)"
    balancer = False
    notes = ("reverse proxy plugin, --threaded (a thread per client connection: 2.4.10's "
             "default threadless mode dies on a second request over a keep-alive "
             "connection); a new backend connection per request; for CONNECT its "
             "plain forward proxy, --threaded too")
    cannot = {"websocket": "proxy.py's reverse proxy plugin does not tunnel WebSocket "
                           "upgrades"}

    def available(self):
        if importlib.util.find_spec("proxy") is None:
            return "proxy.py not installed (pip install proxy.py)"
        return None

    def start(self, workdir, port, members, tag, mode="http"):
        # for CONNECT, its own forward proxy (which takes CONNECT to any port)
        reverse = [] if mode == "connect" else [
            "--enable-reverse-proxy", "--plugins", "bench.proxypy_plugin.Reverse"]
        return Proc(tag, [
            sys.executable, "-m", "proxy", "--threaded",
            "--hostname", "127.0.0.1", "--port", str(port),
            "--num-workers", "1", "--num-acceptors", "1", "--backlog", "4096",
            "--open-file-limit", str(fd_limit()), "--timeout", "300", *reverse,
            "--log-file", str(workdir / f"{tag}.access.log"), "--log-level", "info",
        ], workdir, env={**os.environ, "BENCH_BACKEND_PORT": str(members[0])})


class TwistProxyParent(TwistProxy):
    """The same proxy from another checkout, in the same run: a change against its
    parent (`git worktree add /tmp/parent HEAD~1`, then TWISTPROXY_BENCH_PARENT=/tmp/parent).
    `python -m` puts the working directory first on sys.path, so the process runs in
    that checkout."""
    name = "twistproxy-parent"
    tree = os.environ.get("TWISTPROXY_BENCH_PARENT") or None
    label = f"twistproxy at {tree}" if tree else "twistproxy (parent checkout)"

    def available(self):
        if not self.tree or not os.path.isdir(os.path.join(self.tree, "twistproxy")):
            return "set TWISTPROXY_BENCH_PARENT to a checkout (git worktree add)"
        return None


class TwistProxy2(TwistProxy):
    name, label = "twistproxy-2", "twistproxy (2 worker processes)"
    server = "worker_processes = 2\n"
    only = ("workers",)


class TwistProxySingle(TwistProxy):
    """No master: the one process of master_process = false (before worker processes)."""
    name, label = "twistproxy-single", "twistproxy (master_process = false)"
    server = "master_process = false\n"
    only = ("workers",)


class Nginx2(Nginx):
    name, label = "nginx-2", "nginx (2 workers)"
    workers = 2
    only = ("workers",)


class HAProxy2(HAProxy):
    name, label = "haproxy-2", "haproxy (2 threads)"
    threads = 2
    only = ("workers",)


ALL = [Direct(), TwistProxy(), TwistProxyNoSpin(), Nginx(), HAProxy(), Apache(), TwistedWeb(),
       ProxyPy(),
       TwistProxy2(), TwistProxySingle(), Nginx2(), HAProxy2(), TwistProxyParent()]
BY_NAME = {p.name: p for p in ALL}

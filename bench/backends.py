"""The backends every proxy is put in front of, started once per run.

- nginx (one worker, keep-alive without limit) on two ports: `/small` answered by
  `return 200` with a 128-byte body, `/1m.bin` a 1 MiB file and `/stream.bin` a sparse
  file of --stream-bytes, both served with sendfile from `root`.
- Without nginx, two `python -m twistproxy.echo` processes, steered by X-Echo-Bytes.
- Uploads always go to one more echo process: it reads the body, hashes it and
  discards it (nginx has no plain "read and discard" handler).
- For the WebSocket scenario, a `python -m twistproxy.wsecho` process (autobahn on
  Twisted) echoes every message; the CONNECT scenario tunnels to the first member.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import load
from .procs import MIB, Proc, find_tool, free_port

SMALL_BYTES = 128
LARGE_BYTES = MIB
WS_MESSAGE_BYTES = 128


@dataclass
class Target:
    """What a scenario requests: path, request headers, and the body size to expect."""
    path: str
    size: int
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "GET"


@dataclass
class Backends:
    kind: str                       # "nginx" or "echo"
    why: str                        # why echo, when it is
    members: list[int]              # two ports; the first is the plain backend
    sink: int                       # port of the upload sink (echo)
    targets: dict[str, Target]      # small, large, stream, upload, ws
    procs: list[Proc]
    ws: int | None = None           # port of the WebSocket echo, when started

    def describe(self) -> str:
        first = ("nginx 1 worker (return 200 / sendfile)" if self.kind == "nginx"
                 else f"twistproxy.echo ({self.why})")
        ws = f"; WebSocket echo twistproxy.wsecho on {self.ws}" if self.ws else ""
        return (f"{first} on ports {self.members}; uploads to twistproxy.echo on "
                f"{self.sink}{ws}")

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


NGINX_BACKEND = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {dir}/backend-nginx.pid;
error_log {dir}/backend-nginx.error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {dir}/b-client;
    proxy_temp_path {dir}/b-proxy;
    fastcgi_temp_path {dir}/b-fastcgi;
    uwsgi_temp_path {dir}/b-uwsgi;
    scgi_temp_path {dir}/b-scgi;
    server {{
        listen 127.0.0.1:{p1} backlog=4096;
        listen 127.0.0.1:{p2} backlog=4096;
        root {dir}/www;
        location = /small {{ return 200 "{body}"; }}
        location / {{ }}
    }}
}}
"""


def _echo(name: str, workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(name, [sys.executable, "-m", "twistproxy.echo", name, str(port)],
                workdir)
    proc.wait_port(port)
    return proc, port


def _wsecho(workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc("backend-wsecho", [sys.executable, "-m", "twistproxy.wsecho", str(port)],
                workdir)
    proc.wait_port(port)
    return proc, port


def start(workdir: Path, stream_bytes: int, nofile: int, use_nginx: bool = True,
          websocket: bool = False) -> Backends:
    """websocket: also start the WebSocket echo (Backends.ws, target "ws")."""
    procs: list[Proc] = []
    try:
        sink_proc, sink = _echo("backend-sink", workdir)
        procs.append(sink_proc)
        upload = Target("/upload", stream_bytes, method="PUT")
        ws = None
        if websocket:
            ws_proc, ws = _wsecho(workdir)
            procs.append(ws_proc)
        wst = Target("/", WS_MESSAGE_BYTES)       # path on the echo, message size
        nginx = find_tool("nginx") if use_nginx else None
        if nginx:
            www = workdir / "www"
            www.mkdir()
            (www / "1m.bin").write_bytes(bytes(range(256)) * (LARGE_BYTES // 256))
            with open(www / "stream.bin", "wb") as f:
                f.truncate(stream_bytes)                 # sparse: no disk used
            for p in (workdir, www, *www.iterdir()):     # readable by nginx's worker user
                p.chmod(0o755 if p.is_dir() else 0o644)
            p1, p2 = free_port(), free_port()
            conf = workdir / "backend-nginx.conf"
            conf.write_text(NGINX_BACKEND.format(
                dir=workdir, p1=p1, p2=p2, body="x" * (SMALL_BYTES - 1) + "\\n",
                nofile=nofile, conns=max(1024, nofile - 100)))
            proc = Proc("backend-nginx", [nginx, "-p", str(workdir), "-c", str(conf)],
                        workdir)
            procs.append(proc)
            proc.wait_port(p1)
            b = Backends("nginx", "", [p1, p2], sink, {
                "small": Target("/small", SMALL_BYTES),
                "large": Target("/1m.bin", LARGE_BYTES),
                "stream": Target("/stream.bin", stream_bytes),
                "upload": upload, "ws": wst}, procs, ws)
            load.download(p1, b.targets["stream"])   # page cache filled before anyone's turn
            return b
        ports = []
        for name in ("backend-echo-a", "backend-echo-b"):
            proc, port = _echo(name, workdir)
            procs.append(proc)
            ports.append(port)

        def steered(path, n):
            return Target(path, n, {"X-Echo-Bytes": str(n)})
        why = "--echo-backend" if not use_nginx else "nginx not installed"
        return Backends("echo", why, ports, sink, {
            "small": steered("/small", SMALL_BYTES),
            "large": steered("/1m.bin", LARGE_BYTES),
            "stream": steered("/stream.bin", stream_bytes),
            "upload": upload, "ws": wst}, procs, ws)
    except BaseException:
        for p in procs:
            p.stop()
        raise

"""`twistproxy demo`: two built-in backends and a proxy in front, nothing to set up.

Owns the demo's configuration (generated, with the backends on free loopback ports)
and the lines that tell a newcomer what to try.
"""

from __future__ import annotations

import sys

from .config import ConfigError, loads
from .echo import EchoFactory

DEMO_TOML = """\
# the configuration `twistproxy demo` runs (backends on free loopback ports)
[server]
access_log = "-"

[[listen]]
address = "{address}"
port = {port}

[admin]                          # balancer-manager, server-status, metrics: loopback only
address = "127.0.0.1"
port = {admin}

[[vhost]]
server_name = "localhost"
response_headers = [{{ action = "set", name = "X-Content-Type-Options", value = "nosniff", always = true }}]

  [[vhost.route]]              # one app directly, by path (ProxyPass /app1/ http://.../)
  path = "/app1/"
  url = "http://127.0.0.1:{app1}/"
  reverse = true

  [[vhost.route]]              # WebSocket: upgraded and tunnelled to an echo server
  path = "/ws"
  url = "ws://127.0.0.1:{wsecho}/"

  [[vhost.route]]              # everything else: balanced, sticky by the ROUTEID cookie
  path = "/"
  url = "balancer://apps/"

[balancer.apps]
lbmethod = "byrequests"
growth = 1                       # the manager may add one member
stickysession = "ROUTEID"
sticky_cookie = {{ name = "ROUTEID", path = "/" }}

  [[balancer.apps.member]]
  url = "http://127.0.0.1:{app1}"
  route = "app1"

  [[balancer.apps.member]]
  url = "http://127.0.0.1:{app2}"
  route = "app2"
"""


def _python() -> str:
    """This interpreter, as the user can type it (relative when below the current folder):
    it has twistproxy, whatever environment it lives in."""
    import os
    import shlex
    path = sys.executable
    if path.startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)
    return shlex.quote(path)


def _free_port() -> int:
    """A loopback port free now, for the demo's admin listener."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(listen: str, log_level: str, start_logging, run_service) -> int:
    from twisted.internet import reactor

    from .service import StartupError, build_service
    address, _, port = listen.rpartition(":")
    address = address.strip("[]") or "127.0.0.1"
    from . import wsecho
    backends = [reactor.listenTCP(0, EchoFactory(name), interface="127.0.0.1")
                for name in ("app1", "app2")]
    ports = [b.getHost().port for b in backends]
    ws = reactor.listenTCP(0, wsecho.factory(), interface="127.0.0.1").getHost().port
    admin = _free_port()
    text = DEMO_TOML.format(address=address, port=port, app1=ports[0], app2=ports[1],
                            wsecho=ws, admin=admin)
    try:
        config = loads(text, "<demo>")
        service = build_service(config, reactor)
    except (ConfigError, StartupError) as e:
        print(e, file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    base = f"http://{shown}"
    print(f"""twistproxy demo: proxy on {base}, backends app1 on 127.0.0.1:{ports[0]} and \
app2 on 127.0.0.1:{ports[1]}, a WebSocket echo on 127.0.0.1:{ws}.
Admin (127.0.0.1 only):
  balancer-manager  http://127.0.0.1:{admin}/balancer-manager   (drain, disable, weigh members)
  server-status     http://127.0.0.1:{admin}/server-status
  metrics           http://127.0.0.1:{admin}/metrics
Try:
  curl -s {base}/hello                        # balanced: app1 and app2 take turns
  curl -s {base}/hello                        # ... see "server" in the JSON
  curl -si -c /tmp/jar -b /tmp/jar {base}/    # sticky: the ROUTEID cookie pins one app
  curl -s {base}/app1/some/path?q=1           # path route straight to app1 (/some/path)
  curl -s -X POST --data-binary @/etc/hostname {base}/upload
  {_python()} -m twistproxy.wsclient {base.replace("http", "ws")}/ws   # type a line, it echoes back
  curl -s 'http://127.0.0.1:{admin}/balancer-manager?xml=1'   # members as Apache's manager lists them
Every request is logged below (Combined Log Format + microseconds + backend).
Configuration in use:
{text}
Press Ctrl-C to stop.""", flush=True)
    start_logging(log_level)
    run_service(service, reactor)
    return 0

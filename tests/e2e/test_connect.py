"""Forward proxy and CONNECT end to end: tunnels to a TLS site (curl -p), arbitrary bytes
and half-close both ways, WebSocket through a tunnel, backpressure and the idle timeout;
the gate (allow_connect ports, proxy_allow client networks, connect_allow/connect_deny
target patterns, Basic proxy authentication against a htpasswd file with bcrypt and
{SHA} entries); unreachable, refused and timed-out targets; forwarding off (405, and
absolute-form requests served by the vhost); absolute-form requests forwarded to their
origin (Host, Via, hop-by-hop and Proxy-* headers) and the access log.

Real processes on loopback: the proxies run as `python -m twistproxy.cli run FILE`. One
proxy (module scope) has one listener per forward-proxy configuration (each vhost bound
to its listener with `listen`, since the forward gate is per listener); a second one has
`[server] timeout = 1` and `tunnel_timeout = 1` for the connect timeout and the idle
tunnel. The TLS site is a third twistproxy with a trustme certificate for localhost in
front of an echo backend; CONNECT targets are RawBackend threads; the WebSocket server
is `python -m twistproxy.wsecho`. Clients are curl, raw sockets and `websockets`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import bcrypt
import pytest
from websockets.asyncio.client import connect as ws_connect

from clients import PKI, HTTPClient, ask, request_bytes
from harness import Lab, RawBackend, free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")

ALL_BYTES = bytes(range(256))
MiB = 1 << 20
REALM = "twistproxy tests"
USERS = {"alice": "wonder land", "bob": "b0b:secret"}   # alice bcrypt, bob {SHA}


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = _has_ipv6()


# ---------------------------------------------------------------------------
# raw HTTP on sockets


def header(headers, name: str):
    """The first value of `name` in [(name, value)], or None."""
    return next((v for n, v in headers if n.lower() == name.lower()), None)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def connect_request(target: str, headers: dict | None = None) -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def tunnel(port: int, target: str, headers: dict | None = None, early: bytes = b"",
           timeout: float = 10.0):
    """CONNECT through the proxy on `port`: (HTTPClient, status, headers, body). On 200
    the client is the tunnel (its buffer holds any tunnelled bytes that came with the
    head)."""
    c = HTTPClient(port, timeout)
    c.send(connect_request(target, headers) + early)
    r = c.response("CONNECT")
    return c, r.status, r.headers, r.body


def connect_status(port: int, target: str, headers: dict | None = None):
    c, status, hdrs, body = tunnel(port, target, headers)
    c.close()
    return status, hdrs, body


def forward_get(port: int, url: str, headers: dict | None = None, host: str | None = None):
    """An absolute-form GET through the proxy: (status, headers, body)."""
    if host is None:
        host = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    r = ask(port, request_bytes("GET", url, {**(headers or {}), "Connection": "close"},
                                host=host))
    return r.status, r.headers, r.body


def seen_headers(echo_json: dict) -> dict:
    """The echo backend's headers, lower-cased names (last value wins)."""
    return {n.lower(): v for n, v in echo_json["headers"]}


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------
# CONNECT targets


class Recorder:
    """What a scripted target saw: bytes per connection, and whether it saw EOF."""

    def __init__(self):
        self.received: list[bytes] = []
        self.eof = threading.Event()


def echo_until_eof(conn: socket.socket) -> None:
    """Echo every byte until the client's FIN, then b"bye" and close."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.sendall(b"bye")


def server_first(rec: Recorder):
    """Speak first, half-close, then read everything the client sends until its EOF."""
    def handler(conn):
        conn.sendall(b"220 hello from the target\r\n")
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        rec.received.append(data)
        rec.eof.set()
    return handler


def watch_eof(rec: Recorder):
    """Read until EOF (or reset), noting it."""
    def handler(conn):
        data = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            rec.received.append(data)
            rec.eof.set()
    return handler


class Firehose:
    """A target that writes without end; `sent` counts what the kernel accepted."""

    def __init__(self):
        self.sent = 0

    def __call__(self, conn):
        chunk = b"\xa5" * 65536
        while True:
            conn.sendall(chunk)
            self.sent += len(chunk)


class Sink:
    """A target that reads nothing until `release` is set, then counts every byte up
    to the client's EOF."""

    def __init__(self):
        self.release = threading.Event()
        self.received = 0
        self.eof = threading.Event()

    def __call__(self, conn):
        self.release.wait(30)
        conn.settimeout(30)
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            self.received += len(data)
        self.eof.set()


class V6Echo:
    """echo_until_eof on [::1]."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.bind(("::1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    @staticmethod
    def _run(conn):
        try:
            echo_until_eof(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


class Blackhole:
    """A listening socket whose accept queue is full: connecting to it hangs (SYNs are
    dropped), which is how a connect timeout looks from the proxy."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except (BlockingIOError, OSError):
                pass
            self.fillers.append(s)
        time.sleep(0.1)

    def hangs(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", self.port))
            except (socket.timeout, TimeoutError):
                return True
            except OSError:
                return False
            return False

    def stop(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


# ---------------------------------------------------------------------------
# fixtures


class Env:
    """What the module's tests use, by name (started by the fixture's Lab)."""


LISTENERS = ("open", "ports", "nets", "deny", "allow", "auth", "off")

PROXY_CONFIG = """
[server]
access_log = "-"

{listens}

# open: CONNECT to any unprivileged port; Via on; also serves /local itself
[[vhost]]
server_name = "open.test"
listen = ["127.0.0.1:{open}"]
proxy_requests = true
allow_connect = ["1024-65535"]
proxy_via = "on"
  [[vhost.route]]
  path = "/local"
  url = "{own}/local"

# ports: the default allow_connect (443 and 563)
[[vhost]]
server_name = "ports.test"
listen = ["127.0.0.1:{ports}"]
proxy_requests = true

# nets: only 10.0.0.0/8 may use the proxy (the tests come from 127.0.0.1)
[[vhost]]
server_name = "nets.test"
listen = ["127.0.0.1:{nets}"]
proxy_requests = true
allow_connect = ["1024-65535"]
proxy_allow = ["10.0.0.0/8"]

# deny: target host patterns refused
[[vhost]]
server_name = "deny.test"
listen = ["127.0.0.1:{deny}"]
proxy_requests = true
allow_connect = ["1024-65535"]
connect_deny = ["*.blocked.test", "blocked.test", "::1"]

# allow: only these target host patterns
[[vhost]]
server_name = "allow.test"
listen = ["127.0.0.1:{allow}"]
proxy_requests = true
allow_connect = ["1024-65535"]
connect_allow = ["localhost"]

# auth: Basic proxy authentication
[[vhost]]
server_name = "auth.test"
listen = ["127.0.0.1:{auth}"]
proxy_requests = true
allow_connect = ["1024-65535", 443]
proxy_auth = {{ file = "htpasswd", realm = "{realm}" }}

# off: no forwarding at all
[[vhost]]
server_name = "off.test"
listen = ["127.0.0.1:{off}"]
  [[vhost.route]]
  path = "/"
  url = "{own}/"
"""

SLOW_CONFIG = """
[server]
access_log = "-"
timeout = 1
tunnel_timeout = 1

[[listen]]
address = "127.0.0.1"
port = {port}

[[vhost]]
server_name = "slow.test"
proxy_requests = true
allow_connect = ["1024-65535"]
"""

SITE_CONFIG = """
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {port}
tls = {{ cert = "site.pem", key = "site.key" }}

[[vhost]]
server_name = "localhost"
  [[vhost.route]]
  path = "/"
  url = "{echo}/"
"""


def write_htpasswd(path: Path) -> None:
    hashed = bcrypt.hashpw(USERS["alice"].encode(), bcrypt.gensalt()).decode()
    hashed = "$2y$" + hashed[4:]                # as `htpasswd -B` writes it
    sha = base64.b64encode(hashlib.sha1(USERS["bob"].encode()).digest()).decode()
    path.write_text(f"# test users\nalice:{hashed}\nbob:{{SHA}}{sha}\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("connect")
    with Lab(d) as lab:
        e = Env()
        e.dir = d
        e.pki = PKI(d).leaf("site", "localhost", "127.0.0.1")
        e.ca = e.pki.ca
        write_htpasswd(d / "htpasswd")

        e.origin, e.own, e.site_echo = lab.echos("origin", "own", "site")
        e.ws = lab.wsecho()
        e.target = lab.raw(echo_until_eof)
        e.sentinel = lab.raw(lambda conn: None)

        e.site = lab.proxy(lambda ports: SITE_CONFIG.format(port=ports[0], echo=e.site_echo.url),
                           name="site.toml")
        e.tls_port = e.site.port

        def proxy_config(ports):
            e.port = {name: ports[name] for name in LISTENERS}
            listens = "\n".join(f'[[listen]]\naddress = "127.0.0.1"\nport = {p}\n'
                                for p in e.port.values())
            return PROXY_CONFIG.format(listens=listens, own=e.own.url, realm=REALM, **e.port)
        e.proxy = lab.proxy(proxy_config, name="proxy.toml")
        yield e


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    with Lab(tmp_path_factory.mktemp("connect-slow")) as lab:
        yield lab.proxy(lambda ports: SLOW_CONFIG.format(port=ports[0]), name="slow.toml")


def assert_tunnel_echoes(c: HTTPClient, payload: bytes = ALL_BYTES) -> None:
    """Over a tunnel to echo_until_eof: payload comes back, then b"bye" after our FIN."""
    c.send(payload)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_to_eof() == payload + b"bye"


# ---------------------------------------------------------------------------
# tunnels


@needs_curl
def test_curl_https_through_connect(env):
    url = f"https://localhost:{env.tls_port}/through/the/tunnel?x=1"
    r = curl("-p", "-x", f"http://127.0.0.1:{env.port['open']}", "--cacert",
             str(env.dir / "ca.pem"), url)
    assert r.returncode == 0, r.stderr.decode()
    seen = json.loads(r.stdout)
    assert seen["server"] == "site"
    assert seen["target"] == "/through/the/tunnel?x=1"
    # the access log: the CONNECT with its status and its target
    target = f"localhost:{env.tls_port}"
    out = env.proxy.wait_for_access(f'"CONNECT {target} HTTP/1.1" 200')
    line = next(l for l in out.splitlines() if f'"CONNECT {target} HTTP/1.1" 200' in l)
    assert line.startswith("127.0.0.1 ")
    assert line.rstrip().endswith(target)


@needs_curl
def test_curl_https_through_connect_with_proxy_auth(env):
    r = curl("-p", "-x", f"http://127.0.0.1:{env.port['auth']}", "-U",
             f"alice:{USERS['alice']}", "--cacert", str(env.dir / "ca.pem"),
             f"https://localhost:{env.tls_port}/authed")
    assert r.returncode == 0, r.stderr.decode()
    seen = json.loads(r.stdout)
    assert seen["server"] == "site" and seen["target"] == "/authed"
    # the TLS site never sees the proxy's credentials (they are outside the tunnel)
    assert "proxy-authorization" not in seen_headers(seen)


def test_tunnel_carries_every_byte_value_and_half_close(env):
    c, status, hdrs, _ = tunnel(env.port["open"], f"127.0.0.1:{env.target.port}")
    try:
        assert status == 200
        assert header(hdrs, "content-length") is None
        assert header(hdrs, "transfer-encoding") is None
        payload = ALL_BYTES * 1024                    # 256 KiB: every byte value, often
        result = {}

        def send():
            try:
                c.sock.sendall(payload)
                c.sock.shutdown(socket.SHUT_WR)       # our FIN: the target sees EOF...
            except OSError as e:
                result["error"] = e
        t = threading.Thread(target=send)
        t.start()
        got = c.read_to_eof()                          # ...and can still answer
        t.join(10)
        assert "error" not in result
        assert len(got) == len(payload) + 3
        assert got == payload + b"bye"
    finally:
        c.close()


def test_bytes_sent_with_the_connect_head_go_first(env):
    # a client that does not wait for the 200: its bytes are tunnelled, in order
    c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{env.target.port}",
                             early=b"early\x00\xff")
    try:
        assert status == 200
        c.send(b"-late")
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == b"early\x00\xff-late" + b"bye"
    finally:
        c.close()


def test_early_bytes_and_fin_before_the_200(env):
    # CONNECT, the bytes and our FIN all at once (printf ... | nc -N): the FIN is part
    # of the byte stream, passed on as a half-close once the tunnel exists. The FIN is
    # made to arrive before the 200 for sure by a credential check that takes a while
    # (bcrypt, for a header value not seen before); without one it is a race.
    token = basic("alice", USERS["alice"]).split(" ", 1)[1]
    c = HTTPClient(env.port["auth"])
    try:
        c.send(connect_request(f"127.0.0.1:{env.target.port}",
                               {"Proxy-Authorization": "bASIC " + token})
               + b"early" + ALL_BYTES)
        c.sock.shutdown(socket.SHUT_WR)
        status = c.response("CONNECT").status
        assert status == 200
        assert c.read_to_eof() == b"early" + ALL_BYTES + b"bye"
    finally:
        c.close()


def test_connect_with_a_content_length(env):
    # a CONNECT has no content (RFC 9110 9.3.6): refused with 400, or what follows the
    # head is tunnel data; never an internal error, never a hang
    log_before = len(env.proxy.log())
    c = HTTPClient(env.port["open"], timeout=5)
    try:
        c.send(f"CONNECT 127.0.0.1:{env.target.port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{env.target.port}\r\nContent-Length: 3\r\n\r\nabc"
               .encode())
        status = c.response("CONNECT").status
        assert status in (200, 400)
        if status == 200:
            c.sock.shutdown(socket.SHUT_WR)
            assert c.read_to_eof() == b"abcbye"
    finally:
        c.close()
    time.sleep(0.2)
    log = env.proxy.log()[log_before:]
    assert "request handling failed" not in log
    assert "Traceback" not in log


def test_target_speaks_first_and_half_closes(env):
    rec = Recorder()
    target = RawBackend(server_first(rec))
    try:
        c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{target.port}")
        try:
            assert status == 200
            # the target's FIN reaches us; our direction stays open
            assert c.read_to_eof() == b"220 hello from the target\r\n"
            c.send(b"still talking \x00\x01")
            c.sock.shutdown(socket.SHUT_WR)
            assert rec.eof.wait(5)
            assert rec.received == [b"still talking \x00\x01"]
            # both directions done: the proxy closes the connection
            c.sock.settimeout(5)
            assert c.sock.recv(1) == b""
        finally:
            c.close()
    finally:
        target.stop()


def test_client_close_closes_the_target(env):
    rec = Recorder()
    target = RawBackend(watch_eof(rec))
    try:
        c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{target.port}")
        assert status == 200
        c.send(b"one")
        c.close()
        assert rec.eof.wait(5), "the target's connection stayed open"
        assert rec.received == [b"one"]
    finally:
        target.stop()


def test_target_close_closes_the_client(env):
    def say_and_close(conn):
        conn.sendall(b"gone")
        conn.close()
    target = RawBackend(say_and_close)
    try:
        c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{target.port}")
        try:
            assert status == 200
            c.sock.settimeout(5)
            assert c.read_to_eof() == b"gone"
        finally:
            c.close()
    finally:
        target.stop()


def test_websocket_through_connect(env):
    target = f"127.0.0.1:{env.ws.port}"
    c, status, _, _ = tunnel(env.port["open"], target)
    assert status == 200
    assert c.buf == b""
    sock = c.sock
    sock.settimeout(None)

    async def talk():
        async with ws_connect(f"ws://{target}/chat", sock=sock, open_timeout=5) as ws:
            await ws.send("hello through CONNECT")
            assert await ws.recv() == "hello through CONNECT"
            await ws.send(ALL_BYTES)
            assert await ws.recv() == ALL_BYTES
            big = ALL_BYTES * 4096                    # 1 MiB
            await ws.send(big)
            assert await ws.recv() == big
            await ws.ping()
    try:
        asyncio.run(asyncio.wait_for(talk(), 20))
    finally:
        sock.close()


def test_many_tunnels_at_once(env):
    errors = []

    def one(i):
        try:
            c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{env.target.port}")
            try:
                assert status == 200
                assert_tunnel_echoes(c, bytes([i]) * 10000 + ALL_BYTES)
            finally:
                c.close()
        except Exception as e:                       # noqa: BLE001 - reported below
            errors.append((i, repr(e)))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []


@pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback")
def test_connect_to_an_ipv6_literal(env):
    v6 = V6Echo()
    try:
        c, status, _, _ = tunnel(env.port["open"], f"[::1]:{v6.port}")
        try:
            assert status == 200
            assert_tunnel_echoes(c)
        finally:
            c.close()
        # connect_deny "::1" matches the bracketed literal
        status, _, _ = connect_status(env.port["deny"], f"[::1]:{v6.port}")
        assert status == 403
    finally:
        v6.stop()


def _stalls(counter) -> tuple[int, int]:
    """Sample a growing byte count after it had time to fill every buffer."""
    time.sleep(1.2)
    first = counter()
    time.sleep(0.8)
    second = counter()
    return first, second


def test_backpressure_target_to_client(env):
    hose = Firehose()
    target = RawBackend(hose)
    try:
        c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{target.port}")
        try:
            assert status == 200
            # we do not read: the proxy must stop reading from the target
            first, second = _stalls(lambda: hose.sent)
            assert second < 48 * MiB, f"{second} bytes taken from the target unread"
            assert second - first < 4 * MiB, "the target was still being read"
            # reading again resumes the flow
            got = 0
            c.sock.settimeout(5)
            while got < second + 8 * MiB:
                chunk = c.sock.recv(1 << 20)
                assert chunk
                got += len(chunk)
            assert hose.sent > second
        finally:
            c.close()
    finally:
        target.stop()


def test_backpressure_client_to_target(env):
    sink = Sink()
    target = RawBackend(sink)
    try:
        c, status, _, _ = tunnel(env.port["open"], f"127.0.0.1:{target.port}")
        try:
            assert status == 200
            sent = [0]
            errors = []
            stop = threading.Event()
            chunk = b"\x5a" * 65536
            c.sock.setblocking(False)

            def pump():
                while not stop.is_set():
                    _, w, _ = select.select([], [c.sock], [], 0.1)
                    if w:
                        try:
                            sent[0] += c.sock.send(chunk)
                        except BlockingIOError:
                            pass
                        except OSError as e:     # the tunnel broke: not backpressure
                            errors.append(e)
                            return
            t = threading.Thread(target=pump, daemon=True)
            t.start()
            try:
                first, second = _stalls(lambda: sent[0])
            finally:
                stop.set()
                t.join(5)
            assert not errors, errors
            assert second < 48 * MiB, f"{second} bytes taken from the client unread"
            assert second - first < 4 * MiB, "the client was still being read"
            # paused, not dropped: once the target reads, every byte taken arrives
            sink.release.set()
            c.sock.setblocking(True)
            c.sock.shutdown(socket.SHUT_WR)
            assert sink.eof.wait(30), "the client's EOF never reached the target"
            assert sink.received == sent[0], (sink.received, sent[0])
        finally:
            c.close()
    finally:
        sink.release.set()
        target.stop()


def test_idle_tunnel_is_closed_after_tunnel_timeout(env, slow):
    c, status, _, _ = tunnel(slow.port, f"127.0.0.1:{env.target.port}")
    try:
        assert status == 200
        c.send(b"ping")
        assert c.exact(4) == b"ping"
        started = time.monotonic()
        c.sock.settimeout(8)
        assert c.sock.recv(1) == b""                  # closed by the proxy
        assert time.monotonic() - started < 5
        slow.wait_for_log("tunnel idle")
    finally:
        c.close()


# ---------------------------------------------------------------------------
# malformed CONNECT requests


@pytest.mark.parametrize("target", ["localhost", "localhost:0", "localhost:99999",
                                    "localhost:http", ":8443"])
def test_connect_without_a_valid_port_is_400(env, target):
    status, _, _ = connect_status(env.port["open"], target)
    assert status == 400


# ---------------------------------------------------------------------------
# the gate


def test_port_not_in_allow_connect_is_403(env):
    before = env.target.accepted
    # default allow_connect: 443 and 563 only
    status, _, _ = connect_status(env.port["ports"], f"127.0.0.1:{env.target.port}")
    assert status == 403
    env.proxy.wait_for_log(f"port {env.target.port} is not in allow_connect")
    # a range: 1024-65535, so 80 is out
    status, _, _ = connect_status(env.port["open"], "127.0.0.1:80")
    assert status == 403
    env.proxy.wait_for_log("port 80 is not in allow_connect")
    assert env.target.accepted == before


def test_default_allow_connect_lets_443_through(env):
    # nothing (probably) listens on 127.0.0.1:443, but the gate lets it by
    status, _, _ = connect_status(env.port["ports"], "127.0.0.1:443")
    assert status != 403
    assert status in (200, 502, 503, 504)


def test_client_network_not_in_proxy_allow_is_403(env):
    before = env.target.accepted
    status, _, _ = connect_status(env.port["nets"], f"127.0.0.1:{env.target.port}")
    assert status == 403
    status, _, _ = forward_get(env.port["nets"], f"{env.origin.url}/nope")
    assert status == 403
    env.proxy.wait_for_log("client 127.0.0.1 is not in proxy_allow")
    assert env.target.accepted == before


def test_connect_deny_patterns(env):
    port = env.port["deny"]
    for target in ("www.blocked.test:8443", "WWW.Blocked.TEST:8443", "blocked.test:8443",
                   "a.b.blocked.test:8443"):
        status, _, _ = connect_status(port, target)
        assert status == 403, target
    env.proxy.wait_for_log("matches connect_deny")
    status, _, _ = forward_get(port, "http://www.blocked.test/x")
    assert status == 403
    # anything else goes through
    c, status, _, _ = tunnel(port, f"localhost:{env.target.port}")
    try:
        assert status == 200
        assert_tunnel_echoes(c)
    finally:
        c.close()


def test_connect_allow_patterns(env):
    port = env.port["allow"]
    before = env.target.accepted
    status, _, _ = connect_status(port, f"127.0.0.1:{env.target.port}")
    assert status == 403
    env.proxy.wait_for_log("matches no connect_allow pattern")
    assert env.target.accepted == before
    c, status, _, _ = tunnel(port, f"localhost:{env.target.port}")
    try:
        assert status == 200
        assert_tunnel_echoes(c)
    finally:
        c.close()
    # the same patterns for forwarded requests
    status, _, _ = forward_get(port, f"http://127.0.0.1:{env.origin.port}/x")
    assert status == 403
    status, _, body = forward_get(port, f"http://localhost:{env.origin.port}/x")
    assert status == 200
    assert json.loads(body)["server"] == "origin"


# ---------------------------------------------------------------------------
# proxy authentication


def assert_challenge(status, hdrs):
    assert status == 407
    assert header(hdrs, "proxy-authenticate") == f'Basic realm="{REALM}"'


@pytest.mark.parametrize("creds", [
    None,
    basic("alice", "wrong"),
    basic("bob", "wrong"),
    basic("carol", "whatever"),
    basic("alice", ""),
    "Bearer abcdef",
    "Basic !!!not-base64!!!",
    "Basic " + base64.b64encode(b"no-colon").decode(),
], ids=["missing", "wrong-bcrypt", "wrong-sha", "unknown-user", "empty-password",
        "bearer", "bad-base64", "no-colon"])
def test_connect_without_right_credentials_is_407(env, creds):
    before = env.target.accepted
    headers = {"Proxy-Authorization": creds} if creds else None
    status, hdrs, _ = connect_status(env.port["auth"], f"127.0.0.1:{env.target.port}",
                                     headers)
    assert_challenge(status, hdrs)
    assert env.target.accepted == before


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_connect_with_right_credentials(env, user):
    c, status, _, _ = tunnel(env.port["auth"], f"127.0.0.1:{env.target.port}",
                             {"Proxy-Authorization": basic(user, USERS[user])})
    try:
        assert status == 200
        assert_tunnel_echoes(c)
    finally:
        c.close()


def test_connect_retried_with_credentials_on_the_same_connection(env):
    # what curl does after a 407: the same connection, a new CONNECT with credentials
    target = f"127.0.0.1:{env.target.port}"
    c = HTTPClient(env.port["auth"])
    try:
        c.send(connect_request(target, {"Proxy-Authorization": basic("alice", "nope")}))
        r = c.response("CONNECT")
        assert_challenge(r.status, r.headers)
        if r.header("Connection") == "close":
            pytest.fail("the connection was closed after a 407")
        c.send(connect_request(target, {"Proxy-Authorization":
                                        basic("alice", USERS["alice"])}))
        status = c.response("CONNECT").status
        assert status == 200
        assert_tunnel_echoes(c)
    finally:
        c.close()


def test_early_bytes_wait_for_a_slow_credential_check(env):
    # a scheme spelled differently is a new header value: bcrypt runs (off the reactor
    # thread) while the tunnelled bytes that came with the head wait for the 200
    token = basic("alice", USERS["alice"]).split(" ", 1)[1]
    c, status, _, _ = tunnel(env.port["auth"], f"127.0.0.1:{env.target.port}",
                             {"Proxy-Authorization": "bAsIc " + token},
                             early=ALL_BYTES)
    try:
        assert status == 200
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == ALL_BYTES + b"bye"
    finally:
        c.close()


def test_forward_get_needs_credentials(env):
    url = f"{env.origin.url}/authed"
    status, hdrs, _ = forward_get(env.port["auth"], url)
    assert_challenge(status, hdrs)
    status, hdrs, _ = forward_get(env.port["auth"], url,
                                  {"Proxy-Authorization": basic("bob", "wrong")})
    assert_challenge(status, hdrs)
    for user in USERS:
        status, _, body = forward_get(env.port["auth"], url,
                                      {"Proxy-Authorization": basic(user, USERS[user])})
        assert status == 200, user
        seen = json.loads(body)
        assert seen["server"] == "origin"
        assert seen["target"] == "/authed"
        # the credentials were for the proxy: never passed on to the origin
        assert "proxy-authorization" not in seen_headers(seen)


def test_forward_post_body_survives_a_slow_credential_check(env):
    token = basic("alice", USERS["alice"]).split(" ", 1)[1]
    body = ALL_BYTES * 400
    with HTTPClient(env.port["auth"]) as c:
        c.send((f"POST {env.origin.url}/upload HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{env.origin.port}\r\n"
                f"Proxy-Authorization: BASIC {token}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode())
        time.sleep(0.05)                       # the body arrives while bcrypt runs
        c.send(body)
        r = c.response()
    assert r.status == 200
    seen = json.loads(r.body)
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "proxy-authorization" not in seen_headers(seen)


@needs_curl
def test_curl_forward_get_with_proxy_user(env):
    r = curl("-x", f"http://127.0.0.1:{env.port['auth']}", "-U", f"bob:{USERS['bob']}",
             f"{env.origin.url}/curl-authed")
    assert r.returncode == 0, r.stderr.decode()
    seen = json.loads(r.stdout)
    assert seen["target"] == "/curl-authed"
    assert "proxy-authorization" not in seen_headers(seen)
    r = curl("-x", f"http://127.0.0.1:{env.port['auth']}", "-o", "/dev/null",
             "-w", "%{http_code}", f"{env.origin.url}/curl-authed")
    assert r.stdout == b"407"


# ---------------------------------------------------------------------------
# unreachable targets


def test_unresolvable_target_is_502(env):
    status, _, _ = connect_status(env.port["open"], "nothing-here.invalid:8443")
    assert status == 502
    env.proxy.wait_for_log("cannot resolve nothing-here.invalid")


def test_refused_target_is_503(env):
    port = free_port()
    status, _, _ = connect_status(env.port["open"], f"127.0.0.1:{port}")
    assert status == 503
    env.proxy.wait_for_log(f"CONNECT 127.0.0.1:{port}: connection refused -> 503")


def test_connection_goes_on_after_a_failed_connect(env):
    c = HTTPClient(env.port["open"])
    try:
        c.send(connect_request(f"127.0.0.1:{free_port()}"))
        r = c.response("CONNECT")
        assert r.status == 503
        assert r.header("Connection") != "close"
        c.send(connect_request(f"127.0.0.1:{env.target.port}"))
        status = c.response("CONNECT").status
        assert status == 200
        assert_tunnel_echoes(c)
    finally:
        c.close()


def test_connect_timeout_is_504(slow):
    hole = Blackhole()
    try:
        if not hole.hangs():
            pytest.skip("a full accept queue does not make connects hang here")
        started = time.monotonic()
        status, _, _ = connect_status(slow.port, f"127.0.0.1:{hole.port}")
        assert status == 504
        assert time.monotonic() - started < 5
        slow.wait_for_log(f"CONNECT 127.0.0.1:{hole.port}: connect timed out -> 504")
    finally:
        hole.stop()


def test_forward_get_to_unreachable_origins(env):
    status, _, _ = forward_get(env.port["open"], "http://nothing-here.invalid/x")
    assert status == 503                     # no such name: the connect failed
    env.proxy.wait_for_line("backend http://nothing-here.invalid: DNS lookup failed", "-> 503")
    dead = free_port()
    status, _, _ = forward_get(env.port["open"], f"http://127.0.0.1:{dead}/x")
    assert status == 503                     # refused
    env.proxy.wait_for_line(f"backend http://127.0.0.1:{dead}: connection refused -> 503")


# ---------------------------------------------------------------------------
# forwarding off


def test_forwarding_off_connect_is_405(env):
    before = env.target.accepted
    status, hdrs, _ = connect_status(env.port["off"], f"127.0.0.1:{env.target.port}")
    assert status == 405
    assert header(hdrs, "allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    assert env.target.accepted == before


def test_forwarding_off_absolute_form_is_served_by_the_vhost(env):
    before = env.sentinel.accepted
    for url, path in (("http://elsewhere.test/x?y=1", "/x?y=1"),
                      (f"http://127.0.0.1:{env.sentinel.port}/z", "/z")):
        status, _, body = forward_get(env.port["off"], url)
        assert status == 200, url
        seen = json.loads(body)
        assert seen["server"] == "own", url
        assert seen["target"] == path
    time.sleep(0.2)
    assert env.sentinel.accepted == before, "an absolute-form request left the vhost"


# ---------------------------------------------------------------------------
# forward proxy


@needs_curl
def test_curl_forward_get(env):
    r = curl("-x", f"http://127.0.0.1:{env.port['open']}", "-D", str(env.dir / "fwd.head"),
             "-H", "Proxy-Connection: keep-alive", "-H", "Proxy-Authorization: Basic eDp5",
             "-H", "Connection: X-Hop", "-H", "X-Hop: secret", "-H", "X-Kept: yes",
             f"{env.origin.url}/fwd/path?q=1")
    assert r.returncode == 0, r.stderr.decode()
    seen = json.loads(r.stdout)
    h = seen_headers(seen)
    assert seen["server"] == "origin"
    assert seen["method"] == "GET"
    assert seen["target"] == "/fwd/path?q=1"              # origin-form to the origin
    assert h["host"] == f"127.0.0.1:{env.origin.port}"
    assert h["x-kept"] == "yes"
    for gone in ("proxy-connection", "proxy-authorization", "x-hop"):
        assert gone not in h, gone
    assert h["via"] == "1.1 open.test"
    assert not any(n.startswith("x-forwarded-") for n in h)
    head = (env.dir / "fwd.head").read_text().lower()
    assert "\nvia: 1.1 open.test" in head


def test_forward_get_by_name_keeps_the_authority_as_host(env):
    status, _, body = forward_get(env.port["open"],
                                  f"http://localhost:{env.origin.port}/named",
                                  host="ignored.example")
    assert status == 200
    seen = json.loads(body)
    assert seen["server"] == "origin"
    assert seen["target"] == "/named"
    # the absolute-form authority overrides the Host header (RFC 9112 3.2.2)
    assert seen_headers(seen)["host"] == f"localhost:{env.origin.port}"


def test_forward_post_with_body(env):
    body = ALL_BYTES * 100
    with HTTPClient(env.port["open"]) as c:
        c.send((f"POST {env.origin.url}/post HTTP/1.1\r\nHost: 127.0.0.1:{env.origin.port}"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
               + body)
        r = c.response()
    assert r.status == 200
    seen = json.loads(r.body)
    assert seen["method"] == "POST" and seen["target"] == "/post"
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_forward_gets_to_two_origins_on_one_connection(env):
    with HTTPClient(env.port["open"]) as c:
        for echo, path in ((env.origin, "/first"), (env.own, "/second"),
                           (env.origin, "/third")):
            c.send((f"GET {echo.url}{path} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}"
                    "\r\n\r\n").encode())
            r = c.response()
            assert r.status == 200, path
            seen = json.loads(r.body)
            assert seen["server"] == echo.name, path
            assert seen["target"] == path


def test_forward_absolute_form_without_a_path(env):
    for url, path in ((env.origin.url, "/"), (f"{env.origin.url}?x=1", "/?x=1")):
        status, _, body = forward_get(env.port["open"], url)
        assert status == 200, url
        assert json.loads(body)["target"] == path, url


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_forward_max_forwards_zero_is_answered_by_the_proxy(env, method):
    with HTTPClient(env.port["open"]) as c:
        c.send((f"{method} {env.origin.url}/mf HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{env.origin.port}\r\nMax-Forwards: 0\r\n"
                "Connection: close\r\n\r\n").encode())
        r = c.response()
    assert r.status == 200
    # the proxy's own answer, not the origin's JSON
    assert r.header("Content-Type") != "application/json", r.body[:200]
    if method == "TRACE":
        assert r.header("Content-Type") == "message/http"
        assert r.body.startswith(f"TRACE {env.origin.url}/mf HTTP/1.1\r\n".encode())
    else:
        assert r.header("Allow") == "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_forward_max_forwards_is_decremented(env, method):
    with HTTPClient(env.port["open"]) as c:
        c.send((f"{method} {env.origin.url}/mf HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{env.origin.port}\r\nMax-Forwards: 3\r\n"
                "Connection: close\r\n\r\n").encode())
        r = c.response()
    assert r.status == 200
    seen = json.loads(r.body)
    assert seen["server"] == "origin"
    assert seen_headers(seen)["max-forwards"] == "2"


def test_absolute_form_for_a_name_of_the_listener_is_served_locally(env):
    status, _, body = forward_get(env.port["open"], "http://open.test/local/x")
    assert status == 200
    seen = json.loads(body)
    assert seen["server"] == "own"
    assert seen["target"] == "/local/x"

"""WebSocket tunnel end to end: Upgrade kept on ws:// / wss:// routes and on http://
routes with `upgrade`, the backend's 101 relayed and both connections turned into one
byte tunnel (bytes past the handshake first, backpressure both ways, half-close, either
side's close closing the other, tunnel_timeout, graceful stop), non-101 answers and
routes that do not allow the upgrade staying HTTP, TLS on either side, balancers with
stickiness.

Real processes on loopback: the proxy runs as `python -m twistproxy.cli run FILE`; the
WebSocket backend is `python -m twistproxy.wsecho` (autobahn on Twisted, echo); scripted
backends (one that streams without end, one that half-closes, a wss:// one, one that
answers 426) are RawBackend threads speaking RFC 6455 by hand. Clients are the
`websockets` library (asyncio, run with asyncio.run in the test), an autobahn client
run as a subprocess, and raw sockets when the bytes themselves are the point.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import clients
from clients import PKI
from harness import ROOT, Echo, Lab, Proxy, basic_config, free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HOST = "proxy.test"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MiB = 1 << 20
RSS_LIMIT_KIB = 64 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


# ---------------------------------------------------------------------------
# processes


@pytest.fixture
def lab(tmp_path):
    """Everything started in a test, stopped at its end (last first)."""
    with Lab(tmp_path) as lab:
        yield lab


def route(url: str, path: str = "/", **params) -> str:
    extra = "".join(f"{k} = {json.dumps(v) if isinstance(v, str) else v}\n"
                    for k, v in params.items())
    return f'[[vhost.route]]\npath = "{path}"\nurl = "{url}"\n{extra}\n'


def start_proxy(lab: Lab, routes: str, server: str = "", extra: str = "",
                name: str = "proxy.toml") -> Proxy:
    return lab.proxy(lambda ports: basic_config(routes, ports[0], extra=extra, server=server),
                     name=name)


def run(coro, timeout: float = 60):
    """Run one asyncio scenario (the test process has no Twisted reactor)."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def connect(url: str, **kw):
    kw.setdefault("max_size", None)
    kw.setdefault("compression", None)       # frames go as sent: no permessage-deflate
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 5)
    kw.setdefault("proxy", None)
    return ws_connect(url, **kw)


def wait_access_count(proxy: Proxy, n: int, status: int = 101) -> list[str]:
    """The access log's lines for `status` answers, once there are at least `n`."""
    return proxy.wait_for_access_lines(n, f'" {status} ')


# ---------------------------------------------------------------------------
# RFC 6455 by hand


def xor(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes = b"", fin: bool = True, masked: bool = False) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mbit | 127]) + n.to_bytes(8, "big")
    if masked:
        key = os.urandom(4)
        return head + key + xor(payload, key)
    return head + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


def headers_named(head: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            out.append(v.strip())
    return out


class Stream(clients.Stream):
    """clients.Stream that reads WebSocket frames too."""

    def frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self.exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self.exact(2), "big")
        elif n == 127:
            n = int.from_bytes(self.exact(8), "big")
        key = self.exact(4) if b1 & 0x80 else None
        payload = self.exact(n)
        return bool(b0 & 0x80), b0 & 0x0F, xor(payload, key) if key else payload


def upgrade_request(path: str = "/", key: bytes | None = None, extra: bytes = b"",
                    host: str = HOST) -> tuple[bytes, bytes]:
    key = key or base64.b64encode(os.urandom(16))
    return (b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
            % (path.encode(), host.encode(), key, extra)), key


def raw_client(port: int, path: str = "/", after: bytes = b"", rcvbuf: int | None = None,
               timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> tuple[Stream, bytes]:
    """A raw client through its handshake: `after` goes in the same send() as the head."""
    s = clients.connect(port, timeout=timeout, rcvbuf=rcvbuf)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="127.0.0.1")
    req, key = upgrade_request(path)
    s.sendall(req + after)
    st = Stream(s)
    head = st.head()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert header(head, b"sec-websocket-accept") == accept_for(key), head
    assert (header(head, b"upgrade") or b"").lower() == b"websocket", head
    return st, head


def accept_ws(conn, after: bytes = b"", extra: bytes = b"") -> tuple[Stream, bytes]:
    """Backend side of the handshake: `after` goes in the same send() as the 101."""
    st = Stream(conn)
    head = st.head()
    key = header(head, b"sec-websocket-key")
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n%s"
                 % (accept_for(key), extra, after))
    return st, head


class RawWsEcho:
    """A RawBackend echoing every frame as it came (fragmentation kept), answering
    pings, and answering a close with the same code and reason (recorded)."""

    def __init__(self, lab, tls_ctx: ssl.SSLContext | None = None, first: bytes = b"",
                 extra: bytes = b""):
        self.tls_ctx = tls_ctx
        self.first = first
        self.extra = extra
        self.heads: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.raw = lab.raw(self._serve)
        self.port = self.raw.port

    def _serve(self, conn) -> None:
        conn.settimeout(30)
        if self.tls_ctx is not None:
            conn = self.tls_ctx.wrap_socket(conn, server_side=True)
        st, head = accept_ws(conn, self.first, self.extra)
        with self.lock:
            self.heads.append(head)
        while True:
            fin, op, payload = st.frame()
            if op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if payload else 1005
                with self.lock:
                    self.closes.append((code, payload[2:].decode()))
                conn.sendall(frame(OP_CLOSE, payload))
                return
            if op == OP_PING:
                conn.sendall(frame(OP_PONG, payload))
            elif op != OP_PONG:
                conn.sendall(frame(op, payload, fin=fin))


def text_of(n: int) -> str:
    """n characters mixing 1-, 2-, 3- and 4-byte UTF-8."""
    unit = "aé€😀 websocket "
    return (unit * (n // len(unit) + 1))[:n]


# ---------------------------------------------------------------------------
# messages through a real backend


def test_text_and_binary_messages_from_0_bytes_to_16_mib(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 65537, MiB, 16 * MiB]

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/chat") as ws:
            assert ws.response.status_code == 101
            assert ws.response.headers["Upgrade"].lower() == "websocket"
            for n in sizes:
                data = os.urandom(n)
                await ws.send(data)
                back = await ws.recv()
                assert isinstance(back, bytes) and len(back) == n and back == data, n
                text = text_of(n)
                await ws.send(text)
                back = await ws.recv()
                assert isinstance(back, str) and back == text, n
    run(scenario())
    line = wait_access_count(proxy, 1)[0]
    assert '"GET /chat HTTP/1.1" 101' in line and line.endswith(echo.url), line
    # 16 MiB messages go through without the proxy holding one
    assert proxy.peak_rss_kib() < RSS_LIMIT_KIB, proxy.peak_rss_kib()


def test_fragmented_messages_both_ways(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            # client -> backend: fragmented text and binary (autobahn reassembles)
            await ws.send(["frag-one ", "frag-two ", "", "frag-three ☃"])
            assert await ws.recv() == "frag-one frag-two frag-three ☃"
            parts = [os.urandom(70000), b"", os.urandom(1), os.urandom(200000)]
            await ws.send(parts)
            assert await ws.recv() == b"".join(parts)
            # backend -> client: wsecho sends in 64 KiB fragments, which arrive as such
            data = os.urandom(200000)
            await ws.send(data)
            frags = [f async for f in ws.recv_streaming()]
            assert b"".join(frags) == data
            assert [len(f) for f in frags] == [65536, 65536, 65536, 200000 - 3 * 65536]
    run(scenario())


def test_ping_pong_both_ways(lab):
    echo = lab.wsecho()

    def pinging_backend(conn):
        conn.settimeout(10)
        st, _ = accept_ws(conn)
        conn.sendall(frame(OP_PING, b"backend ping \x00\xff"))
        fin, op, payload = st.frame()
        conn.sendall(frame(OP_BINARY, b"got %d %s" % (op, payload)))
        st.frame()                       # the client's close
        conn.sendall(frame(OP_CLOSE, close_payload(1000)))

    pinger = lab.raw(pinging_backend)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{pinger.port}/", "/pinger")
                        + route(echo.url + "/"))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            for payload in (b"", b"client ping", os.urandom(125)):
                waiter = await ws.ping(payload)
                await asyncio.wait_for(waiter, 5)       # autobahn's pong, same payload
            await ws.send("still a normal message")
            assert await ws.recv() == "still a normal message"
        async with connect(f"ws://127.0.0.1:{proxy.port}/pinger") as ws:
            # websockets answers the backend's ping on its own
            reply = await asyncio.wait_for(ws.recv(), 5)
            assert reply == b"got 10 backend ping \x00\xff"
    run(scenario())


def test_close_code_and_reason_pass_both_ways(lab):
    backend = RawWsEcho(lab)
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/", "/raw")
                        + route(echo.url + "/"))

    async def scenario():
        # client -> backend: the backend sees the client's code and reason, and its
        # answer (the same code and reason) reaches the client
        async with connect(f"ws://127.0.0.1:{proxy.port}/raw") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.close(4000, "client says bye ☃")
            rcvd = ws.protocol.close_rcvd
            assert rcvd is not None
            assert (rcvd.code, rcvd.reason) == (4000, "client says bye ☃")
        # backend -> client: wsecho closes with 4001 "asked to close"
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            await ws.send(b"__close_me__")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "asked to close")
            assert info.value.rcvd_then_sent is True      # the backend closed first
    run(scenario())
    assert backend.closes == [(4000, "client says bye ☃")]


def test_wsecho_answers_a_close_with_the_same_code_and_reason(lab):
    """wsecho's own contract ("a close is answered with the same code and reason"),
    directly and through the proxy."""
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))

    async def close_with(url):
        async with connect(url) as ws:
            await ws.close(4000, "bye")
            return ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason

    async def scenario():
        direct = await close_with(f"ws://127.0.0.1:{echo.port}/")
        proxied = await close_with(f"ws://127.0.0.1:{proxy.port}/")
        return direct, proxied
    direct, proxied = run(scenario())
    assert proxied == direct, "the proxy changed the close the backend sent"
    assert direct == (4000, "bye"), f"wsecho answered a close (4000, 'bye') with {direct}"


AUTOBAHN_CLIENT = r'''
import hashlib, json, sys
from twisted.internet import reactor
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS

URL = sys.argv[1]
BIG = bytes(range(256)) * 16384          # 4 MiB
out = {"messages": [], "pongs": [], "close": None}


class Client(WebSocketClientProtocol):
    asked = False

    def onOpen(self):
        self.sendMessage("héllo wörld €😀".encode(), isBinary=False)
        self.sendMessage(bytes(range(256)), isBinary=True)
        self.sendMessage(b"", isBinary=True)
        self.beginMessage(isBinary=False)
        for part in (b"frag-one ", b"frag-two ", b"frag-three"):
            self.sendMessageFrame(part)
        self.endMessage()
        self.sendMessage(BIG, isBinary=True)
        self.sendPing(b"are you there")

    def onPong(self, payload):
        out["pongs"].append(payload.decode())
        self.maybe_done()

    def onMessage(self, payload, isBinary):
        out["messages"].append([isBinary, len(payload), hashlib.sha256(payload).hexdigest()])
        self.maybe_done()

    def maybe_done(self):
        if len(out["messages"]) == 5 and out["pongs"] and not self.asked:
            self.asked = True
            self.sendMessage(b"__close_me__", isBinary=False)

    def onClose(self, wasClean, code, reason):
        out["close"] = [wasClean, code, reason]
        if reactor.running:
            reactor.stop()


factory = WebSocketClientFactory(URL)
factory.protocol = Client
factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
connectWS(factory)
reactor.callLater(30, reactor.stop)
reactor.run()
print(json.dumps(out))
'''


def test_autobahn_client(lab, tmp_path):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))
    script = tmp_path / "autobahn_client.py"
    script.write_text(AUTOBAHN_CLIENT)
    done = subprocess.run([sys.executable, str(script), f"ws://127.0.0.1:{proxy.port}/ab"],
                          capture_output=True, timeout=40, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])

    def digest(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()
    big = bytes(range(256)) * 16384
    assert out["messages"] == [
        [False, len("héllo wörld €😀".encode()), digest("héllo wörld €😀".encode())],
        [True, 256, digest(bytes(range(256)))],
        [True, 0, digest(b"")],
        [False, 28, digest(b"frag-one frag-two frag-three")],
        [True, len(big), digest(big)],
    ]
    assert out["pongs"] == ["are you there"]
    assert out["close"] == [True, 4001, "asked to close"]


# ---------------------------------------------------------------------------
# the tunnel itself: bytes as they are, bytes past the handshake, endings


def test_browser_style_connection_header_and_upgrade_token_case(lab):
    """Firefox sends `Connection: keep-alive, Upgrade`; tokens are case-insensitive."""
    backend = RawWsEcho(lab)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    key = base64.b64encode(os.urandom(16))
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(b"GET /ff HTTP/1.1\r\nHost: proxy.test\r\nConnection: keep-alive, Upgrade\r\n"
              b"Upgrade: WebSocket\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
              b"Origin: http://proxy.test\r\n\r\n" % key)
    st = Stream(s)
    head = st.head()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert header(head, b"sec-websocket-accept") == accept_for(key)
    st.sendall(frame(OP_TEXT, b"hello from a browser", masked=True))
    assert st.frame() == (True, OP_TEXT, b"hello from a browser")
    st.sendall(frame(OP_CLOSE, close_payload(1001, "page closed"), masked=True))
    assert st.frame() == (True, OP_CLOSE, close_payload(1001, "page closed"))
    assert st.until_eof() == b""
    s.close()
    h = backend.heads[0]
    assert (header(h, b"upgrade") or b"").lower() == b"websocket", h
    assert header(h, b"origin") == b"http://proxy.test", h
    assert backend.closes == [(1001, "page closed")]



@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-both-sides"])
def test_bytes_past_the_handshake_on_both_sides_go_first_and_unchanged(lab, pki, tls):
    seen: dict = {}
    # not even WebSocket: the tunnel must not look at what it carries
    client_bytes = frame(OP_TEXT, b"first frame from the client", masked=True) + \
        frame(OP_TEXT, b"frag ", fin=False, masked=True) + \
        frame(OP_CONT, b"ment", masked=True) + b"\x00\x01 not a frame at all \xff" * 50
    backend_first = frame(OP_TEXT, b"first frame from the backend")
    bctx = pki.server_context("backend") if tls else None

    def handler(conn):
        conn.settimeout(10)
        if bctx is not None:
            conn = bctx.wrap_socket(conn, server_side=True)
        st, head = accept_ws(conn, after=backend_first)      # 101 + a frame, one send()
        seen["head"] = head
        got = st.exact(len(client_bytes))
        seen["got"] = got
        conn.sendall(b"echo:" + got)
        seen["eof"] = st.until_eof()

    backend = lab.raw(handler)
    if tls:
        plain, port = free_port(), free_port()
        routes = route(f"wss://127.0.0.1:{backend.port}/", ca_file="ca.pem")
        lab.add(Proxy(tls_config(plain, port, routes), pki.dir, name="tls-early.toml"))
    else:
        port = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/")).port
    st, head = raw_client(port, "/early", after=client_bytes,    # head + bytes, one send()
                          tls=pki.client_context() if tls else None)
    assert st.exact(len(backend_first)) == backend_first
    assert st.exact(5 + len(client_bytes)) == b"echo:" + client_bytes
    st.sock.close()
    deadline = time.monotonic() + 5
    while "eof" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen["got"] == client_bytes
    assert seen.get("eof") == b"", "the client's close did not reach the backend"
    # the forwarded handshake kept what the upgrade needs
    h = seen["head"]
    assert h.startswith(b"GET /early HTTP/1.1\r\n"), h
    assert (header(h, b"upgrade") or b"").lower() == b"websocket", h
    assert any(b"upgrade" in v.lower() for v in headers_named(h, b"connection")), h


def test_first_backend_frame_sent_with_the_101_reaches_a_real_client(lab):
    backend = RawWsEcho(lab, first=frame(OP_TEXT, "welcome ☃".encode()))
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "welcome ☃"
            await ws.send(b"\x00" * 1000)
            assert await ws.recv() == b"\x00" * 1000
    run(scenario())


def test_client_half_close_is_passed_on(lab):
    """The client's FIN reaches the backend as EOF; what the backend sends afterwards
    still reaches the client, then the backend's close ends the client's connection."""
    seen: dict = {}

    def handler(conn):
        conn.settimeout(10)
        st, _ = accept_ws(conn)
        data = st.until_eof()            # until the client's FIN comes through
        seen["got"] = data
        seen["eof_at"] = time.monotonic()
        conn.sendall(frame(OP_TEXT, b"got %d bytes" % len(data)))
        time.sleep(0.2)
        conn.sendall(frame(OP_TEXT, b"and still talking"))

    backend = lab.raw(handler)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    st, _ = raw_client(proxy.port)
    sent = frame(OP_TEXT, b"last words", masked=True) + frame(OP_BINARY, os.urandom(100000),
                                                              masked=True)
    st.sendall(sent)
    st.sock.shutdown(socket.SHUT_WR)
    assert st.frame() == (True, OP_TEXT, b"got %d bytes" % len(sent))
    assert st.frame() == (True, OP_TEXT, b"and still talking")
    assert st.until_eof() == b""         # the backend's close closes the client
    assert seen["got"] == sent


def test_backend_half_close_is_passed_on(lab):
    """The backend's FIN reaches the client as EOF; the client can still send, and its
    bytes reach the backend."""
    seen: dict = {}

    def handler(conn):
        conn.settimeout(10)
        st, _ = accept_ws(conn)
        conn.sendall(frame(OP_TEXT, b"backend done sending"))
        conn.shutdown(socket.SHUT_WR)
        seen["got"] = st.until_eof()

    backend = lab.raw(handler)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    st, _ = raw_client(proxy.port)
    assert st.frame() == (True, OP_TEXT, b"backend done sending")
    assert st.until_eof() == b"", "the backend's FIN did not reach the client"
    after = frame(OP_TEXT, b"client still talking", masked=True) + \
        frame(OP_BINARY, os.urandom(300000), masked=True)
    time.sleep(0.2)
    st.sendall(after)
    st.sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 5
    while "got" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen.get("got") == after
    st.sock.close()


def test_client_reset_closes_the_backend(lab):
    seen: dict = {}

    def handler(conn):
        conn.settimeout(10)
        st, _ = accept_ws(conn)
        seen["got"] = st.until_eof()
        seen["eof_at"] = time.monotonic()

    backend = lab.raw(handler)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    st, _ = raw_client(proxy.port)
    st.sendall(frame(OP_TEXT, b"x", masked=True))
    time.sleep(0.2)
    st.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    st.sock.close()                      # RST
    reset_at = time.monotonic()
    deadline = reset_at + 5
    while "eof_at" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "eof_at" in seen, "the backend connection stayed open after the client's reset"
    assert seen["eof_at"] - reset_at < 2


def test_backend_dying_closes_the_client(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            echo.kill()
            killed = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert time.monotonic() - killed < 3
            assert info.value.rcvd is None         # no close frame: the TCP connection ended
        # the next upgrade finds no backend: an HTTP error, not a hang
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{proxy.port}/"):
                pass
        assert info.value.response.status_code == 503
    run(scenario())


# ---------------------------------------------------------------------------
# not upgraded: the connection stays HTTP


@pytest.mark.parametrize("status", [426, 200])
@pytest.mark.parametrize("pipelined", [False, True], ids=["then", "pipelined"])
def test_non_101_answer_is_relayed_and_the_connection_stays_http(lab, status,
                                                                 pipelined):
    heads: list[bytes] = []

    def handler(conn):
        conn.settimeout(10)
        st = Stream(conn)
        while True:
            try:
                head = st.head()
            except EOFError:
                return
            heads.append(head)
            if header(head, b"upgrade"):
                body = b"no upgrade for you"
                conn.sendall(b"HTTP/1.1 %d %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Content-Length: %d\r\nX-Answer: upgrade\r\n\r\n%s"
                             % (status, b"Upgrade Required" if status == 426 else b"OK",
                                len(body), body))
            else:
                body = b"plain answer to " + head.split(b" ")[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    backend = lab.raw(handler)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    req, _ = upgrade_request("/ws")
    follow = b"GET /next HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    st = Stream(s)
    s.sendall(req + follow if pipelined else req)
    r = st.response()
    assert r.status == status and r.body == b"no upgrade for you", r
    assert r.header("X-Answer") == "upgrade"
    if not pipelined:
        s.sendall(follow)
    r = st.response()
    assert (r.status, r.body) == (200, b"plain answer to /next"), r
    s.close()
    assert heads[0].startswith(b"GET /ws HTTP/1.1") and header(heads[0], b"upgrade")
    assert heads[-1].startswith(b"GET /next HTTP/1.1") and not header(heads[-1], b"upgrade")

    async def scenario():
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"ws://127.0.0.1:{proxy.port}/ws"):
                pass
        assert info.value.response.status_code == status
        assert info.value.response.body == b"no upgrade for you"
    run(scenario())


def test_101_for_another_protocol_is_a_502(lab):
    def handler(conn):
        conn.settimeout(10)
        st = Stream(conn)
        st.head()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        st.until_eof()

    backend = lab.raw(handler)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))

    async def scenario():
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{proxy.port}/")
        assert info.value.response.status_code == 502
    run(scenario())
    proxy.wait_for_log("101 for 'h2c'")


@pytest.mark.parametrize("url_scheme,params,asked", [
    ("http", {}, b"websocket"),                       # plain http:// route
    ("http", {"upgrade": "h2c"}, b"websocket"),        # allows another protocol only
    ("ws", {}, b"h2c"),                                # ws:// allows WebSocket only
], ids=["http-no-upgrade", "http-upgrade-h2c", "ws-asked-h2c"])
def test_upgrade_on_a_route_that_does_not_allow_it_is_dropped(lab, url_scheme,
                                                               params, asked):
    echo = Echo("plain")
    lab.add(echo)
    proxy = start_proxy(lab, route(f"{url_scheme}://127.0.0.1:{echo.port}/", **params))
    key = base64.b64encode(os.urandom(16))
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    st = Stream(s)
    s.sendall(b"GET /plain HTTP/1.1\r\nHost: proxy.test\r\nConnection: keep-alive, Upgrade\r\n"
              b"Upgrade: %s\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
              % (asked, key))
    r = st.response()
    assert r.status == 200, r
    seen = r.echo
    names = {n.lower(): v for n, v in seen["headers"]}
    assert "upgrade" not in names, seen["headers"]
    assert "upgrade" not in names.get("connection", "").lower(), seen["headers"]
    assert seen["target"] == "/plain"
    assert not r.header("Upgrade")
    # still HTTP on the same connection
    s.sendall(b"GET /again HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    r = st.response()
    assert r.status == 200 and r.echo["target"] == "/again", r
    s.close()


@pytest.mark.parametrize("url_scheme,params", [
    ("ws", {}),
    ("http", {"upgrade": "websocket"}),
    ("http", {"upgrade": "WebSocket, h2c"}),
    ("http", {"upgrade": "*"}),
], ids=["ws", "http-upgrade-websocket", "http-upgrade-list", "http-upgrade-any"])
def test_upgrade_forwarded_with_its_headers(lab, url_scheme, params):
    backend = RawWsEcho(lab, extra=b"Sec-WebSocket-Protocol: chat.v2\r\nX-Backend: raw\r\n")
    proxy = start_proxy(lab, route(f"{url_scheme}://127.0.0.1:{backend.port}/back/",
                                   "/chat/", **params))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/chat/room?x=1",
                           subprotocols=["chat.v1", "chat.v2"],
                           additional_headers={"X-Custom": "kept"}) as ws:
            assert ws.subprotocol == "chat.v2"
            assert ws.response.headers["X-Backend"] == "raw"
            await ws.send("through")
            assert await ws.recv() == "through"
            return ws.request.headers["Sec-WebSocket-Key"]
    key = run(scenario())
    h = backend.heads[0]
    assert h.startswith(b"GET /back/room?x=1 HTTP/1.1\r\n"), h
    assert (header(h, b"upgrade") or b"").lower() == b"websocket", h
    assert any(b"upgrade" in v.lower() for v in headers_named(h, b"connection")), h
    assert header(h, b"sec-websocket-key") == key.encode(), h
    assert header(h, b"sec-websocket-version") == b"13", h
    assert header(h, b"sec-websocket-protocol") == b"chat.v1, chat.v2", h
    assert header(h, b"x-custom") == b"kept", h
    assert header(h, b"x-forwarded-for") == b"127.0.0.1", h


# ---------------------------------------------------------------------------
# many at once, and memory


def test_tunnels_count_against_max(lab):
    """A tunnel holds its backend connection: with max = 1 a second upgrade waits
    (then 503 after acquire), and once the tunnel closes the slot is free again."""
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/", max=1, acquire=1))

    async def scenario():
        first = await connect(f"ws://127.0.0.1:{proxy.port}/1")
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{proxy.port}/2")
        assert info.value.response.status_code == 503
        await first.send("still mine")
        assert await first.recv() == "still mine"
        await first.close()
        await asyncio.sleep(0.3)
        async with connect(f"ws://127.0.0.1:{proxy.port}/3") as ws:
            await ws.send("free again")
            assert await ws.recv() == "free again"
    run(scenario())


def test_200_concurrent_connections(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))
    n_conns, n_msgs = 200, 10
    peak = [0]

    async def one(i, opened, exchanged):
        async with connect(f"ws://127.0.0.1:{proxy.port}/c{i}", open_timeout=30) as ws:
            await opened.wait()                     # all 200 open at the same time
            for j in range(n_msgs):
                msg = f"{i}:{j}:" + "x" * (j * 997)
                await ws.send(msg)
                assert await ws.recv() == msg
                data = os.urandom(j * 3001)
                await ws.send(data)
                assert await ws.recv() == data
            await exchanged.wait()
            return i

    async def scenario():
        opened = asyncio.Barrier(n_conns + 1)
        exchanged = asyncio.Barrier(n_conns + 1)
        tasks = [asyncio.create_task(one(i, opened, exchanged)) for i in range(n_conns)]
        await opened.wait()
        await exchanged.wait()
        peak[0] = proxy.rss_kib()
        return sorted(await asyncio.gather(*tasks))
    assert run(scenario(), timeout=60) == list(range(n_conns))
    lines = wait_access_count(proxy, n_conns)
    assert len(lines) == n_conns
    assert peak[0] < RSS_LIMIT_KIB and proxy.peak_rss_kib() < RSS_LIMIT_KIB, \
        (peak[0], proxy.peak_rss_kib())


def slow_reader(lab, make_proxy, total: int, tls: ssl.SSLContext | None = None) -> None:
    """The backend streams without end; the client stops reading: the backend is held
    back (it can only fill the sockets' buffers), then the client reads `total` bytes
    in bursts, and the proxy's memory stays under 64 MiB throughout; the client's close
    then stops the backend. make_proxy(backend_port) -> (proxy, port to connect to)."""
    state = {"sent": 0}
    block = frame(OP_BINARY, b"\x5a" * 65536)

    def streamer(conn):
        accept_ws(conn)
        try:
            while state["sent"] < 2 * total:
                conn.sendall(block)
                state["sent"] += len(block)
        finally:
            state["ended"] = time.monotonic()

    backend = lab.raw(streamer)
    proxy, port = make_proxy(backend.port)
    st, _ = raw_client(port, rcvbuf=65536, timeout=20, tls=tls)
    rss = [proxy.rss_kib()]
    stalled_at = settle(lambda: state["sent"])
    rss.append(proxy.rss_kib())
    time.sleep(1.0)
    rss.append(proxy.rss_kib())
    assert state["sent"] - stalled_at < MiB, "the backend was not held back"
    assert state["sent"] < 48 * MiB, state["sent"]
    # now read, in bursts with pauses between them
    buf = bytearray(1 << 20)
    got = len(st.buf)
    st.buf.clear()
    next_sample = 0
    while got < total:
        n = st.sock.recv_into(buf)
        assert n, "the tunnel closed"
        got += n
        if got >= next_sample:
            rss.append(proxy.rss_kib())
            next_sample += 8 * MiB
            if (next_sample // (8 * MiB)) % 4 == 0:
                time.sleep(0.2)                      # stop reading again for a while
    assert state["sent"] >= total - MiB
    assert max(rss) < RSS_LIMIT_KIB, max(rss)
    assert proxy.peak_rss_kib() < RSS_LIMIT_KIB, proxy.peak_rss_kib()
    st.sock.close()
    deadline = time.monotonic() + 5
    while "ended" not in state and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ended" in state, "the backend kept streaming after the client closed"


def settle(get, quiet: float = 0.5, limit: float = 5.0):
    """The value of get() once it has not changed for `quiet` seconds (or at `limit`)."""
    last, since = get(), time.monotonic()
    deadline = since + limit
    while time.monotonic() < deadline:
        time.sleep(0.1)
        value = get()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def test_client_that_stops_reading_keeps_proxy_memory_bounded(lab):
    """>= 200 MiB pushed by the backend through a client that reads in bursts."""
    def make_proxy(backend_port):
        proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend_port}/"))
        return proxy, proxy.port
    slow_reader(lab, make_proxy, 250 * MiB)


def test_backend_that_stops_reading_keeps_proxy_memory_bounded(lab):
    """The other way: the client sends without end, the backend reads nothing for a
    while (the client is held back), then reads 100 MiB; memory stays bounded."""
    state = {"got": 0}
    go = threading.Event()
    total = 100 * MiB

    def slow_backend(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        st, _ = accept_ws(conn)
        go.wait(20)
        state["got"] = len(st.buf)
        while state["got"] < total:
            data = conn.recv(1 << 20)
            if not data:
                break
            state["got"] += len(data)
        state["done"] = True

    backend = lab.raw(slow_backend)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{backend.port}/"))
    st, _ = raw_client(proxy.port, timeout=20)
    progress = {"sent": 0}
    block = frame(OP_BINARY, b"\xa5" * 65536, masked=True)

    def sender():
        try:
            while progress["sent"] < total:
                st.sock.sendall(block)
                progress["sent"] += len(block)
        except OSError as e:
            progress["error"] = e

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    rss = []
    held = settle(lambda: progress["sent"])
    rss.append(proxy.rss_kib())
    time.sleep(1.0)
    rss.append(proxy.rss_kib())
    assert progress["sent"] - held < MiB, "the client was not held back"
    assert progress["sent"] < 48 * MiB, progress["sent"]
    go.set()
    while t.is_alive():
        rss.append(proxy.rss_kib())
        t.join(0.1)
    assert "error" not in progress, progress
    deadline = time.monotonic() + 10
    while "done" not in state and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["got"] >= total
    assert max(rss) < RSS_LIMIT_KIB and proxy.peak_rss_kib() < RSS_LIMIT_KIB, \
        (max(rss), proxy.peak_rss_kib())
    st.sock.close()


# ---------------------------------------------------------------------------
# timeouts and shutdown


def test_idle_tunnel_closed_after_tunnel_timeout_active_one_kept(lab):
    echo = lab.wsecho()

    def ticker(conn):
        conn.settimeout(10)
        accept_ws(conn)
        for i in range(12):                   # backend -> client only, every 0.25 s
            conn.sendall(frame(OP_TEXT, b"tick %d" % i))
            time.sleep(0.25)
        time.sleep(0.5)

    tick = lab.raw(ticker)
    proxy = start_proxy(lab, route(f"ws://127.0.0.1:{tick.port}/", "/tick")
                        + route(echo.url + "/"), server="tunnel_timeout = 1\ntimeout = 30")

    async def idle():
        async with connect(f"ws://127.0.0.1:{proxy.port}/idle") as ws:
            await ws.send("once")
            assert await ws.recv() == "once"
            quiet_from = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 8)
            return time.monotonic() - quiet_from

    async def chatty():
        async with connect(f"ws://127.0.0.1:{proxy.port}/chatty") as ws:
            for i in range(10):                 # both ways, every 0.3 s for 3 s
                await ws.send(f"m{i}")
                assert await ws.recv() == f"m{i}"
                await asyncio.sleep(0.3)
            return True

    async def one_way():
        async with connect(f"ws://127.0.0.1:{proxy.port}/tick") as ws:
            got = [await asyncio.wait_for(ws.recv(), 3) for _ in range(12)]
            return got

    async def scenario():
        return await asyncio.gather(idle(), chatty(), one_way())
    idle_for, chatty_ok, ticks = run(scenario())
    assert 0.8 <= idle_for <= 4.0, idle_for
    assert chatty_ok
    assert ticks == [f"tick {i}" for i in range(12)]
    proxy.wait_for_log("tunnel idle for 1s")


def test_tunnel_not_cut_by_request_timeouts(lab):
    """Request, keep-alive and header timeouts do not apply to a tunnel; tunnel_timeout
    does not apply to a plain request."""
    echo = lab.wsecho()
    plain = Echo("plain")
    lab.add(plain)
    proxy = start_proxy(lab, route(plain.url + "/", "/plain/")
                        + route(echo.url + "/"),
                        server="timeout = 1\nkeepalive_timeout = 1\nheader_timeout = 1\n")

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            await asyncio.sleep(2.5)            # 2.5 x timeout, keepalive and header
            await ws.send("still open")
            assert await asyncio.wait_for(ws.recv(), 5) == "still open"
    run(scenario())

    proxy2 = start_proxy(lab, route(plain.url + "/"),
                         server="tunnel_timeout = 0.5\ntimeout = 10", name="proxy2.toml")
    s = socket.create_connection(("127.0.0.1", proxy2.port), timeout=10)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\nX-Echo-Delay: 1.5\r\n\r\n")
    r = Stream(s).response()
    assert r.status == 200, r
    s.close()


def test_graceful_stop_waits_for_tunnels_then_closes_them(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))

    async def scenario():
        a = await connect(f"ws://127.0.0.1:{proxy.port}/a")
        b = await connect(f"ws://127.0.0.1:{proxy.port}/b")
        proxy.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        await asyncio.sleep(1.5)
        for ws in (a, b):                        # open tunnels keep working meanwhile
            await ws.send("during the grace period")
            assert await asyncio.wait_for(ws.recv(), 3) == "during the grace period"
        with pytest.raises(OSError):
            await connect(f"ws://127.0.0.1:{proxy.port}/new")
        await a.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(b.recv(), 15)
        closed_after = time.monotonic() - t0
        while proxy.proc.poll() is None and time.monotonic() - t0 < 17:
            await asyncio.sleep(0.05)
        return closed_after, time.monotonic() - t0
    closed_after, exited_after = run(scenario(), timeout=30)
    assert proxy.proc.poll() is not None, "the proxy did not exit"
    assert 8.0 <= closed_after <= 14.0, closed_after
    assert exited_after <= 15.0, exited_after


def test_graceful_stop_exits_as_soon_as_the_last_tunnel_closes(lab):
    echo = lab.wsecho()
    proxy = start_proxy(lab, route(echo.url + "/"))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/") as ws:
            proxy.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            await ws.send("bye")
            assert await ws.recv() == "bye"
            await ws.send(b"__close_me__")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        t = time.monotonic()
        while proxy.proc.poll() is None and time.monotonic() - t < 10:
            await asyncio.sleep(0.05)
        return time.monotonic() - t
    assert run(scenario()) < 3.0
    assert proxy.proc.returncode == 0


# ---------------------------------------------------------------------------
# TLS on either side


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("wspki")) \
        .leaf("site", "127.0.0.1", "localhost", HOST).leaf("backend", "127.0.0.1", "localhost")


def tls_config(plain_port: int, tls_port: int, routes: str) -> str:
    return f"""
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {plain_port}

[[listen]]
address = "127.0.0.1"
port = {tls_port}
tls = {{ cert = "site.pem", key = "site.key" }}

[[vhost]]
server_name = "{HOST}"
{routes}
"""


def test_wss_client_through_a_tls_listener(lab, pki):
    echo = lab.wsecho()
    plain, tls = free_port(), free_port()
    doomed = lab.wsecho()
    proxy = Proxy(tls_config(plain, tls, route(doomed.url + "/", "/doomed")
                             + route(echo.url + "/")), pki.dir, name="tls1.toml")
    lab.add(proxy)

    async def scenario():
        async with connect(f"wss://127.0.0.1:{tls}/doomed", ssl=pki.client_context()) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            doomed.kill()                        # the backend dies: the client sees it
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        async with connect(f"wss://127.0.0.1:{tls}/secure", ssl=pki.client_context()) as ws:
            for n in (0, 5, 70000, 4 * MiB):
                data = os.urandom(n)
                await ws.send(data)
                assert await ws.recv() == data
            await ws.send(text_of(1000))
            assert await ws.recv() == text_of(1000)
            waiter = await ws.ping(b"over tls")
            await asyncio.wait_for(waiter, 5)
            await ws.send(b"__close_me__")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "asked to close")
    run(scenario())
    line = wait_access_count(proxy, 2)[1]
    assert '"GET /secure HTTP/1.1" 101' in line, line


def test_wss_client_that_stops_reading_keeps_proxy_memory_bounded(lab, pki):
    """The slow reader again, through a TLS listener: 100 MiB."""
    def make_proxy(backend_port):
        plain, tls = free_port(), free_port()
        proxy = Proxy(tls_config(plain, tls, route(f"ws://127.0.0.1:{backend_port}/")),
                      pki.dir, name="tls-slow.toml")
        lab.add(proxy)
        return proxy, tls
    slow_reader(lab, make_proxy, 100 * MiB, tls=pki.client_context())


def test_wss_client_through_a_sticky_balancer(lab, pki):
    m1, m2 = lab.wsecho(), lab.wsecho()
    plain, tls = free_port(), free_port()
    config = tls_config(plain, tls, route("balancer://ws/")) + \
        BALANCER.format(scheme="ws", p1=m1.port, p2=m2.port, params="")
    proxy = Proxy(config, pki.dir, name="tls-balancer.toml")
    lab.add(proxy)

    async def scenario():
        for i in range(4):
            async with connect(f"wss://127.0.0.1:{tls}/t{i}", ssl=pki.client_context(),
                               additional_headers={"Cookie": "ROUTEID=abc.m2"}) as ws:
                data = os.urandom(100000)
                await ws.send(data)
                assert await ws.recv() == data
    run(scenario())
    lines = wait_access_count(proxy, 4)
    assert [ln.rsplit(" ", 1)[1] for ln in lines] == \
        [f"balancer://ws|ws://127.0.0.1:{m2.port}|m2"] * 4


def test_wss_backend(lab, pki):
    backend = RawWsEcho(lab, tls_ctx=pki.server_context("backend"))
    plain, tls = free_port(), free_port()
    routes = route(f"wss://127.0.0.1:{backend.port}/", ca_file="ca.pem")
    proxy = Proxy(tls_config(plain, tls, routes), pki.dir, name="tls2.toml")
    lab.add(proxy)

    async def scenario():
        for url, kw in ((f"ws://127.0.0.1:{plain}/", {}),
                        (f"wss://127.0.0.1:{tls}/", {"ssl": pki.client_context()})):
            async with connect(url, **kw) as ws:
                await ws.send("hello wss backend")
                assert await ws.recv() == "hello wss backend"
                data = os.urandom(MiB)
                await ws.send(data)
                assert await ws.recv() == data
                await ws.close(4010, "done over tls")
                rcvd = ws.protocol.close_rcvd
                assert (rcvd.code, rcvd.reason) == (4010, "done over tls")
    run(scenario())
    assert backend.closes == [(4010, "done over tls")] * 2
    assert all(h.startswith(b"GET / HTTP/1.1") for h in backend.heads)


# ---------------------------------------------------------------------------
# balancers with stickiness


BALANCER = """
[balancer.ws]
stickysession = "ROUTEID"
sticky_cookie = {{ name = "ROUTEID", path = "/" }}

  [[balancer.ws.member]]
  url = "{scheme}://127.0.0.1:{p1}"
  route = "m1"
  {params}

  [[balancer.ws.member]]
  url = "{scheme}://127.0.0.1:{p2}"
  route = "m2"
  {params}
"""


@pytest.mark.parametrize("scheme,params", [("ws", ""), ("http", 'upgrade = "websocket"')],
                         ids=["ws-members", "http-members-upgrade"])
def test_balancer_with_sticky_sessions(lab, scheme, params):
    m1, m2 = lab.wsecho(), lab.wsecho()
    proxy = start_proxy(lab, route("balancer://ws/"),
                        extra=BALANCER.format(scheme=scheme, p1=m1.port, p2=m2.port,
                                              params=params))

    async def talk(path, cookie=None):
        headers = {"Cookie": cookie} if cookie else None
        async with connect(f"ws://127.0.0.1:{proxy.port}{path}",
                           additional_headers=headers) as ws:
            await ws.send(path)
            assert await ws.recv() == path

    async def scenario():
        for i in range(5):
            await talk(f"/s2-{i}", "ROUTEID=.m2")
        for i in range(5):
            await talk(f"/s1-{i}", "other=1; ROUTEID=session42.m1")
        for i in range(4):
            await talk(f"/free-{i}")
    run(scenario())
    lines = wait_access_count(proxy, 14)

    def member_of(path):
        line = next(ln for ln in lines if f"GET {path} " in ln)
        return line.rsplit(" ", 1)[1]
    name1 = f"balancer://ws|{scheme}://127.0.0.1:{m1.port}|m1"
    name2 = f"balancer://ws|{scheme}://127.0.0.1:{m2.port}|m2"
    assert [member_of(f"/s2-{i}") for i in range(5)] == [name2] * 5
    assert [member_of(f"/s1-{i}") for i in range(5)] == [name1] * 5
    assert {member_of(f"/free-{i}") for i in range(4)} == {name1, name2}


def test_balancer_sticky_member_down_fails_over(lab):
    m1, m2 = lab.wsecho(), lab.wsecho()
    proxy = start_proxy(lab, route("balancer://ws/"),
                        extra=BALANCER.format(scheme="ws", p1=m1.port, p2=m2.port,
                                              params=""))
    m2.kill()

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/sticky",
                           additional_headers={"Cookie": "ROUTEID=.m2"}) as ws:
            await ws.send("where am I")
            assert await ws.recv() == "where am I"
    run(scenario())
    line = wait_access_count(proxy, 1)[0]
    assert line.endswith(f"balancer://ws|ws://127.0.0.1:{m1.port}|m1"), line


def test_balancer_new_session_gets_the_sticky_cookie_with_the_101(lab):
    """A WebSocket that names no route is given one like any response (sticky_cookie:
    "when the proxy picks a member with a route for a request that named none ... it
    sets NAME=.ROUTE"; RFC 6455 4.1: cookies in the handshake response are processed),
    and a client that keeps it stays on that member."""
    m1, m2 = lab.wsecho(), lab.wsecho()
    proxy = start_proxy(lab, route("balancer://ws/"),
                        extra=BALANCER.format(scheme="ws", p1=m1.port, p2=m2.port,
                                              params=""))

    async def scenario():
        async with connect(f"ws://127.0.0.1:{proxy.port}/new") as ws:
            cookies = ws.response.headers.get_all("Set-Cookie")
            await ws.send("hi")
            assert await ws.recv() == "hi"
        return cookies
    cookies = run(scenario())
    line = wait_access_count(proxy, 1)[0]
    route_id = line.rsplit("|", 1)[1]
    assert cookies == [f"ROUTEID=.{route_id}; Path=/"], cookies


def test_bybusyness_counts_open_tunnels(lab):
    """An open tunnel keeps its member busy (as in Apache, where the request lasts as
    long as the tunnel): with one tunnel open on m1, new ones go to m2."""
    m1, m2 = lab.wsecho(), lab.wsecho()
    proxy = start_proxy(lab, route("balancer://ws/"),
                        extra=BALANCER.format(scheme="ws", p1=m1.port, p2=m2.port,
                                              params="").replace(
                            'stickysession = "ROUTEID"', 'lbmethod = "bybusyness"'))

    async def scenario():
        a = await connect(f"ws://127.0.0.1:{proxy.port}/a")         # m1 (tie: first)
        b = await connect(f"ws://127.0.0.1:{proxy.port}/b")         # m2 (m1 busy)
        await b.close()
        await asyncio.sleep(0.3)
        c = await connect(f"ws://127.0.0.1:{proxy.port}/c")         # m2 again: m1 busy
        for ws in (a, c):
            await ws.close()
    run(scenario())
    lines = wait_access_count(proxy, 3)

    def member_of(path):
        return next(ln for ln in lines if f"GET {path} " in ln).rsplit("|", 1)[1]
    assert (member_of("/a"), member_of("/b")) == ("m1", "m2")
    assert member_of("/c") == "m2", "the open tunnel on m1 was not counted as busy"

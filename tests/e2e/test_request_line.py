"""Request lines end to end: what a client may put before, in and around the request
target, and what reaches the backend. Host values and absolute-form authorities pass one
check (Apache's HttpProtocolOptions Strict: reg-name, dotted-quad IPv4, bracketed IPv6,
an all-digit port); HTTP/1.0 and HTTP/1.1 are served and other versions refused (505,
400 for HTTP/0.9 and garbage); one empty line may precede a request line; an unknown
method is 501 while WebDAV's extension methods are proxied; a %2F in a path follows
allow_encoded_slashes (off: 404, on: a "/", nodecode: kept); TE is not forwarded.

Real processes on loopback: the proxy runs as `python -m twistproxy.cli run FILE` with
a reverse vhost per allow_encoded_slashes mode, and a second listener whose vhost is a
forward proxy; the backend is a RawBackend thread that records every request head it is
sent, so "not forwarded" is checked on what the backend saw. Clients are raw sockets
(for bytes no library sends), http.client and curl.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass

import pytest

from clients import HTTPClient, Response
from harness import Lab, Proxy, RawBackend

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# ---------------------------------------------------------------------------
# the backend: records each request head, answers with what it saw


class Recorder:
    def __init__(self):
        self.heads: list[bytes] = []
        self.lock = threading.Lock()
        self.raw = RawBackend(self.serve)
        self.port = self.raw.port

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            with self.lock:
                self.heads.append(head)
            method, target, version = lines[0].decode("latin-1").split(" ")
            seen = json.dumps({
                "method": method, "target": target, "version": version,
                "headers": [l.decode("latin-1").split(": ", 1) for l in lines[1:]],
                "body": body.decode("latin-1"),
            }).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(seen), seen))

    def saw(self, text: str) -> bool:
        """Whether any request the backend was sent contains `text` (a test's marker)."""
        with self.lock:
            return any(text.encode("latin-1") in h for h in self.heads)


# one reverse vhost per allow_encoded_slashes mode, each with a /a/b route (to see how
# /a%2Fb is routed) before its catch-all; then the forward proxy on its own listener
VHOST = """
[[vhost]]
server_name = "{name}"
listen = ["127.0.0.1:{port}"]
{setting}
  [[vhost.route]]
  path = "/a/b"
  url = "http://127.0.0.1:{backend}/AB"
  [[vhost.route]]
  path = "/"
  url = "http://127.0.0.1:{backend}/"
"""

CONFIG = """
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {port}

[[listen]]
address = "127.0.0.1"
port = {fwd_port}
{vhosts}
[[vhost]]
server_name = "forward.test"
listen = ["127.0.0.1:{fwd_port}"]
proxy_requests = true
allow_connect = ["1-65535"]
"""


def config(port: int, fwd_port: int, backend: int) -> str:
    vhosts = "".join(VHOST.format(name=name, setting=setting, port=port, backend=backend)
                     for name, setting in (("proxy.test", ""),     # the default: off
                                           ("on.test", 'allow_encoded_slashes = "on"'),
                                           ("nodecode.test",
                                            'allow_encoded_slashes = "nodecode"')))
    return CONFIG.format(port=port, fwd_port=fwd_port, vhosts=vhosts)


@dataclass
class Env:
    proxy: Proxy
    port: int
    fwd_port: int
    backend: Recorder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Lab(tmp_path_factory.mktemp("request-line")) as lab:
        backend = Recorder()
        lab.add(backend.raw)
        proxy = lab.proxy(lambda ports: config(ports[0], ports["fwd"], backend.port))
        yield Env(proxy, proxy.port, proxy.ports["fwd"], backend)


# ---------------------------------------------------------------------------
# a raw client


def exchange(port: int, data: bytes) -> tuple[Response, bool]:
    """Send raw bytes; the first response and whether the proxy then closes."""
    with HTTPClient(port) as c:
        c.send(data)
        r = c.response()
        return r, r.header("Connection") == "close" and c.closes()


def marker() -> str:
    """A path segment no other request uses, to look for in what the backend saw."""
    return "m" + uuid.uuid4().hex[:12]


def refused(env: Env, status: int, line: str, *headers: str, mark: str,
            port: int | None = None) -> None:
    """Send a request; it is answered `status` by the proxy and never forwarded; the
    connection is closed unless the request was well formed (a 404 keeps it)."""
    data = "\r\n".join([line, *headers, "", ""]).encode("latin-1")
    r, closed = exchange(port or env.port, data)
    assert r.status == status, r
    assert closed is (status != 404)
    assert not env.backend.saw(mark)


# ---------------------------------------------------------------------------
# Host and the absolute-form authority: one check


NOT_AUTHORITIES = [
    "0177.0.0.1",            # octal
    "0x7f.0.0.1",            # hex
    "0x7f000001",
    "127.1",                 # fewer than four parts
    "2130706433",            # a bare number
    "01.2.3.4",              # a leading zero
    "256.1.1.1",             # not an octet
    "1.2.3.4.5",
    "proxy.test:80x",        # junk after the port
    "proxy.test:",           # an empty port
    "proxy.test:0",
    "proxy.test:65536",
    "proxy.test::80",        # doubled colons
    "::1",                   # unbracketed IPv6
    "[::1]x",
    "[fe80::1%25eth0]",      # a zone
    "proxy..test",
]


@pytest.mark.parametrize("host", NOT_AUTHORITIES)
def test_malformed_host_header_is_400_never_forwarded(env, host):
    mark = marker()
    refused(env, 400, f"GET /{mark} HTTP/1.1", f"Host: {host}", mark=mark)


@pytest.mark.parametrize("authority", NOT_AUTHORITIES)
def test_malformed_absolute_form_authority_is_400_never_forwarded(env, authority):
    mark = marker()
    refused(env, 400, f"GET http://{authority}/{mark} HTTP/1.1", "Host: proxy.test",
            mark=mark)


@pytest.mark.parametrize("host", ["proxy.test", "PROXY.test:80", "proxy.test.", "127.0.0.1",
                                  "127.0.0.1:8080", "[::1]", "[::1]:80", "under_score.test"])
def test_well_formed_hosts_are_served_in_host_and_absolute_form(env, host):
    mark = marker()
    for line, hdr in ((f"GET /{mark}/h HTTP/1.1", f"Host: {host}"),
                      (f"GET http://{host}/{mark}/a HTTP/1.1", "Host: proxy.test")):
        r, _ = exchange(env.port, f"{line}\r\n{hdr}\r\n\r\n".encode())
        assert r.status == 200, (line, hdr, r)
        seen = dict(r.json()["headers"])
        assert seen["X-Forwarded-Host"] == host      # the authority stands for Host
    assert env.backend.saw(f"/{mark}/h") and env.backend.saw(f"/{mark}/a")


@pytest.mark.parametrize("host_line", ["Host:", "Host:   ", "Host: \t"])
def test_empty_host_beside_an_absolute_form_target_is_400(env, host_line):
    mark = marker()
    refused(env, 400, f"GET http://proxy.test/{mark} HTTP/1.1", host_line, mark=mark)


def test_empty_host_with_an_origin_form_target_is_served(env):
    # RFC 9112 §3.2: an empty Host is what a client sends when there is no authority
    mark = marker()
    r, _ = exchange(env.port, f"GET /{mark} HTTP/1.1\r\nHost:\r\n\r\n".encode())
    assert r.status == 200
    assert env.backend.saw(mark)


@pytest.mark.parametrize("authority", ["0177.0.0.1", "127.1", "2130706433", "0x7f.1"])
def test_forward_proxy_refuses_numeric_aliases_of_an_address(env, authority):
    # a resolver would take these for 127.0.0.1, past any connect_deny host pattern
    mark = marker()
    url = f"http://{authority}:{env.backend.port}/{mark}"
    refused(env, 400, f"GET {url} HTTP/1.1", f"Host: {authority}:{env.backend.port}",
            mark=mark, port=env.fwd_port)


def test_forward_proxy_serves_the_dotted_quad(env):
    mark = marker()
    hostport = f"127.0.0.1:{env.backend.port}"
    r, _ = exchange(env.fwd_port, f"GET http://{hostport}/{mark} HTTP/1.1\r\n"
                                  f"Host: {hostport}\r\n\r\n".encode())
    assert r.status == 200
    assert r.json()["target"] == f"/{mark}"


@pytest.mark.parametrize("target", ["0177.0.0.1:{port}", "127.1:{port}", "localhost:{port}x",
                                    "[::1]x:{port}"])
def test_connect_to_a_malformed_target_is_400(env, target):
    target = target.format(port=env.backend.port)
    before = env.backend.raw.accepted
    r, closed = exchange(env.fwd_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
                         .encode())
    assert r.status == 400 and closed
    assert env.backend.raw.accepted == before


# ---------------------------------------------------------------------------
# versions


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_http_1_0_and_1_1_are_served_as_http_1_1(env, version):
    mark = marker()
    r, _ = exchange(env.port, f"GET /{mark} {version}\r\nHost: proxy.test\r\n\r\n".encode())
    assert r.status == 200
    assert r.json()["version"] == "HTTP/1.1"


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/1.2", "HTTP/9.9"])
def test_other_versions_are_505_never_forwarded(env, version):
    mark = marker()
    refused(env, 505, f"GET /{mark} {version}", "Host: proxy.test", mark=mark)


def test_http_0_9_is_400_never_forwarded(env):
    mark = marker()
    refused(env, 400, f"GET /{mark} HTTP/0.9", "Host: proxy.test", mark=mark)


def test_request_line_without_a_version_is_400_never_forwarded(env):
    # HTTP/0.9's form; forwarding it would make it an HTTP/1.1 request
    mark = marker()
    refused(env, 400, f"GET /{mark}", mark=mark)


@pytest.mark.parametrize("version", ["HTTP/1.10", "http/1.1", "HTTP/1", "HTTP/10.0",
                                     "HTTPS/1.1", "RTSP/1.0", "RTSP/2.0"])
def test_garbage_versions_are_refused_never_forwarded(env, version):
    mark = marker()
    data = f"GET /{mark} {version}\r\nHost: proxy.test\r\n\r\n".encode()
    r, closed = exchange(env.port, data)
    assert r.status in (400, 505) and closed, r
    assert r.status == (505 if version == "RTSP/2.0" else 400)
    assert not env.backend.saw(mark)


def test_ice_source_request_is_400_never_forwarded(env):
    mark = marker()
    refused(env, 400, f"SOURCE /{mark} ICE/1.0", "Host: proxy.test", mark=mark)


# ---------------------------------------------------------------------------
# what comes before the request line


def test_one_empty_line_before_the_request_line_is_ignored(env):
    mark = marker()
    r, _ = exchange(env.port, f"\r\nGET /{mark} HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
                    .encode())
    assert r.status == 200
    assert env.backend.saw(mark)


def test_one_empty_line_between_keepalive_requests_is_ignored(env):
    mark = marker()
    with HTTPClient(env.port) as c:
        for n in range(3):
            c.send(f"\r\nGET /{mark}/{n} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
            assert c.response().status == 200
    assert env.backend.saw(f"/{mark}/2")


def test_an_empty_line_split_across_packets_is_still_one(env):
    mark = marker()
    with HTTPClient(env.port) as c:
        c.send(b"\r")
        c.send(f"\nGET /{mark} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        assert c.response().status == 200


@pytest.mark.parametrize("before", ["\r\n\r\n", "\r\n\r\n\r\n", "\n", "\n\n", "\r", "\r\r\n",
                                    "\r\n\n"])
def test_more_than_one_empty_line_or_a_lone_cr_or_lf_is_400(env, before):
    mark = marker()
    data = f"{before}GET /{mark} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode()
    r, closed = exchange(env.port, data)
    assert r.status == 400 and closed
    assert not env.backend.saw(mark)


def test_two_empty_lines_after_a_keepalive_request_are_400(env):
    mark = marker()
    with HTTPClient(env.port) as c:
        c.send(f"GET /{mark}/1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        assert c.response().status == 200
        c.send(b"\r\n")                          # on its own: may be the one allowed
        c.send(f"\r\nGET /{mark}/2 HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        r = c.response()
        assert r.status == 400 and c.closes()
    assert not env.backend.saw(f"/{mark}/2")


@pytest.mark.parametrize("data", [
    "GET /{mark} HTTP/1.1\rHost: proxy.test\r\n\r\n",
    "GET /{mark} HTTP/1.1\r\nHost: proxy.test\rX-A: 1\r\n\r\n",
])
def test_a_lone_cr_as_a_line_end_is_400(env, data):
    mark = marker()
    r, closed = exchange(env.port, data.format(mark=mark).encode())
    assert r.status == 400 and closed
    assert not env.backend.saw(mark)


# ---------------------------------------------------------------------------
# methods


@pytest.mark.parametrize("method", ["FOO", "BREW", "get", "GETX", "PROPFINDX", "PLAY",
                                    "DESCRIBE", "SETUP", "TEARDOWN"])
def test_unknown_method_token_is_501_never_forwarded(env, method):
    mark = marker()
    refused(env, 501, f"{method} /{mark} HTTP/1.1", "Host: proxy.test", mark=mark)


@pytest.mark.parametrize("line", ["G\x01T /{mark} HTTP/1.1", " GET /{mark} HTTP/1.1",
                                  "GET\t/{mark} HTTP/1.1", "G(T /{mark} HTTP/1.1"])
def test_a_method_that_is_not_a_token_is_400(env, line):
    mark = marker()
    refused(env, 400, line.format(mark=mark), "Host: proxy.test", mark=mark)


PROPFIND_BODY = ('<?xml version="1.0" encoding="utf-8"?>'
                 '<propfind xmlns="DAV:"><prop><getetag/></prop></propfind>')
WEBDAV = [
    ("PROPFIND", {"Depth": "1", "Content-Type": "application/xml"}, PROPFIND_BODY),
    ("PROPPATCH", {"Content-Type": "application/xml"}, '<propertyupdate xmlns="DAV:"/>'),
    ("MKCOL", {}, None),
    ("LOCK", {"Timeout": "Second-600", "Content-Type": "application/xml"},
     '<lockinfo xmlns="DAV:"><lockscope><exclusive/></lockscope></lockinfo>'),
    ("UNLOCK", {"Lock-Token": "<opaquelocktoken:1>"}, None),
    ("COPY", {"Destination": "http://proxy.test/dav/copy", "Overwrite": "F"}, None),
    ("MOVE", {"Destination": "http://proxy.test/dav/moved"}, None),
    ("SEARCH", {"Content-Type": "application/xml"}, '<searchrequest xmlns="DAV:"/>'),
    ("REPORT", {"Depth": "0", "Content-Type": "application/xml"}, '<version-tree/>'),
    ("MKCALENDAR", {}, None),
    ("ACL", {"Content-Type": "application/xml"}, '<acl xmlns="DAV:"/>'),
]


@pytest.mark.parametrize("method, headers, body", WEBDAV, ids=[m[0] for m in WEBDAV])
def test_webdav_methods_are_proxied_with_http_client(env, method, headers, body):
    mark = marker()
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    try:
        conn.request(method, f"/dav/{mark}/", body=body,
                     headers={"Host": "proxy.test", **headers})
        resp = conn.getresponse()
        seen = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert (seen["method"], seen["target"]) == (method, f"/dav/{mark}/")
    assert seen["body"] == (body or "")
    got = dict(seen["headers"])
    for name, value in headers.items():
        assert got[name] == value


@needs_curl
def test_propfind_with_curl(env):
    mark = marker()
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-X", "PROPFIND",
                          "-H", "Depth: 1", "-H", "Content-Type: application/xml",
                          "--data-binary", PROPFIND_BODY,
                          "-H", "Host: proxy.test", f"http://127.0.0.1:{env.port}/dav/{mark}"],
                         capture_output=True, timeout=20)
    seen = json.loads(out.stdout)
    assert (seen["method"], seen["target"], seen["body"]) == \
        ("PROPFIND", f"/dav/{mark}", PROPFIND_BODY)


# ---------------------------------------------------------------------------
# allow_encoded_slashes


@pytest.mark.parametrize("path", ["/a%2Fb/{mark}", "/{mark}%2fx", "/x/{mark}/%2F..%2Fa/b"])
def test_encoded_slash_is_404_never_forwarded_by_default(env, path):
    mark = marker()
    refused(env, 404, f"GET {path.format(mark=mark)} HTTP/1.1", "Host: proxy.test",
            mark=mark)


def test_encoded_slash_off_leaves_the_query_and_an_encoded_percent_alone(env):
    mark = marker()
    for target in (f"/{mark}?next=%2Fhome", f"/{mark}/100%252F"):
        r, _ = exchange(env.port, f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
                        .encode())
        assert r.status == 200
        assert r.json()["target"] == target


@pytest.mark.parametrize("path, forwarded", [
    ("/a%2Fb/{mark}", "/AB/{mark}"),               # routed as /a/b/...
    ("/x%2Fy/{mark}", "/x/y/{mark}"),
    ("/x%2F%2Fy/{mark}", "/x/y/{mark}"),           # then slashes merged
    ("/x/{mark}/..%2F..%2Fa/b", "/AB"),            # and dot segments resolved
])
def test_encoded_slash_on_is_a_slash(env, path, forwarded):
    mark = marker()
    r, _ = exchange(env.port, f"GET {path.format(mark=mark)} HTTP/1.1\r\nHost: on.test\r\n\r\n"
                    .encode())
    assert r.status == 200
    assert r.json()["target"] == forwarded.format(mark=mark)


@needs_curl
@pytest.mark.parametrize("path", ["/a%2Fb/{mark}", "/x%2Fy/{mark}", "/{mark}/%2F..%2Fa/b"])
def test_encoded_slash_nodecode_is_kept_and_forwarded_with_curl(env, path):
    path = path.format(mark=marker())
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--path-as-is",
                          "-H", "Host: nodecode.test", f"http://127.0.0.1:{env.port}{path}"],
                         capture_output=True, timeout=20)
    assert json.loads(out.stdout)["target"] == path


# ---------------------------------------------------------------------------
# TE


@pytest.mark.parametrize("headers", [["TE: trailers"], ["TE: trailers, deflate;q=0.5"],
                                     ["Connection: TE", "TE: trailers"], ["TE: gzip"]])
def test_te_is_not_forwarded(env, headers):
    mark = marker()
    data = "\r\n".join([f"GET /{mark} HTTP/1.1", "Host: proxy.test", *headers, "", ""])
    r, _ = exchange(env.port, data.encode())
    assert r.status == 200
    names = [n.lower() for n, _ in r.json()["headers"]]
    assert "te" not in names and "connection" not in names

"""TLS end to end: HTTPS listeners (SNI, versions, ciphers, ALPN, chains, redirect,
X-Forwarded-Proto/Port), https:// backends (verification, SNI, pooling) and every
certificate problem as a one-line configuration error.

Real processes on loopback: the proxy runs as `python -m twistproxy.cli run FILE`;
certificates are generated here with trustme (a CA, an intermediate, leaves for
site.test and *.other.test, an expired one, one from a CA nobody trusts); HTTPS
backends are RawBackend threads that wrap each accepted socket in Python's ssl and
answer JSON saying what they saw (the SNI name, the headers, which TLS connection and
the how-manieth request on it). Clients are Python's ssl, http.client, curl and
openssl s_client.
"""

from __future__ import annotations

import datetime
import http.client
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme

import clients
from clients import Response
from harness import ROOT, Lab, Proxy, RawBackend, free_port, wait_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HAVE_CURL = shutil.which("curl") is not None
HAVE_OPENSSL = shutil.which("openssl") is not None
needs_curl = pytest.mark.skipif(not HAVE_CURL, reason="curl not installed")
needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl CLI not installed")


# ---------------------------------------------------------------------------
# certificates


class PKI(clients.PKI):
    """Every certificate and key the tests use, written into one folder (which is
    also where the proxy's configuration files go: relative paths resolve there)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.leaf("site", "site.test")
        self.leaf("other", "*.other.test")
        self.leaf("backend", "127.0.0.1", "localhost", "keep.test")
        self.leaf("elsewhere", "elsewhere.test")          # trusted CA, wrong name
        self.leaf("expired", "site.test", not_before=now - datetime.timedelta(days=30),
                  not_after=now - datetime.timedelta(days=1))
        # a leaf issued by an intermediate: sent with `chain`, or all in the cert file
        inter = self.ca.create_child_ca()
        leaf = inter.issue_cert("site.test", common_name="site.test")
        leaf.cert_chain_pems[0].write_to_path(str(folder / "chained.pem"))
        leaf.private_key_pem.write_to_path(str(folder / "chained.key"))
        inter.cert_pem.write_to_path(str(folder / "intermediate.pem"))
        (folder / "chained-full.pem").write_bytes(b"".join(p.bytes() for p in
                                                           leaf.cert_chain_pems))
        # a CA that nobody trusts (not in the system store, not in ca.pem)
        self.rogue = trustme.CA()
        self.leaf("rogue", "127.0.0.1", "localhost", ca=self.rogue)
        (folder / "garbage.pem").write_text("this is not a certificate\n")
        (folder / "truncated.pem").write_text(
            "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHHIG...\n-----END CERTIFICATE-----\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("tls"))


# ---------------------------------------------------------------------------
# an HTTPS backend


class TLSBackend:
    """A keep-alive HTTPS backend on 127.0.0.1 answering every request with JSON:
    the SNI name its client sent, the request's target and headers, which TLS
    connection it came on (1, 2, ... by handshake) and the how-manieth request on it."""

    def __init__(self, pki: PKI, name: str):
        self.ctx = pki.server_context(name)
        self.ctx.sni_callback = self._sni
        self._seen = threading.local()
        self.lock = threading.Lock()
        self.connections = 0              # completed handshakes
        self.failures: list[str] = []     # handshakes that failed, and why
        self.snis: list[str | None] = []
        self.raw = RawBackend(self._serve)
        self.port = self.raw.port

    def _sni(self, sslobj, name, ctx):
        self._seen.name = name            # the callback runs in the handshaking thread
        return None

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        self._seen.name = None
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self.lock:
                self.failures.append(str(e))
            return
        with self.lock:
            self.connections += 1
            cid = self.connections
            self.snis.append(self._seen.name)
        buf = b""
        nth = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                nth += 1
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, list[str]] = {}
                for line in lines[1:]:
                    n, _, v = line.partition(":")
                    headers.setdefault(n.strip().lower(), []).append(v.strip())
                body = json.dumps({"sni": self._seen.name, "method": method,
                                   "target": target, "headers": headers, "conn": cid,
                                   "nth": nth, "version": tls.version()}).encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.raw.stop()


# ---------------------------------------------------------------------------
# clients


class SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port, sending `sni` as the TLS server name (and checking
    the certificate against it) whatever the Host header says."""

    def __init__(self, port: int, sni: str | None, context: ssl.SSLContext,
                 timeout: float = 10.0):
        super().__init__("127.0.0.1", port, context=context, timeout=timeout)
        self.sni = sni

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.sni)


def request(conn: http.client.HTTPConnection, path: str, host: str = "site.test",
            headers: dict | None = None, method: str = "GET") -> Response:
    conn.request(method, path, headers={"Host": host, **(headers or {})})
    r = conn.getresponse()
    return Response(r.status, r.getheaders(), r.read(), r.reason)


def https_get(pki: PKI, port: int, path: str, host: str = "site.test",
              sni: str | None = "site.test", headers: dict | None = None) -> Response:
    conn = SNIConnection(port, sni, pki.client_context())
    try:
        return request(conn, path, host, headers)
    finally:
        conn.close()


def handshake(pki: PKI, port: int, sni: str | None = "site.test", *, minimum=None,
              maximum=None, ciphers: str | None = None, alpn=None, trust: bool = True
              ) -> ssl.SSLSocket:
    """A bare TLS connection (the caller closes it); ssl.SSLError when it fails."""
    ctx = pki.client_context(trust)
    if not trust:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(sock, server_hostname=sni)
    except BaseException:
        sock.close()
        raise


def s_client(port: int, *args: str, servername: str | None = None) -> str:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
    cmd += ["-servername", servername] if servername else ["-noservername"]
    cmd += list(args)
    done = subprocess.run(cmd, input=b"", capture_output=True, timeout=20)
    return done.stdout.decode("latin-1") + done.stderr.decode("latin-1")


def peer_cn(s_client_output: str) -> str:
    m = re.search(r"^subject=.*?CN\s*=\s*([^,\n/]+)", s_client_output, re.M)
    assert m, s_client_output
    return m.group(1).strip()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          timeout=20)


def log_lines_since(proxy: Proxy, mark: int) -> list[str]:
    return [line for line in proxy.log()[mark:].splitlines() if line.strip()]


def assert_quiet(lines: list[str]) -> None:
    """Nothing above debug level, no traceback: a failed handshake is routine."""
    text = "\n".join(lines)
    assert "Traceback" not in text and "Unhandled" not in text, text
    for line in lines:
        m = re.search(r"\[([^\]#]*)#(\w+)\]", line)
        assert m is None or m.group(2) == "debug", line
        assert m is not None or not line.startswith("20"), line      # "[-]" twisted noise


# ---------------------------------------------------------------------------
# the proxy


class Env:
    """What the module's tests use, by name (started by the fixture's Lab)."""


# the `ciphers` listener: one GCM suite, and a CBC one the default list leaves out
CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-SHA"


LISTENERS = ("tls", "redirect", "plain", "tls13", "cipher", "chain", "fullchain")


@pytest.fixture(scope="module")
def env(pki, each_reactor):
    with Lab(pki.dir) as lab:
        e = Env()
        e.main = lab.add(TLSBackend(pki, "backend"))   # trusted via ca.pem: 127.0.0.1, localhost
        e.pooled = lab.add(TLSBackend(pki, "backend"))  # only /reuse/ goes here: counts them
        e.wrong = lab.add(TLSBackend(pki, "elsewhere"))  # trusted CA, another name's certificate
        e.rogue = lab.add(TLSBackend(pki, "rogue"))     # a CA nobody trusts
        e.rogue2 = lab.add(TLSBackend(pki, "rogue"))    # the same, reached with verify = false
        e.proxy = lab.proxy(lambda ports: config(e, ports))
        for port in (e.redirect, e.plain, e.tls13, e.cipher, e.chain, e.fullchain):
            wait_port("127.0.0.1", port, proc=e.proxy.proc)
        yield e


def config(e: Env, ports) -> str:
    """The proxy's configuration: its listeners' ports (`ports`) are set on `e`."""
    e.tls, e.redirect, e.plain, e.tls13, e.cipher, e.chain, e.fullchain = \
        (ports[name] for name in LISTENERS)
    ca = 'ca_file = "ca.pem"'
    return f"""
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {e.tls}
tls = {{ cert = "site.pem", key = "site.key" }}

[[listen.certificate]]
server_name = ["*.other.test", "exact.test"]
cert = "other.pem"
key = "other.key"

[[listen]]
address = "127.0.0.1"
port = {e.redirect}
redirect_to_https = true

[[listen]]
address = "127.0.0.1"
port = {e.plain}

[[listen]]
address = "127.0.0.1"
port = {e.tls13}
tls = {{ cert = "site.pem", key = "site.key", min_version = "1.3" }}

[[listen]]
address = "127.0.0.1"
port = {e.cipher}
tls = {{ cert = "site.pem", key = "site.key", ciphers = "{CIPHERS}" }}

[[listen]]
address = "127.0.0.1"
port = {e.chain}
tls = {{ cert = "chained.pem", key = "chained.key", chain = "intermediate.pem" }}

[[listen]]
address = "127.0.0.1"
port = {e.fullchain}
tls = {{ cert = "chained-full.pem", key = "chained.key" }}

[[vhost]]
server_name = "site.test"
server_alias = ["*.other.test", "exact.test"]

  [[vhost.route]]
  path = "/trusted/"
  url = "https://127.0.0.1:{e.main.port}/"
  {ca}

  [[vhost.route]]
  path = "/byname/"
  url = "https://localhost:{e.main.port}/"
  {ca}

  [[vhost.route]]
  path = "/reuse/"
  url = "https://127.0.0.1:{e.pooled.port}/"
  {ca}

  [[vhost.route]]
  path = "/mismatch/"
  url = "https://localhost:{e.wrong.port}/"
  {ca}

  [[vhost.route]]
  path = "/untrusted/"
  url = "https://127.0.0.1:{e.rogue.port}/"

  [[vhost.route]]
  path = "/noverify/"
  url = "https://localhost:{e.rogue2.port}/"
  verify = false

[[vhost]]
server_name = "keep.test"
preserve_host = true

  [[vhost.route]]
  path = "/"
  url = "https://127.0.0.1:{e.main.port}/"
  {ca}
"""


def test_proxy_starts_clean(env):
    log = env.proxy.log()
    assert "Traceback" not in log, log
    assert env.proxy.proc.poll() is None


# ---------------------------------------------------------------------------
# the HTTPS listener: clients


def test_python_client_through_tls_listener(pki, env):
    r = https_get(pki, env.tls, "/trusted/hello?x=1")
    assert r.status == 200, r
    seen = r.json()
    assert seen["target"] == "/hello?x=1"
    assert seen["method"] == "GET"


@needs_curl
def test_curl_through_tls_listener(pki, env):
    done = curl("--cacert", pki.path("ca.pem"), "--resolve",
                f"site.test:{env.tls}:127.0.0.1", f"https://site.test:{env.tls}/trusted/curl")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["target"] == "/curl"
    assert seen["headers"]["x-forwarded-proto"] == ["https"]


@needs_curl
def test_curl_http11_keepalive_over_tls(pki, env):
    """curl offers h2 and http/1.1 by ALPN; two URLs share one TLS connection."""
    done = curl("-v", "--cacert", pki.path("ca.pem"), "--resolve",
                f"site.test:{env.tls}:127.0.0.1", f"https://site.test:{env.tls}/trusted/a",
                f"https://site.test:{env.tls}/trusted/b")
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode("latin-1")
    assert "ALPN: server accepted http/1.1" in err or "ALPN, server accepted to use http/1.1" \
        in err, err
    assert re.search(r"Re-using existing connection", err, re.I), err
    assert done.stdout.count(b'"target"') == 2


def test_keepalive_requests_on_one_tls_connection(pki, env):
    conn = SNIConnection(env.tls, "site.test", pki.client_context())
    try:
        for i in range(3):
            r = request(conn, f"/trusted/k{i}")
            assert r.status == 200, r
            assert r.json()["target"] == f"/k{i}"
    finally:
        conn.close()


def test_client_that_does_not_trust_the_certificate_fails(pki, env):
    with pytest.raises(ssl.SSLCertVerificationError):
        SNIConnection(env.tls, "site.test", pki.client_context(trust=False)).connect()
    assert https_get(pki, env.tls, "/trusted/after").status == 200


# ---------------------------------------------------------------------------
# certificates chosen by SNI


@needs_openssl
@pytest.mark.parametrize("servername, cn", [
    ("site.test", "site.test"),
    ("a.other.test", "*.other.test"),
    ("www.other.test", "*.other.test"),
    ("A.Other.Test", "*.other.test"),
    ("exact.test", "*.other.test"),
    ("other.test", "site.test"),            # the wildcard needs a label before it
    ("unknown.test", "site.test"),           # unknown name: the default
    (None, "site.test"),                     # no SNI: the default
])
def test_sni_picks_certificate_openssl(env, servername, cn):
    out = s_client(env.tls, servername=servername)
    assert peer_cn(out) == cn, out


def test_sni_picks_certificate_python(pki, env):
    for sni, san in (("site.test", "site.test"), ("x.other.test", "*.other.test")):
        s = handshake(pki, env.tls, sni)          # verifies the chain and the name
        try:
            assert s.getpeercert()["subjectAltName"] == (("DNS", san),)
        finally:
            s.close()


def test_requests_with_sni_of_second_certificate_are_served(pki, env):
    r = https_get(pki, env.tls, "/trusted/w", host="api.other.test", sni="api.other.test")
    assert r.status == 200, r
    assert r.json()["headers"]["x-forwarded-proto"] == ["https"]


@needs_curl
def test_curl_verifies_both_certificates(pki, env):
    for name in ("site.test", "api.other.test"):
        done = curl("-o", "/dev/null", "-w", "%{http_code}", "--cacert", pki.path("ca.pem"),
                    "--resolve", f"{name}:{env.tls}:127.0.0.1",
                    f"https://{name}:{env.tls}/trusted/")
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout == b"200", name


# ---------------------------------------------------------------------------
# chains


@pytest.mark.parametrize("which", ["chain", "fullchain"])
def test_intermediate_is_sent(pki, env, which):
    """The client trusts only the root: the intermediate must come from the server,
    from `chain` or from the certificates after the leaf in the cert file."""
    port = env.chain if which == "chain" else env.fullchain
    r = https_get(pki, port, "/trusted/chained")
    assert r.status == 200, r


# ---------------------------------------------------------------------------
# versions, ciphers, ALPN, compression, renegotiation


def test_tls11_client_refused_and_proxy_keeps_serving(pki, env):
    mark = len(env.proxy.log())
    with pytest.raises(ssl.SSLError) as info:
        # SECLEVEL=0 so that the client itself is able to offer TLS 1.1
        handshake(pki, env.tls, minimum=ssl.TLSVersion.TLSv1,
                  maximum=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    assert "PROTOCOL_VERSION" in str(info.value).upper() or \
        "UNSUPPORTED_PROTOCOL" in str(info.value).upper(), info.value
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value).upper()
    assert https_get(pki, env.tls, "/trusted/after-tls11").status == 200
    time.sleep(0.2)
    assert_quiet(log_lines_since(env.proxy, mark))


def test_tls12_and_tls13_accepted_by_default(pki, env):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        s = handshake(pki, env.tls, minimum=version, maximum=version)
        try:
            assert s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                   ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        finally:
            s.close()


def test_min_version_13_refuses_tls12_client(pki, env):
    with pytest.raises(ssl.SSLError) as info:
        handshake(pki, env.tls13, maximum=ssl.TLSVersion.TLSv1_2)
    assert "PROTOCOL_VERSION" in str(info.value).upper() or \
        "UNSUPPORTED_PROTOCOL" in str(info.value).upper(), info.value
    s = handshake(pki, env.tls13)
    try:
        assert s.version() == "TLSv1.3"
    finally:
        s.close()
    conn = SNIConnection(env.tls13, "site.test", pki.client_context())
    try:
        assert request(conn, "/trusted/13").status == 200
    finally:
        conn.close()


def test_default_ciphers_refuse_cbc_sha1(pki, env):
    with pytest.raises(ssl.SSLError):
        handshake(pki, env.tls, maximum=ssl.TLSVersion.TLSv1_2,
                  ciphers="ECDHE-ECDSA-AES128-SHA")


def test_default_ciphers_prefer_server_order(pki, env):
    s = handshake(pki, env.tls, maximum=ssl.TLSVersion.TLSv1_2,
                  ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256")
    try:
        assert s.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    finally:
        s.close()


def test_configured_ciphers(pki, env):
    s = handshake(pki, env.cipher, maximum=ssl.TLSVersion.TLSv1_2,
                  ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    try:
        assert s.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    finally:
        s.close()
    s = handshake(pki, env.cipher, maximum=ssl.TLSVersion.TLSv1_2,
                  ciphers="ECDHE-ECDSA-AES128-SHA")          # allowed on this listener
    try:
        assert s.cipher()[0] == "ECDHE-ECDSA-AES128-SHA"
    finally:
        s.close()
    with pytest.raises(ssl.SSLError):
        handshake(pki, env.cipher, maximum=ssl.TLSVersion.TLSv1_2,
                  ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")


def test_alpn_offers_http11(pki, env):
    s = handshake(pki, env.tls, alpn=["h2", "http/1.1"])
    try:
        assert s.selected_alpn_protocol() == "http/1.1"
        s.sendall(b"GET /trusted/alpn HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data
    finally:
        s.close()


def test_alpn_h2_only_client_gets_no_protocol(pki, env):
    """No overlap: the handshake goes on without ALPN (the client may still speak 1.1)."""
    try:
        s = handshake(pki, env.tls, alpn=["h2"])
    except ssl.SSLError as e:       # RFC 7301 also allows a no_application_protocol alert
        assert "NO_APPLICATION_PROTOCOL" in str(e).upper(), e
        return
    try:
        assert s.selected_alpn_protocol() in (None, "")
    finally:
        s.close()


@needs_openssl
def test_alpn_openssl(env):
    out = s_client(env.tls, "-alpn", "h2,http/1.1", servername="site.test")
    assert "ALPN protocol: http/1.1" in out, out


def test_no_compression(pki, env):
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        s = handshake(pki, env.tls, maximum=maximum)
        try:
            assert s.compression() is None
        finally:
            s.close()


@needs_openssl
def test_openssl_reports_no_compression(env):
    out = s_client(env.tls, "-tls1_2", servername="site.test")
    assert "Compression: NONE" in out, out


def test_client_renegotiation_refused(pki, env):
    """A TLS 1.2 client asking to renegotiate is refused; the proxy goes on serving."""
    SSL = pytest.importorskip("OpenSSL.SSL")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.load_verify_locations(pki.path("ca.pem"))
    sock = socket.create_connection(("127.0.0.1", env.tls), timeout=5)
    sock.settimeout(None)         # pyOpenSSL wants a blocking socket: bound reads by the OS
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"site.test")
    conn.set_connect_state()
    conn.do_handshake()
    assert conn.get_protocol_version_name() == "TLSv1.2"
    try:
        assert conn.renegotiate()
        with pytest.raises(SSL.Error) as refused:      # OpenSSL's no_renegotiation alert
            conn.do_handshake()
            conn.send(b"GET /trusted/reneg HTTP/1.1\r\nHost: site.test\r\n\r\n")
            while conn.recv(65536):
                pass
        assert "no renegotiation" in str(refused.value), refused.value
    finally:
        sock.close()
    r = https_get(pki, env.tls, "/trusted/after-reneg")
    assert r.status == 200, r
    assert https_get(pki, env.tls, "/trusted/after-reneg").status == 200


# ---------------------------------------------------------------------------
# failed handshakes are routine


def _garbage(env, pki):
    with socket.create_connection(("127.0.0.1", env.tls), timeout=5) as s:
        s.sendall(b"hello\r\n\r\n")
        _drain(s)


def _plain_http(env, pki):
    with socket.create_connection(("127.0.0.1", env.tls), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
        _drain(s)


def _half_hello(env, pki):
    with socket.create_connection(("127.0.0.1", env.tls), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
        time.sleep(0.1)


def _connect_and_close(env, pki):
    socket.create_connection(("127.0.0.1", env.tls), timeout=5).close()


def _untrusting_client(env, pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        SNIConnection(env.tls, "site.test", pki.client_context(trust=False)).connect()


def _wrong_name_client(env, pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        SNIConnection(env.tls, "nope.test", pki.client_context()).connect()


def _drain(s: socket.socket) -> bytes:
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


@pytest.mark.parametrize("bad", [_garbage, _plain_http, _half_hello, _connect_and_close,
                                 _untrusting_client, _wrong_name_client],
                         ids=lambda f: f.__name__.strip("_"))
def test_failed_handshake_is_quiet_and_harmless(pki, env, bad):
    time.sleep(0.1)
    mark = len(env.proxy.log())
    started = time.monotonic()
    bad(env, pki)
    assert time.monotonic() - started < 5, "the proxy did not close the connection"
    assert https_get(pki, env.tls, "/trusted/still-here").status == 200
    time.sleep(0.2)
    assert_quiet(log_lines_since(env.proxy, mark))
    assert env.proxy.proc.poll() is None


def test_garbage_gets_closed_not_answered_in_plaintext(env):
    with socket.create_connection(("127.0.0.1", env.tls), timeout=5) as s:
        s.sendall(b"hello\r\n\r\n")
        out = _drain(s)
    assert b"HTTP/" not in out
    assert len(out) < 64          # at most a TLS alert


# ---------------------------------------------------------------------------
# X-Forwarded-Proto / X-Forwarded-Port


def test_x_forwarded_proto_https(pki, env):
    r = https_get(pki, env.tls, "/trusted/xfp")
    assert r.status == 200, r
    h = r.json()["headers"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-port"] == [str(env.tls)]


def test_x_forwarded_proto_cannot_be_forged(pki, env):
    r = https_get(pki, env.tls, "/trusted/xfp", headers={"X-Forwarded-Proto": "http",
                                                          "X-Forwarded-Port": "1"})
    h = r.json()["headers"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-port"] == [str(env.tls)]


def test_x_forwarded_proto_http_on_plain_listener(env):
    conn = http.client.HTTPConnection("127.0.0.1", env.plain, timeout=10)
    try:
        r = request(conn, "/trusted/plain", headers={"X-Forwarded-Proto": "https"})
    finally:
        conn.close()
    assert r.status == 200, r
    h = r.json()["headers"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-port"] == [str(env.plain)]


# ---------------------------------------------------------------------------
# redirect_to_https


@pytest.mark.parametrize("host, expect_host", [
    ("site.test", "site.test"),
    ("site.test:{redirect}", "site.test"),
    ("api.other.test:{redirect}", "api.other.test"),
])
def test_redirect_to_https(env, host, expect_host):
    host = host.format(redirect=env.redirect)
    conn = http.client.HTTPConnection("127.0.0.1", env.redirect, timeout=10)
    try:
        r = request(conn, "/some/path?q=1&x=a%20b", host=host)
    finally:
        conn.close()
    assert r.status == 301, r
    assert r.header("Location") == f"https://{expect_host}:{env.tls}/some/path?q=1&x=a%20b"


def test_redirect_for_post_and_head(env):
    conn = http.client.HTTPConnection("127.0.0.1", env.redirect, timeout=10)
    try:
        r = request(conn, "/form?a=1", method="HEAD")
        assert r.status == 301 and r.body == b""
        assert r.header("Location") == f"https://site.test:{env.tls}/form?a=1"
        conn.request("POST", "/form", body=b"x=1", headers={"Host": "site.test"})
        r = conn.getresponse()
        r.read()
        assert r.status == 301
        assert r.getheader("Location") == f"https://site.test:{env.tls}/form"
    finally:
        conn.close()


@needs_curl
def test_curl_follows_redirect_to_the_tls_listener(pki, env):
    done = curl("-L", "--cacert", pki.path("ca.pem"),
                "--resolve", f"site.test:{env.redirect}:127.0.0.1",
                "--resolve", f"site.test:{env.tls}:127.0.0.1",
                f"http://site.test:{env.redirect}/trusted/followed?q=2")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["target"] == "/followed?q=2"
    assert seen["headers"]["x-forwarded-proto"] == ["https"]


# ---------------------------------------------------------------------------
# https:// backends


def test_backend_trusted_by_ca_file(pki, env):
    r = https_get(pki, env.tls, "/trusted/ok")
    assert r.status == 200, r
    seen = r.json()
    assert seen["target"] == "/ok"
    # an IP address is never sent as SNI (RFC 6066 section 3)
    assert seen["sni"] is None


def test_backend_sni_is_backend_host(pki, env):
    r = https_get(pki, env.tls, "/byname/sni")
    assert r.status == 200, r
    seen = r.json()
    assert seen["sni"] == "localhost"
    assert seen["headers"]["host"] == [f"localhost:{env.main.port}"]


def test_backend_sni_is_client_host_with_preserve_host(pki, env):
    r = https_get(pki, env.tls, "/ph", host=f"keep.test:{env.tls}", sni="site.test")
    assert r.status == 200, r
    seen = r.json()
    assert seen["sni"] == "keep.test"
    assert seen["headers"]["host"] == [f"keep.test:{env.tls}"]
    assert seen["target"] == "/ph"


def test_backend_hostname_mismatch_502(pki, env):
    mark = len(env.proxy.log())
    r = https_get(pki, env.tls, "/mismatch/x")
    assert r.status == 502, r
    out = env.proxy.wait_for_log("-> 502")[mark:]
    line = next(l for l in out.splitlines() if "-> 502" in l)
    assert "vhost[0].route[3]" in line, line
    assert "localhost" in line and "mismatch" in line.lower(), line
    assert "Traceback" not in out, out


def test_backend_untrusted_certificate_502(pki, env):
    mark = len(env.proxy.log())
    r = https_get(pki, env.tls, "/untrusted/x")
    assert r.status == 502, r
    out = env.proxy.wait_for_log("-> 502")[mark:]
    line = next(l for l in out.splitlines() if "-> 502" in l)
    assert "vhost[0].route[4]" in line, line
    assert "certificate verify failed" in line, line
    assert "Traceback" not in out, out


def test_backend_failures_leave_the_proxy_serving(pki, env):
    for _ in range(3):
        assert https_get(pki, env.tls, "/untrusted/again").status == 502
        assert https_get(pki, env.tls, "/mismatch/again").status == 502
    assert https_get(pki, env.tls, "/trusted/fine").status == 200


def test_backend_verify_false_skips_the_check(pki, env):
    r = https_get(pki, env.tls, "/noverify/x")
    assert r.status == 200, r
    seen = r.json()
    assert seen["target"] == "/x"
    assert seen["sni"] == "localhost"          # SNI is still sent


def test_backend_tls_connection_reused(pki, env):
    before = env.pooled.connections
    conn = SNIConnection(env.tls, "site.test", pki.client_context())
    try:
        a = request(conn, "/reuse/1")
        b = request(conn, "/reuse/2")
    finally:
        conn.close()
    assert a.status == b.status == 200
    ja, jb = a.json(), b.json()
    assert env.pooled.connections - before == 1, (ja, jb)
    assert ja["conn"] == jb["conn"]
    assert jb["nth"] == ja["nth"] + 1
    # a new client connection gets the same pooled backend connection
    c = https_get(pki, env.tls, "/reuse/3")
    assert c.json()["conn"] == ja["conn"]
    assert env.pooled.connections - before == 1
    assert env.pooled.failures == []


def test_backend_pool_keeps_sni_apart(pki, env):
    """preserve_host: a connection opened for one client host name (SNI) is not
    reused for another one."""
    a = https_get(pki, env.tls, "/p1", host="keep.test", sni="site.test")
    b = https_get(pki, env.tls, "/p2", host="keep.test", sni="site.test")
    assert a.json()["sni"] == b.json()["sni"] == "keep.test"
    assert a.json()["conn"] == b.json()["conn"]
    c = https_get(pki, env.tls, "/trusted/ok", sni="site.test")    # the same worker
    assert c.json()["sni"] is None
    assert c.json()["conn"] != a.json()["conn"]


# ---------------------------------------------------------------------------
# certificate problems are configuration errors


def _error_config(plain: int, tls_port: int, tls: str, extra_listen: str = "",
                  route_extra: str = "") -> str:
    return f"""
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {plain}

[[listen]]
address = "127.0.0.1"
port = {tls_port}
tls = {{ {tls} }}
{extra_listen}

[[vhost]]
server_name = "site.test"

  [[vhost.route]]
  path = "/"
  url = "https://127.0.0.1:9/"
  {route_extra}
"""


OTHER_CERT = """
[[listen.certificate]]
server_name = "*.other.test"
{}
"""

ERROR_CASES = {
    "missing-cert": ('cert = "nowhere.pem", key = "site.key"', "", "",
                     "listen[1].tls.cert", "nowhere.pem"),
    "missing-key": ('cert = "site.pem", key = "nowhere.key"', "", "",
                    "listen[1].tls.key", "nowhere.key"),
    "key-mismatch": ('cert = "site.pem", key = "other.key"', "", "",
                     "listen[1].tls.key", "other.key"),
    "expired": ('cert = "expired.pem", key = "expired.key"', "", "",
                "listen[1].tls.cert", "expired.pem"),
    "garbage-chain": ('cert = "site.pem", key = "site.key", chain = "garbage.pem"', "", "",
                      "listen[1].tls.chain", "garbage.pem"),
    "truncated-chain": ('cert = "site.pem", key = "site.key", chain = "truncated.pem"', "",
                        "", "listen[1].tls.chain", "truncated.pem"),
    "garbage-cert": ('cert = "garbage.pem", key = "site.key"', "", "",
                     "listen[1].tls.cert", "garbage.pem"),
    "key-is-a-cert": ('cert = "site.pem", key = "site.pem"', "", "",
                      "listen[1].tls.key", "site.pem"),
    "sni-key-mismatch": ('cert = "site.pem", key = "site.key"',
                         OTHER_CERT.format('cert = "other.pem"\nkey = "site.key"'), "",
                         "listen[1].certificate[0].key", "site.key"),
    "sni-expired": ('cert = "site.pem", key = "site.key"',
                    OTHER_CERT.format('cert = "expired.pem"\nkey = "expired.key"'), "",
                    "listen[1].certificate[0].cert", "expired.pem"),
    "sni-missing-chain": ('cert = "site.pem", key = "site.key"',
                          OTHER_CERT.format('cert = "other.pem"\nkey = "other.key"\n'
                                            'chain = "nowhere-chain.pem"'), "",
                          "listen[1].certificate[0].chain", "nowhere-chain.pem"),
    "bad-ciphers": ('cert = "site.pem", key = "site.key", ciphers = "NO-SUCH-CIPHER"', "", "",
                    "listen[1].tls.ciphers", None),
    "missing-ca-file": ('cert = "site.pem", key = "site.key"', "", 'ca_file = "nowhere-ca.pem"',
                        "vhost[0].route[0].ca_file", "nowhere-ca.pem"),
    "garbage-ca-file": ('cert = "site.pem", key = "site.key"', "", 'ca_file = "garbage.pem"',
                        "vhost[0].route[0].ca_file", "garbage.pem"),
}


def _cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "twistproxy.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"twistproxy {args[0]} started instead of failing: "
                             f"{err.decode(errors='replace')}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _check_one_line(done, config: Path, key: str, file: str | None, pki: PKI) -> str:
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"{config}: "), line
    assert f" {key}: " in line, line
    if file is not None:
        assert pki.path(file) in line, line
    return line


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_certificate_problem_is_one_line_config_error(pki, case):
    tls, extra_listen, route_extra, key, file = ERROR_CASES[case]
    plain, tls_port = free_port(), free_port()
    config = pki.dir / f"bad-{case}.toml"
    config.write_text(_error_config(plain, tls_port, tls, extra_listen, route_extra))

    run = _cli("run", str(config))
    assert run.returncode == 2, (run.returncode, run.stderr.decode(errors="replace"))
    line = _check_one_line(run, config, key, file, pki)
    if case.endswith("expired"):
        assert "expired" in line, line
    if "mismatch" in case:
        assert "does not match" in line or "not match" in line, line
    assert run.stdout == b""
    assert _bindable(plain) and _bindable(tls_port)

    check = _cli("check", str(config))
    assert check.returncode == 2, (check.returncode, check.stderr.decode(errors="replace"))
    assert _check_one_line(check, config, key, file, pki) == line
    assert check.stdout == b""


def test_good_certificates_pass_check(pki, env):
    config = pki.dir / "good.toml"
    config.write_text(_error_config(free_port(), free_port(),
                                    'cert = "site.pem", key = "site.key", '
                                    'chain = "intermediate.pem"',
                                    OTHER_CERT.format('cert = "other.pem"\nkey = "other.key"'),
                                    'ca_file = "ca.pem"'))
    done = _cli("check", str(config))
    assert done.returncode == 0, done.stderr
    assert b": ok: " in done.stdout


def test_relative_paths_resolve_against_the_config_folder(pki, tmp_path):
    """Run from another working directory: cert paths are the config file's."""
    port = free_port()
    config = pki.dir / "relative.toml"
    config.write_text(f"""
[[listen]]
address = "127.0.0.1"
port = {port}
tls = {{ cert = "site.pem", key = "site.key" }}

[[vhost]]
server_name = "site.test"
""")
    done = subprocess.run([sys.executable, "-m", "twistproxy.cli", "check", str(config)],
                          capture_output=True, cwd=tmp_path, timeout=20)
    assert done.returncode == 0, done.stderr

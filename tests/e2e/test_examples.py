"""What a newcomer runs: the examples with `twistproxy dev-certs`, and the demo's hints."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from harness import ROOT, Echo, Proxy, free_port, raw_request, script, wait_port

EXAMPLES = ROOT / "etc" / "examples"


def twistproxy(*args, cwd=ROOT):
    return subprocess.run([script("twistproxy"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_every_example_passes_check_after_the_dev_certs_command_it_names(tmp_path):
    # a copy of etc/ without certificates a developer may have made in the checkout
    shutil.copytree(EXAMPLES, tmp_path / "etc" / "examples",
                    ignore=shutil.ignore_patterns("tls"))
    examples = sorted((tmp_path / "etc" / "examples").glob("*.toml"))
    assert "tls-edge.toml" in [p.name for p in examples]
    edge = tmp_path / "etc" / "examples" / "tls-edge.toml"
    result = twistproxy("check", str(edge))
    assert result.returncode == 2 and "tls/example.com.pem' cannot be read" in result.stderr

    # the command as the example's comment gives it, from the checkout's top folder
    (command,) = re.findall(r"^#\s+(twistproxy dev-certs \S+)$", edge.read_text(), re.M)
    argv = shlex.split(command)
    result = twistproxy(*argv[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tls/ca.pem" in result.stdout and "--cacert" in result.stdout
    for example in examples:
        result = twistproxy("check", str(example))
        assert result.returncode == 0, f"{example.name}: {result.stderr}"
        assert f"{example}: ok: " in result.stdout, result.stdout
    # run again, it keeps what is there
    result = twistproxy(*argv[1:], cwd=tmp_path)
    assert result.returncode == 2 and "already exists (--force replaces it)" in result.stderr


def _peer_names(port: int, ctx: ssl.SSLContext, server_hostname: str) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return [v for _, v in tls.getpeercert()["subjectAltName"]]


def test_dev_certs_are_served_by_sni_and_verify_as_a_backend(tmp_path):
    result = twistproxy("dev-certs", str(tmp_path / "tls"))
    assert result.returncode == 0, result.stderr
    echo = Echo("behind-tls")
    tls_port, front_port = free_port(), free_port()
    cfg = f"""
[[listen]]
address = "127.0.0.1"
port = {front_port}
[[listen]]
address = "127.0.0.1"
port = {tls_port}
tls = {{ cert = "tls/example.com.pem", key = "tls/example.com.key" }}
  [[listen.certificate]]
  server_name = ["*.example.org", "example.org"]
  cert = "tls/example.org.pem"
  key = "tls/example.org.key"
[[vhost]]
server_name = "front"
listen = ["127.0.0.1:{front_port}"]
  [[vhost.route]]
  path = "/verified/"
  url = "https://localhost:{tls_port}/"
  ca_file = "tls/ca.pem"
  [[vhost.route]]
  path = "/system-cas/"
  url = "https://127.0.0.1:{tls_port}/"
[[vhost]]
server_name = "example.com"
listen = ["127.0.0.1:{tls_port}"]
  [[vhost.route]]
  path = "/"
  url = "{echo.url}/"
"""
    proxy = Proxy(cfg, tmp_path)
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        assert "example.org" in _peer_names(tls_port, ctx, "www.example.org")
        assert "example.com" in _peer_names(tls_port, ctx, "example.com")
        assert "example.com" in _peer_names(tls_port, ctx, "127.0.0.1")   # no SNI
        # the proxy as a client: ca.pem verifies the backend; the system's CAs do not
        def get(path):
            return raw_request(front_port, b"GET %s HTTP/1.1\r\nHost: front\r\n"
                               b"Connection: close\r\n\r\n" % path, timeout=10)
        answer = get(b"/verified/x")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["server"] == "behind-tls"
        answer = get(b"/system-cas/x")
        assert answer.startswith(b"HTTP/1.1 502 "), answer
    finally:
        proxy.stop()
        echo.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_every_command_the_demo_suggests_works_as_printed():
    port = free_port()
    proc = subprocess.Popen([script("twistproxy"), "demo", "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        lines = []
        while not (line := proc.stdout.readline()).startswith("Every request"):
            assert line, "the demo ended before its hints"
            lines.append(line)
        hints = [l.strip() for l in lines[lines.index("Try:\n") + 1:]]
        assert any("wsclient" in h for h in hints), hints
        for hint in hints:
            done = subprocess.run(hint, shell=True, input="echo me\n", capture_output=True,
                                  text=True, timeout=30, cwd=ROOT)
            assert done.returncode == 0 and done.stdout, (hint, done.stderr)
            if "wsclient" in hint:
                assert done.stdout == "echo me\n", hint
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)

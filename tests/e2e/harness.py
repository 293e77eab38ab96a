"""Real processes on loopback for end-to-end tests: the proxy, echo backends, raw backends.

The proxy runs as `python -m twistproxy.cli run FILE` in a subprocess (exactly what an
operator runs); echo backends run as `python -m twistproxy.echo`; scripted misbehaving
backends are plain sockets served from a thread. Everything started is stopped.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script(name: str) -> str:
    """A console script (twistproxy, twistd) of the environment running the tests: beside
    sys.executable, so an unactivated venv (.venv/bin/python -m pytest) finds its own."""
    return str(Path(sys.executable).parent / name)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not open")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hwm_kib(pid: int) -> int:
    """Peak resident set size of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class Echo:
    """An echo backend process (twistproxy.echo) on 127.0.0.1."""

    def __init__(self, name: str):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "twistproxy.echo", name],
                                     stdout=subprocess.PIPE, cwd=ROOT)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Proxy:
    """twistproxy run on a generated config; `port` is the first listener's port."""

    def __init__(self, config_text: str, tmp: Path, wait=True, name="proxy.toml"):
        self.path = tmp / name
        self.path.write_text(config_text)
        self.log_path = tmp / (name + ".log")
        self.out_path = tmp / (name + ".out")
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twistproxy.cli", "run", str(self.path),
             "--log-level", "debug"], stdout=self._out, stderr=self._log, cwd=ROOT)
        if wait:
            import tomllib
            first = tomllib.loads(config_text)["listen"][0]
            host = first["address"]
            host = "127.0.0.1" if host in ("0.0.0.0", "*") else \
                ("::1" if host == "::" else host)
            wait_port(host, first["port"], proc=self.proc)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.log()
            if text in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the proxy's log:\n{self.log()}")

    def wait_for_access(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.access_log()
            if text in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the access log:\n{self.access_log()}")

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def peak_rss_kib(self) -> int:
        return hwm_kib(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._out.close()
        return self.proc.returncode


class RawBackend:
    """A scripted backend: `handler(conn)` runs in a thread for each accepted socket."""

    def __init__(self, handler, host: str = "127.0.0.1"):
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.accepted = 0
        self.received: list[bytes] = []
        self._stop = False
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass


def read_head(conn: socket.socket) -> bytes:
    """Read up to the end of a request head (blocking)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_request(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0,
                until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the proxy sends back until it closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if not until_close and b"\r\n\r\n" in out:
                    break
        except socket.timeout:
            pass
        return out


def basic_config(routes: str, port: int, extra: str = "", vhost_extra: str = "",
                 server: str = "") -> str:
    return f"""
[server]
access_log = "-"
{server}

[[listen]]
address = "127.0.0.1"
port = {port}

[[vhost]]
server_name = "proxy.test"
{vhost_extra}
{routes}
{extra}
"""

"""Real processes on loopback for end-to-end tests: the proxy, echo backends, raw backends.

The proxy runs as `python -m twistproxy.cli run FILE` in a subprocess (exactly what an
operator runs); echo backends run as `python -m twistproxy.echo`, the WebSocket echo as
`python -m twistproxy.wsecho` (both bind port 0 and print the port); scripted
misbehaving backends are plain sockets served from a thread (RawBackend, port 0).
Everything started is stopped; `Lab` stops what a test started and checks every proxy's
log for tracebacks. The client side is in clients.py.

Ports for the proxy: its listeners come from TOML, so the harness picks them.
`free_port()` reserves a port below the kernel's ephemeral range (so no bind(0) and no
outgoing connection, ours or another process's, can take it meanwhile) and holds a lock
file on it for the life of the test process (so a parallel test run skips it); a
`Proxy` given a function of its ports instead of a text starts again on new ports if a
bind fails all the same.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import socket
import re
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


PORT_RANGE = (20000, 32000)          # below ip_local_port_range (32768-60999 by default)
_LOCK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "twistproxy-test-ports"
_held: list[int] = []                # lock file descriptors, held until the process ends


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, reserved for this test process (see the module's
    docstring); OSError when `host` cannot be bound at all (no IPv6, say)."""
    _LOCK_DIR.mkdir(exist_ok=True)
    rnd = random.Random()
    for _ in range(1000):
        port = rnd.randrange(*PORT_RANGE)
        fd = os.open(_LOCK_DIR / str(port), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        hosts = {host, "0.0.0.0"} if ":" not in host else {host}
        if all(_bindable(h, port) for h in hosts):
            _held.append(fd)
            return port
        os.close(fd)
    raise RuntimeError("no free port found")


def wait_until(predicate, timeout: float = 5.0, what: str = "condition",
               interval: float = 0.05):
    """Poll `predicate` until it returns something true (returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def one_line_failure(result, *expected: str) -> str:
    """A start-up that failed as it should: one line on stderr, no traceback, holding
    each expected text. Returns the line."""
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr
    assert len(err.splitlines()) == 1, result.stderr
    for text in expected:
        assert text in err, err
    return err


def run_cli(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """`python -m twistproxy.cli ARGS` to its end, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "twistproxy.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def worker_pids(proxy) -> dict[int, int]:
    """Worker number -> pid of the last one a master says it started."""
    import re
    out = {}
    for line in proxy.log_lines("] worker ", " started (pid "):
        m = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        out[int(m.group(1))] = int(m.group(2))
    return out


class Load:
    """`threads` clients each making requests in a loop, one connection per request
    (http.client), until `stop()`; `results` holds (started, header value or the
    exception) for each, `header` being the response header to keep (served_by_header).
    """

    def __init__(self, port: int, threads: int = 2, host: str = "proxy.test",
                 header: str = "X-Served-By"):
        self.port, self.host, self.header = port, host, header
        self.results: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _client(self) -> None:
        import http.client
        while not self._stop.is_set():
            started = time.monotonic()
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                c.request("GET", "/", headers={"Host": self.host})
                r = c.getresponse()
                r.read()
                outcome = r.getheader(self.header, "") if r.status == 200 else r.status
            except (OSError, http.client.HTTPException) as e:
                outcome = e
            finally:
                c.close()
            self.results.append((started, outcome))

    def served(self) -> list[str]:
        return [o for _, o in self.results if isinstance(o, str)]

    def failed(self) -> list:
        return [o for _, o in self.results if not isinstance(o, str)]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


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


class _Child:
    """A helper process that prints the port it listens on as its first line."""

    scheme = "http"

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                                     cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{' '.join(args)} could not start (exit {self.proc.returncode})")
        self.port = int(line)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


class Echo(_Child):
    """An echo backend process (twistproxy.echo) on 127.0.0.1: port 0 picks one, a
    given port brings a killed member back where it was."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        super().__init__("twistproxy.echo", name, *([str(port)] if port else []))


class WsEcho(_Child):
    """`python -m twistproxy.wsecho [PORT]`: the autobahn WebSocket echo backend."""

    scheme = "ws"

    def __init__(self, port: int = 0):
        super().__init__("twistproxy.wsecho", str(port))


class Ports(dict):
    """Ports by name, each reserved with free_port() when first asked for."""

    def __missing__(self, key):
        self[key] = free_port()
        return self[key]


def one_process_unless_asked(text: str) -> str:
    """Tests of what a worker does run it as the one process (master_process = false):
    its log lines then land before its answer, and each start is one process. A config
    that names master_process or worker_processes gets what it asks for (the master's
    own tests: test_processes, test_reload, test_handover, test_admin...)."""
    if "master_process" in text or "worker_processes" in text:
        return text
    if re.search(r"(?m)^\[server\][ \t]*$", text):
        return re.sub(r"(?m)^\[server\][ \t]*$", "[server]\nmaster_process = false", text, 1)
    return "[server]\nmaster_process = false\n" + text


# `twistproxy run` as on Windows: Twisted's portable select reactor, listeners that
# the reactor binds again itself (listenTCP's port), as a reactor without
# adoptStreamPort (IOCP) has them, and without the POSIX-only names the proxy's own
# modules could reach; conftest's `each_reactor` runs tests both ways
PORTABLE_RUN = ("import os, socket, sys; "
                # names Windows's Python does not have, gone before twistproxy loads
                "[delattr(m, n) for m, n in ((socket, 'MSG_DONTWAIT'), "
                "(os, 'getloadavg'), (os, 'sched_getaffinity')) if hasattr(m, n)]; "
                "import twistproxy.listeners as listeners; "
                "listeners.adopts = lambda reactor: False; "
                "from twistproxy.cli import main; "
                "sys.exit(main(sys.argv[1:] + ['--reactor', 'select']))")


class Proxy:
    """twistproxy run on a generated config; `port` is the first listener's port.

    `config` is the TOML text, or a function of a `Ports` (`lambda ports:
    basic_config(routes, ports[0])`): then the ports are the harness's to choose, and a
    start that fails to bind is retried on new ones (`ports` says which were used).
    With `Proxy.portable` set (conftest's each_reactor) it runs as PORTABLE_RUN."""

    ATTEMPTS = 4
    portable = False

    def __init__(self, config, tmp: Path, wait=True, name="proxy.toml", args=()):
        self.args = tuple(args)          # more `twistproxy run` options (--takeover)
        self.path = tmp / name
        self.log_path = tmp / (name + ".log")
        self.out_path = tmp / (name + ".out")
        for attempt in range(self.ATTEMPTS if callable(config) else 1):
            self.ports = Ports()
            text = config(self.ports) if callable(config) else config
            self._start(text)
            if not wait:
                return
            try:
                self._wait(text)
                return
            except RuntimeError:
                if "address already in use" not in self.log() or \
                        attempt == self.ATTEMPTS - 1 or not callable(config):
                    raise

    def _start(self, text: str) -> None:
        import tomllib
        text = one_process_unless_asked(text)
        self.path.write_text(text)
        self.port = tomllib.loads(text)["listen"][0]["port"]
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        command = ["-c", PORTABLE_RUN] if self.portable else ["-m", "twistproxy.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "run", str(self.path),
             "--log-level", "debug", *self.args], stdout=self._out, stderr=self._log,
            cwd=ROOT)

    def _wait(self, text: str) -> None:
        import tomllib
        first = tomllib.loads(text)["listen"][0]
        host = first["address"]
        host = "127.0.0.1" if host in ("0.0.0.0", "*") else \
            ("::1" if host == "::" else host)
        try:
            wait_port(host, first["port"], proc=self.proc)
        except RuntimeError as e:
            self._log.close()
            self._out.close()
            raise RuntimeError(f"the proxy did not start ({e}): {self.log()[-2000:]}") from None

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

    def log_lines(self, *needles: str, since: int = 0) -> list[str]:
        """The log's lines holding every needle (from character `since` on)."""
        return [line for line in self.log()[since:].splitlines()
                if all(n in line for n in needles)]

    def wait_for_line(self, *needles: str, timeout: float = 5.0) -> str:
        """The first log line holding every needle, once there is one."""
        try:
            return wait_until(lambda: self.log_lines(*needles)[:1], timeout)[0]
        except AssertionError:
            raise AssertionError(f"no log line with all of {needles!r} within {timeout}s:"
                                 f"\n{self.log()}") from None

    def access_lines(self, *needles: str) -> list[str]:
        return [line for line in self.access_log().splitlines()
                if all(n in line for n in needles)]

    def wait_for_access_lines(self, n: int, *needles: str, timeout: float = 8.0) -> list[str]:
        """At least `n` access log lines holding every needle, once there are."""
        try:
            return wait_until(lambda: (lambda ls: ls if len(ls) >= n else None)(
                self.access_lines(*needles)), timeout)
        except AssertionError:
            raise AssertionError(f"fewer than {n} access log lines with {needles!r}:\n"
                                 f"{self.access_log()}") from None

    def tracebacks(self) -> list[str]:
        """Lines of the log that show something went unhandled."""
        return [line for line in self.log().splitlines()
                if "Traceback" in line or "Unhandled" in line]

    def assert_clean(self) -> None:
        assert not self.tracebacks(), self.log()[-5000:]

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
    """A scripted backend: `handler(conn)` runs in a thread for each accepted socket.
    With `listen=False` the port is bound but refuses connections until `start()`."""

    def __init__(self, handler, host: str = "127.0.0.1", listen: bool = True):
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else \
            f"http://{host}:{self.port}"
        self.accepted = 0
        self.received: list[bytes] = []
        self._stop = False
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if listen:
            self.start()

    def start(self) -> None:
        self.sock.listen(128)
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


class Lab:
    """What one test (or module) starts, stopped last first by `close()`; every proxy's
    log is then checked for tracebacks."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.things: list = []

    def add(self, thing):
        self.things.append(thing)
        return thing

    def echo(self, name: str = "echo", port: int = 0) -> Echo:
        return self.add(Echo(name, port))

    def echos(self, *names: str) -> list[Echo]:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(names)) as ex:
            started = list(ex.map(Echo, names))
        self.things += started
        return started

    def wsecho(self, port: int = 0) -> WsEcho:
        return self.add(WsEcho(port))

    def raw(self, handler, **kw) -> RawBackend:
        return self.add(RawBackend(handler, **kw))

    def proxy(self, config, name: str = "proxy.toml", args=()) -> Proxy:
        """`config`: the TOML text or a function of the ports (see Proxy); `args`:
        more `twistproxy run` options."""
        return self.add(Proxy(config, self.tmp, name=name, args=args))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        proxies = []
        for t in reversed(self.things):
            try:
                t.stop()
            except Exception:
                pass
            if isinstance(t, Proxy):
                proxies.append(t)
        self.things = []
        for p in proxies:
            p.assert_clean()

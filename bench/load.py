"""Load generators: wrk (parsed into numbers), a raw-socket client for big bodies (also
through a CONNECT tunnel), and an asyncio `websockets` client for WebSocket echoes."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def parse_wrk(out: str) -> dict:
    """requests/s, p50/p99 (ms), request count and error counts from wrk --latency."""
    def grab(pattern, default=None):
        m = re.search(pattern, out, re.M)
        return m.groups() if m else default

    rps = grab(r"^Requests/sec:\s+([\d.]+)")
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output: {out.strip()[-300:]}")
    result = {"rps": float(rps[0])}
    for pct in ("50", "99"):
        lat = grab(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)")
        result[f"p{pct}_ms"] = _seconds(lat[0]) * 1e3 if lat else None
    total = grab(r"^\s+(\d+) requests in")
    result["requests"] = int(total[0]) if total else 0
    errs = grab(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                ("0", "0", "0", "0"))
    result["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                       map(int, errs)))
    non2xx = grab(r"Non-2xx or 3xx responses: (\d+)", ("0",))
    result["non_2xx"] = int(non2xx[0])
    return result


def wrk(wrk_path: str, port: int, path: str, connections: int, duration: float,
        threads: int = 1, headers: dict | None = None, timeout_s: int = 5) -> dict:
    argv = [wrk_path, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s}s", "--latency"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)


class StreamError(Exception):
    pass


def _read_head(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise StreamError(f"connection closed before a response head ({len(data)} bytes)")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def _drain(sock, headers, rest, give_up) -> int:
    """Read a response body and discard it; return its length (until close if no CL)."""
    want = int(headers["content-length"]) if "content-length" in headers else None
    got = len(rest)
    buf = bytearray(1 << 20)
    while want is None or got < want:
        if why := give_up():
            raise StreamError(f"gave up after {got} bytes: {why}")
        n = sock.recv_into(buf)
        if not n:
            if want is None:
                break
            raise StreamError(f"connection closed after {got} of {want} body bytes")
        got += n
    return got


def _open(port: int, tunnel_to: int | None, timeout: float) -> tuple[socket.socket, int]:
    """A connection to 127.0.0.1:port, or with tunnel_to, a CONNECT tunnel through the
    proxy on port to 127.0.0.1:tunnel_to; returns it and the port requests are for."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tunnel_to is None:
        return s, port
    try:
        where = f"127.0.0.1:{tunnel_to}"
        s.sendall(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
        status, _, rest = _read_head(s)
        if status != 200:
            raise StreamError(f"CONNECT {where}: status {status}")
        if rest:                         # the target says nothing before our request
            raise StreamError(f"CONNECT {where}: {len(rest)} unexpected bytes after the 200")
    except BaseException:
        s.close()
        raise
    return s, tunnel_to


def _get_head(target, port: int) -> bytes:
    head = [f"GET {target.path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in target.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def download(port: int, target, give_up=lambda: None, timeout: float = 60.0,
             tunnel_to: int | None = None) -> dict:
    """GET target.path, read and discard the body; MB/s over the whole exchange (with
    tunnel_to, the CONNECT to 127.0.0.1:tunnel_to first, through the proxy on port)."""
    start = time.monotonic()
    s, at = _open(port, tunnel_to, timeout)
    with s:
        s.sendall(_get_head(target, at))
        status, headers, rest = _read_head(s)
        got = _drain(s, headers, rest, give_up)
    secs = time.monotonic() - start
    if status != 200 or got < target.size:
        raise StreamError(f"status {status}, {got} of {target.size} bytes")
    return {"bytes": got, "seconds": secs, "mbps": got / secs / 1e6}


def upload(port: int, target, give_up=lambda: None, timeout: float = 60.0) -> dict:
    """PUT target.size generated bytes with Content-Length; MB/s until the response."""
    n = target.size
    head = (f"{target.method} {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {n}\r\n"
            f"Connection: close\r\n\r\n").encode()
    block = memoryview(bytes(range(256)) * 4096)          # 1 MiB
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        left = n
        try:
            while left:
                if why := give_up():
                    raise StreamError(f"gave up after sending {n - left} bytes: {why}")
                chunk = block[:min(left, len(block))]
                s.sendall(chunk)
                left -= len(chunk)
        except OSError as e:
            raise StreamError(f"sending failed after {n - left} bytes: {e}") from None
        status, headers, rest = _read_head(s)
        _drain(s, headers, rest, give_up)
    secs = time.monotonic() - start
    if status != 200:
        raise StreamError(f"status {status} after the upload")
    return {"bytes": n, "seconds": secs, "mbps": n / secs / 1e6}


def fetch(port: int, target, timeout: float = 10.0,
          tunnel_to: int | None = None) -> tuple[int, int]:
    """One request (the check that a proxy really relays): status, body length."""
    s, at = _open(port, tunnel_to, timeout)
    with s:
        s.sendall(_get_head(target, at))
        status, headers, rest = _read_head(s)
        return status, _drain(s, headers, rest, lambda: None)


# -- WebSocket ---------------------------------------------------------------------------

def _ws_url(port: int, target) -> str:
    return f"ws://127.0.0.1:{port}{target.path}"


def _ws_connect(url: str):
    from websockets.asyncio.client import connect
    # no permessage-deflate (the echo would not take it anyway), no keepalive pings
    return connect(url, compression=None, max_size=None, ping_interval=None,
                   open_timeout=10, close_timeout=2)


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


async def _ws_load(url: str, size: int, connections: int, duration: float) -> dict:
    msg = (bytes(range(256)) * (size // 256 + 1))[:size]
    opened: list = []
    errors = {"connect": 0, "closed": 0, "mismatch": 0}
    first_error: list[str] = []

    async def open_one():
        try:
            opened.append(await _ws_connect(url))
        except Exception as e:
            errors["connect"] += 1
            first_error.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(open_one() for _ in range(connections)))
    if not opened:
        raise RuntimeError(f"no WebSocket connection opened: {first_error[0]}")
    lat: list[list[float]] = [[] for _ in opened]
    clock = time.perf_counter
    stop = clock() + duration

    async def loop(ws, out: list[float]):
        try:
            while True:
                t0 = clock()
                if t0 >= stop:
                    return
                await ws.send(msg)
                got = await ws.recv()
                out.append(clock() - t0)
                if got != msg:
                    errors["mismatch"] += 1
                    return
        except Exception as e:
            errors["closed"] += 1
            first_error.append(f"{type(e).__name__}: {e}")

    began = clock()
    try:
        async with asyncio.timeout(duration + 30):      # a stalled proxy: give up
            await asyncio.gather(*(loop(ws, out) for ws, out in zip(opened, lat)))
    except TimeoutError:
        raise RuntimeError(f"WebSocket round-trips stalled for 30 s past the "
                           f"{duration:g} s run") from None
    finally:
        secs = clock() - began
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    all_lat = sorted(x for out in lat for x in out)
    n = len(all_lat)
    if not n:
        raise RuntimeError(f"no WebSocket round-trip completed: "
                           f"{first_error[0] if first_error else 'nothing echoed'}")
    result = {"rps": n / secs, "p50_ms": _pct(all_lat, 50) * 1e3,
              "p99_ms": _pct(all_lat, 99) * 1e3, "requests": n, "seconds": secs,
              "connections": len(opened), "non_2xx": 0, "socket_errors": errors}
    if first_error:
        result["first_error"] = first_error[0]
    return result


def websocket(port: int, target, connections: int, duration: float) -> dict:
    """`connections` WebSocket clients to ws://127.0.0.1:port/, each sending a message
    of target.size bytes and awaiting its echo in a loop for `duration` seconds (opened
    before the clock starts): round-trips/s ("rps"), p50/p99 round-trip (ms), and
    connections that failed to open, closed early or echoed something else."""
    return asyncio.run(_ws_load(_ws_url(port, target), target.size, connections,
                                duration))


def websocket_check(port: int, target, timeout: float = 10.0) -> None:
    """One WebSocket echo through the proxy (the check that it really tunnels)."""
    async def once():
        async with asyncio.timeout(timeout):
            async with _ws_connect(_ws_url(port, target)) as ws:
                await ws.send(b"check")
                got = await ws.recv()
        if got != b"check":
            raise RuntimeError(f"WebSocket check: echoed {got!r}")
    asyncio.run(once())

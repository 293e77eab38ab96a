"""The scenarios, and one measurement: a fresh proxy process, a check that it relays,
a warm-up, the load, its memory (VmRSS sampled during the load, VmHWM at the end),
then the proxy stopped. A fresh process per measurement keeps each peak its own.

Most scenarios are reverse proxying (the proxy started in its "http" mode); `websocket`
starts it as a WebSocket tunnel to the wsecho backend and `connect` as a forward proxy
taking CONNECT to the streaming backend's port (Scenario.mode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import load
from .backends import Backends, Target
from .procs import MIB, MemorySampler, cpu_seconds, free_port, tree
from .proxies import Proxy


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: str                    # "wrk", "download", "upload", "websocket" or "connect"
    target: str                  # key of Backends.targets
    connections: int = 0
    threads: int = 1
    members: str = "one"         # "one" backend, a "pair" (balancer), the upload "sink",
                                 # the "ws" echo
    metric: str = "rps"          # what the ratio column compares: rps, p50_ms or mbps
    proxies: tuple = ()          # when set, the only proxies it runs

    @property
    def mode(self) -> str:
        """How the proxy is configured: "http" (reverse), "websocket" or "connect"."""
        return self.kind if self.kind in ("websocket", "connect") else "http"


SCENARIOS = [
    Scenario("small", "128-byte responses, 50 connections", "wrk", "small", 50),
    Scenario("latency", "128-byte responses, 1 connection (added latency)", "wrk",
             "small", 1, metric="p50_ms"),
    Scenario("large", "1 MiB responses, 10 connections", "wrk", "large", 10),
    Scenario("download", "one streamed download", "download", "stream", metric="mbps"),
    Scenario("upload", "one streamed upload (Content-Length)", "upload", "upload",
             members="sink", metric="mbps"),
    Scenario("clients", "5,000 concurrent keep-alive clients, 128-byte responses",
             "wrk", "small", 5000, threads=2),
    Scenario("balancer", "balancer of two members, 128-byte responses, 50 connections",
             "wrk", "small", 50, members="pair"),
    Scenario("websocket", "WebSocket echo of 128-byte messages, 50 connections "
             "(round-trips/s)", "websocket", "ws", 50, members="ws"),
    Scenario("connect", "one streamed download through a CONNECT tunnel", "connect",
             "stream", metric="mbps"),
]
# one and two processes of each, same run: req/s and CPU seconds per 10k requests
WORKERS = ("twistproxy", "twistproxy-2", "twistproxy-single", "nginx", "nginx-2",
           "haproxy", "haproxy-2")
SCENARIOS.append(Scenario("workers", "128-byte responses, 50 connections, 1 and 2 "
                          "processes (CPU: all the proxy's processes)", "wrk", "small", 50,
                          proxies=WORKERS))
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Env:
    workdir: Path
    backends: Backends
    wrk: str | None
    duration: float
    warmup: float
    rss_limit_mib: int = 4096

    def stream_timeout(self, nbytes: int) -> float:
        return max(30.0, nbytes / 20e6)          # gives up below 20 MB/s


def _members(scn: Scenario, b: Backends) -> list[int]:
    if scn.members == "ws":
        if not b.ws:
            raise RuntimeError("no WebSocket echo backend was started")
        return [b.ws]
    return {"one": b.members[:1], "pair": b.members, "sink": [b.sink]}[scn.members]


def _check(scn: Scenario, port: int, b: Backends, tunnel_to: int | None) -> None:
    if scn.kind == "websocket":
        load.websocket_check(port, b.targets[scn.target])
        return
    target = b.targets[scn.target] if scn.kind == "wrk" else b.targets["small"]
    if scn.kind == "upload":
        target = Target("/", 1)                  # the echo sink answers GET with JSON
    status, size = load.fetch(port, target, tunnel_to=tunnel_to)
    if status != 200 or size < target.size:
        raise RuntimeError(f"check request {target.path}: status {status}, {size} bytes")


def run(scn: Scenario, proxy: Proxy, env: Env, tag: str) -> dict:
    """One measurement of one proxy in one scenario; {"error": ...} when it failed."""
    b = env.backends
    members = _members(scn, b)
    target = b.targets[scn.target]
    proc = sampler = None
    tunnel_to = None                  # connect: the port the client CONNECTs to
    try:
        if proxy.name == "direct":
            port = members[0]
        else:
            port = free_port()
            proc = proxy.start(env.workdir, port, members, tag, mode=scn.mode)
            proc.wait_port(port)
            if scn.kind == "connect":
                tunnel_to = members[0]
        _check(scn, port, b, tunnel_to)
        if scn.kind == "wrk" and env.warmup > 0:
            load.wrk(env.wrk, port, target.path, scn.connections, env.warmup,
                     scn.threads, target.headers)
        if scn.kind == "websocket" and env.warmup > 0:
            load.websocket(port, target, scn.connections, env.warmup)
        if proc:
            sampler = MemorySampler(proc.pid, limit_kib=env.rss_limit_mib * 1024)
        if scn.kind == "wrk":
            # CPU of every process of the proxy (a master and its workers), from /proc
            pids = tree(proc.pid) if proc else []
            cpu = cpu_seconds(pids)
            result = load.wrk(env.wrk, port, target.path, scn.connections,
                              env.duration, scn.threads, target.headers)
            if proc and result.get("requests"):
                used = cpu_seconds(tree(proc.pid)) - cpu
                result["cpu_per_10k"] = round(used / result["requests"] * 10000, 4)
        elif scn.kind == "websocket":
            result = load.websocket(port, target, scn.connections, env.duration)
        else:
            began = time.monotonic()
            deadline = began + env.stream_timeout(target.size)

            def give_up():
                if sampler is not None and sampler.over_limit:
                    return f"the proxy's RSS passed {env.rss_limit_mib} MiB"
                if time.monotonic() > deadline:
                    return f"too slow, stopped after {deadline - began:.0f} s (under 20 MB/s)"
                return None
            if scn.kind == "upload":
                result = load.upload(port, target, give_up)
            else:
                result = load.download(port, target, give_up, tunnel_to=tunnel_to)
        if proc and not proc.alive():
            raise RuntimeError("exited during the run")
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if proc and not proc.alive() and proc.name not in msg:
            msg += f" ({proc.name}: {proc.tail(3)})"
        result = {"error": msg}
    finally:
        if sampler:
            sampler.stop()
        if proc:
            proc.stop()
    if sampler:
        result["rss_mib"] = round(sampler.peak_rss / 1024, 1)
        result["peak_rss_mib"] = round(sampler.hwm / 1024, 1)
        result["peak_rss_one_mib"] = round(sampler.hwm_one / 1024, 1)
    log = env.workdir / f"{tag}.access.log"
    if log.exists():                              # proof that logging was on
        with open(log, "rb") as f:
            result["access_log_lines"] = sum(1 for _ in f)
    return result


def rss_target_note(nbytes: int) -> str:
    if nbytes >= 1024 * MIB:
        return ""
    return f" (at {nbytes / MIB:.0f} MiB; the target is for 1 GiB)"

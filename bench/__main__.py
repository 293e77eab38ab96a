"""`python -m bench`: see bench/__init__.py, or `python -m bench --help`."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import backends, report, scenarios
from .procs import MIB, ROOT, find_tool
from .proxies import ALL, BY_NAME

CLIENTS_FDS = 12000     # wrk's 5,000 sockets, and the proxy's client and backend sides


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench", description="twistproxy against nginx, haproxy, Apache "
        "mod_proxy, twisted.web.proxy and proxy.py on loopback")
    p.add_argument("--duration", type=float, help="seconds of load per measurement "
                   "(default 5; 1 with --quick)")
    p.add_argument("--rounds", type=int, help="rounds, each running every proxy once per "
                   "scenario; medians are reported (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=float, help="seconds of load before each wrk "
                   "measurement, whole seconds (default 2; none with --quick)")
    p.add_argument("--stream-bytes", type=int, help="size of the streamed upload and "
                   "download (default 1 GiB; 32 MiB with --quick)")
    p.add_argument("--scenarios", default=",".join(s.name for s in scenarios.SCENARIOS),
                   help="comma-separated, of: %(default)s")
    p.add_argument("--proxies", default=",".join(x.name for x in ALL),
                   help="comma-separated, of: %(default)s ('direct' is the backend "
                   "without a proxy)")
    p.add_argument("--quick", action="store_true", help="short defaults, for a smoke run")
    p.add_argument("--echo-backend", action="store_true",
                   help="use twistproxy.echo as the backend even where nginx is installed")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results",
                   help="where the JSON goes (default %(default)s)")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir with every configuration and log")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (1.0 if q else 5.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.warmup = a.warmup if a.warmup is not None else (0.0 if q else 2.0)
    a.stream_bytes = a.stream_bytes or (32 * MIB if q else 1024 * MIB)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.proxies = [x for x in a.proxies.split(",") if x]
    for kind, names, known in (("scenario", a.scenarios, scenarios.BY_NAME),
                               ("proxy", a.proxies, BY_NAME)):
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"unknown {kind} {', '.join(bad)}; known: {', '.join(known)}")
    return a


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def _first_line(argv) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def environment() -> dict:
    import twisted

    import twistproxy
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "twisted": twisted.__version__,
            "twistproxy": twistproxy.__version__,
            "commit": _first_line(["git", "-C", str(ROOT), "describe", "--always",
                                   "--dirty"])}
    for tool, flag in (("nginx", "-v"), ("haproxy", "-v"), ("apache2", "-v"), ("wrk", "-v")):
        path = find_tool(tool)
        info[tool] = _first_line([path, flag]) if path else None
    try:
        info["proxy.py"] = importlib.metadata.version("proxy.py")
    except importlib.metadata.PackageNotFoundError:
        info["proxy.py"] = None
    return info


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def plan(args) -> tuple[list, list, list[str]]:
    """The scenarios and proxies that can run here, and notes on what cannot."""
    notes: list[str] = []
    scns = [scenarios.BY_NAME[n] for n in args.scenarios]
    if not args.wrk:
        notes.append("wrk not installed (apt-get install wrk): its scenarios are skipped")
        scns = [s for s in scns if s.kind != "wrk"]
    if any(s.kind == "websocket" for s in scns):
        missing = [m for m in ("websockets", "autobahn") if importlib.util.find_spec(m) is None]
        if missing:
            notes.append(f"websocket skipped: {' and '.join(missing)} not installed "
                         f"(pip install {' '.join(missing)})")
            scns = [s for s in scns if s.kind != "websocket"]
    if any(s.name == "clients" for s in scns) and args.fds < CLIENTS_FDS:
        notes.append(f"clients skipped: open-file limit {args.fds} < {CLIENTS_FDS} "
                     f"(raise the hard limit, e.g. ulimit -Hn 65536)")
        scns = [s for s in scns if s.name != "clients"]
    proxies = []
    for name in args.proxies:
        why = BY_NAME[name].available()
        if why:
            notes.append(f"{name} skipped: {why}")
        else:
            proxies.append(BY_NAME[name])
    if any(s.members == "pair" for s in scns):
        notes += [f"balancer: {p.name} has no balancer, not run"
                  for p in proxies if not p.balancer and p.name != "direct"]
    for s in scns:
        notes += [f"{s.name}: {p.name} not run: {why}"
                  for p in proxies if (why := p.unsupported(s.mode))]
    return scns, proxies, notes


def skipped(scn, proxy) -> bool:
    """A pairing plan() noted as not run, or outside a variant's own scenarios."""
    return ((scn.members == "pair" and not proxy.balancer)
            or proxy.unsupported(scn.mode) is not None
            or bool(proxy.only) and scn.name not in proxy.only
            or bool(scn.proxies) and proxy.name not in scn.proxies)


def measure(args, scns, proxies, workdir: Path) -> tuple[str, dict]:
    """Start the backends, run every round; returns the backend's description and
    {scenario: {proxy: [one result per round]}}."""
    results: dict[str, dict[str, list]] = {s.name: {} for s in scns}
    b = backends.start(workdir, args.stream_bytes, args.fds, not args.echo_backend,
                       websocket=any(s.kind == "websocket" for s in scns))
    try:
        print(f"backend: {b.describe()}", file=sys.stderr)
        env = scenarios.Env(workdir, b, args.wrk, args.duration, args.warmup)
        for r in range(args.rounds):
            k = r % len(proxies) if proxies else 0
            for scn in scns:
                for p in proxies[k:] + proxies[:k]:       # who goes first rotates
                    if skipped(scn, p):
                        continue
                    res = scenarios.run(scn, p, env, f"{p.name}-{scn.name}-r{r + 1}")
                    results[scn.name].setdefault(p.name, []).append(res)
                    print(f"[round {r + 1}/{args.rounds}] {scn.name:9} {p.name:11} "
                          f"{_brief(res, scn)}", file=sys.stderr, flush=True)
    finally:
        b.stop()
    return b.describe(), results


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args.fds = raise_fd_limit()
    args.wrk = find_tool("wrk")
    scns, proxies, notes = plan(args)
    for n in notes:
        print("note:", n, file=sys.stderr)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    workdir = Path(tempfile.mkdtemp(prefix="twistproxy-bench-"))
    workdir.chmod(0o755)                  # nginx's and Apache's workers read from it
    try:
        backend, results = measure(args, scns, proxies, workdir)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_temp:
            print(f"configurations and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    labels = {p.name: p.label for p in ALL}
    summaries = {name: {p.name: report.median(runs[p.name]) for p in ALL if p.name in runs}
                 for name, runs in results.items()}
    tgts = [t for t in report.targets(summaries, scenarios.rss_target_note(args.stream_bytes))
            if t["target"].split(":")[0] in summaries]
    size = f"{args.stream_bytes / MIB:.0f} MiB"
    print(f"twistproxy benchmark, {started}: {args.rounds} round(s) of {args.duration:g} s "
          f"per measurement (medians), streams of {size}, on {os.cpu_count()} CPUs")
    print(f"backend: {backend}")
    for scn in scns:
        print()
        print(report.table(scn, summaries[scn.name], labels).replace(
            "one streamed", f"one streamed {size}"))
    print()
    print(report.targets_text(tgts))
    for n in notes:
        print("note:", n)
    doc = {"started": started, "options": {
        "duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
        "stream_bytes": args.stream_bytes, "scenarios": [s.name for s in scns],
        "proxies": [p.name for p in proxies]},
        "environment": environment(), "backend": backend, "notes": notes,
        "proxies": {p.name: {"label": p.label, "notes": p.notes} for p in proxies},
        "scenarios": {s.name: {"title": s.title, "kind": s.kind,
                               "connections": s.connections, "metric": s.metric,
                               "median": summaries[s.name], "runs": results[s.name]}
                      for s in scns},
        "targets": tgts}
    print(f"results: {report.write_json(args.results_dir, doc)}")
    return 0


def _brief(res: dict, scn) -> str:
    if "error" in res:
        return "error: " + res["error"]
    parts = []
    if "rps" in res:
        unit = "round-trips/s" if scn.kind == "websocket" else "req/s"
        parts.append(f"{res['rps']:.0f} {unit} p50 {res['p50_ms']:.2f}ms")
        if res.get("non_2xx") or any(res.get("socket_errors", {}).values()):
            parts.append(f"non-2xx {res['non_2xx']} socket {res['socket_errors']}")
    if "mbps" in res:
        parts.append(f"{res['mbps']:.0f} MB/s")
    if "peak_rss_mib" in res:
        parts.append(f"peak RSS {res['peak_rss_mib']:.0f} MiB")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

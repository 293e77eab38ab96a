"""Medians over rounds, the table printed on stdout, the targets, the JSON file."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

OURS = "twistproxy"
NUMBERS = ("rps", "p50_ms", "p99_ms", "mbps", "seconds", "rss_mib", "peak_rss_mib", "cpu_per_10k",
           "peak_rss_one_mib")


def median(runs: list[dict]) -> dict:
    """One proxy in one scenario: medians of the rounds that worked, errors summed."""
    ok = [r for r in runs if "error" not in r]
    out: dict = {"rounds": len(runs), "ok": len(ok)}
    for key in NUMBERS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    if any("requests" in r for r in ok):
        out["requests"] = sum(r.get("requests", 0) for r in ok)
        out["non_2xx"] = sum(r.get("non_2xx", 0) for r in ok)
        out["socket_errors"] = sum(sum(r.get("socket_errors", {}).values()) for r in ok)
    if any("access_log_lines" in r for r in runs):
        out["access_log_lines"] = sum(r.get("access_log_lines", 0) for r in runs)
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def _ratio(theirs: dict, ours: dict, metric: str) -> float | None:
    a, b = theirs.get(metric), ours.get(metric)
    return a / b if a is not None and b else None


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _ms(v) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f}us"
    return f"{v:.2f}ms" if v < 100 else f"{v:.0f}ms" if v < 1000 else f"{v / 1000:.2f}s"


def table(scenario, summary: dict[str, dict], labels: dict[str, str]) -> str:
    """One block: a row per proxy, the ratio column comparing scenario.metric."""
    ours = summary.get(OURS, {})
    rated = scenario.kind in ("wrk", "websocket")     # a rate and latencies per row
    rate = "rt/s" if scenario.kind == "websocket" else "req/s"     # round-trips/s
    metric = {"rps": rate, "p50_ms": "p50", "mbps": "MB/s"}[scenario.metric]
    lines = [f"== {scenario.name}: {scenario.title} ==",
             f"   ratio = their {metric} / twistproxy's"]
    cpu = any("cpu_per_10k" in s for s in summary.values()) and scenario.name == "workers"
    if rated:
        head = (f"{'proxy':38} {rate:>9} {'p50':>8} {'p99':>8} {'ratio':>7} "
                f"{'RSS':>8} {'peak RSS':>9}" + (f" {'CPU s/10k':>10}" if cpu else "") +
                "  errors")
    else:
        head = (f"{'proxy':38} {'MB/s':>9} {'seconds':>8} {'ratio':>7} "
                f"{'RSS':>8} {'peak RSS':>9}  errors")
    lines.append(head)
    for name, s in summary.items():
        label = labels.get(name, name)
        ratio = _fmt(_ratio(s, ours, scenario.metric), ".2f", "x")
        mem = f"{_fmt(s.get('rss_mib'), '.0f', ' MiB'):>8} " \
              f"{_fmt(s.get('peak_rss_mib'), '.0f', ' MiB'):>9}"
        errs = []
        if s.get("non_2xx"):
            errs.append(f"{s['non_2xx']} non-2xx")
        if s.get("socket_errors"):
            what = "connections failed" if scenario.kind == "websocket" else "socket errors"
            errs.append(f"{s['socket_errors']} {what}")
        if s.get("errors"):
            last = s["errors"][-1]
            last = last if len(last) <= 160 else last[:157] + "..."
            errs.append(f"{len(s['errors'])}/{s['rounds']} runs failed: {last}")
        if rated:
            row = (f"{label:38} {_fmt(s.get('rps'), '.0f'):>9} {_ms(s.get('p50_ms')):>8} "
                   f"{_ms(s.get('p99_ms')):>8} {ratio:>7} {mem}" +
                   (f" {_fmt(s.get('cpu_per_10k'), '.3f'):>10}" if cpu else ""))
        else:
            row = (f"{label:38} {_fmt(s.get('mbps'), '.0f'):>9} "
                   f"{_fmt(s.get('seconds'), '.2f'):>8} {ratio:>7} {mem}")
        lines.append(row + "  " + ("; ".join(errs) or "-"))
    return "\n".join(lines)


def targets(summaries: dict[str, dict[str, dict]], stream_note: str) -> list[dict]:
    """The issue's targets, each met / not met / skipped, with the numbers."""
    out = []

    def add(name, status, detail):
        out.append({"target": name, "status": status, "detail": detail})

    def vs(scn, other, metric, want, better_high, what, unit="req/s", mine=OURS):
        """want None: no target, the ratio is reported ("info")."""
        s = summaries.get(scn, {})
        ours, theirs = s.get(mine, {}), s.get(other, {})
        if metric not in ours or metric not in theirs:
            return add(what, "skipped", f"no {scn} result for "
                       f"{mine if metric not in ours else other}")
        r = ours[metric] / theirs[metric]
        met = want is None or (r >= want if better_high else r <= want)
        fmt = {"rps": lambda v: f"{v:.0f} {unit}",
               "mbps": lambda v: f"{v:.0f} MB/s"}.get(metric, _ms)
        logged = f" (access log: {ours['access_log_lines']} lines)" \
            if scn == "small" and other == "apache" and "access_log_lines" in ours else ""
        add(what, "info" if want is None else "met" if met else "NOT MET",
            f"{mine} {fmt(ours[metric])} vs {other} {fmt(theirs[metric])} = {r:.2f}x"
            + logged)

    vs("small", "apache", "rps", 1.0, True, "small: req/s >= Apache mod_proxy's (1.0x)")
    vs("small", "nginx", "rps", 0.30, True, "small: req/s >= 0.30x nginx's")
    vs("small", "proxy.py", "rps", 4.0, True, "small: req/s >= 4x proxy.py's")
    vs("small", "twisted", "rps", 6.0, True, "small: req/s >= 6x twisted.web.proxy's")
    vs("latency", "nginx", "p50_ms", 1.3, False, "latency: p50 at 1 connection <= 1.3x nginx's")
    vs("latency", "nginx", "p50_ms", None, False,
       "latency: p50 at 1 connection with busy_poll = 0, vs nginx's (no target)",
       mine="twistproxy-nospin")
    for scn, limit in (("download", 64), ("upload", 64), ("clients", 250)):
        what = f"{scn}: peak RSS <= {limit} MiB" + (stream_note if scn != "clients" else "")
        ours = summaries.get(scn, {}).get(OURS, {})
        if "peak_rss_mib" not in ours:
            add(what, "skipped", f"no {scn} result for twistproxy")
        else:
            # the process that streams (with a master: its worker); all of them beside
            one = ours.get("peak_rss_one_mib", ours["peak_rss_mib"])
            met = one <= limit and not ours.get("errors")
            add(what, "met" if met else "NOT MET",
                f"{one:.1f} MiB (VmHWM of the worker; "
                f"{ours['peak_rss_mib']:.1f} MiB with the master)" +
                (f", RSS under load {ours['rss_mib']:.1f} MiB" if "rss_mib" in ours else "") +
                (f"; {len(ours['errors'])} run(s) failed" if ours.get("errors") else ""))

    # worker processes: 2 against 1 of each, in req/s and CPU per request (issue 16)
    w = summaries.get("workers", {})

    def scaling(two, one, what, want_rps=None, want_cpu=None):
        a, b = w.get(two, {}), w.get(one, {})
        if "rps" not in a or "rps" not in b:
            return add(what, "skipped", f"no workers result for {two if 'rps' not in a else one}")
        r = a["rps"] / b["rps"]
        detail = f"{two} {a['rps']:.0f} vs {one} {b['rps']:.0f} req/s = {r:.2f}x"
        met = want_rps is None or r >= want_rps
        if "cpu_per_10k" in a and "cpu_per_10k" in b:
            c = a["cpu_per_10k"] / b["cpu_per_10k"]
            detail += (f"; CPU {a['cpu_per_10k']:.3f} vs {b['cpu_per_10k']:.3f} s per 10k "
                       f"requests = {c:.2f}x")
            met = met and (want_cpu is None or c <= want_cpu)
        add(what, "info" if want_rps is None and want_cpu is None else
            "met" if met else "NOT MET", detail)

    scaling("twistproxy-2", "twistproxy", "workers: 2 processes >= 1.1x 1 process in req/s, "
            "CPU per request within 1.1x", 1.1, 1.1)
    scaling("twistproxy", "twistproxy-single", "workers: 1 worker and its master vs one "
            "process (no more than 3% slower)", 0.97)
    scaling("nginx-2", "nginx", "workers: nginx 2 vs 1 worker (no target)")
    scaling("haproxy-2", "haproxy", "workers: haproxy 2 vs 1 thread (no target)")

    # not the issue's targets: where twistproxy's tunnels stand, reported as "info"
    for other in ("direct", "nginx", "haproxy", "apache"):
        vs("websocket", other, "rps", None, True,
           f"websocket: round-trips/s vs {other}'s (no target)", "round-trips/s")
    for other in ("direct", "apache", "proxy.py"):
        vs("connect", other, "mbps", None, True,
           f"connect: MB/s vs {other}'s (no target)")
    ours = summaries.get("connect", {}).get(OURS, {})
    if "peak_rss_mib" in ours:
        add("connect: peak RSS (no target; the download's is 64 MiB)" + stream_note, "info",
            f"{ours['peak_rss_mib']:.1f} MiB (VmHWM)" +
            (f", RSS under load {ours['rss_mib']:.1f} MiB" if "rss_mib" in ours else "") +
            (f"; {len(ours['errors'])} run(s) failed" if ours.get("errors") else ""))
    return out


def targets_text(items: list[dict]) -> str:
    lines = ["== targets (twistproxy, this run, same machine) =="]
    for t in items:
        lines.append(f"  [{t['status']:>7}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def write_json(results_dir: Path, doc: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / (time.strftime("%Y%m%d-%H%M%S") + ".json")
    n = 1
    while path.exists():
        path = results_dir / (time.strftime("%Y%m%d-%H%M%S") + f"-{n}.json")
        n += 1
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path

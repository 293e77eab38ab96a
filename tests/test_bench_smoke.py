"""The benchmark harness (bench/) runs end to end for a few seconds, twistproxy alone
(HTTP, streams, a CONNECT tunnel and WebSocket echoes).

Not a performance test: it only keeps `python -m bench` from rotting. Skipped where
wrk is not installed.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRK = shutil.which("wrk", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
WEBSOCKET = all(importlib.util.find_spec(m) for m in ("websockets", "autobahn"))

pytestmark = pytest.mark.skipif(WRK is None, reason="wrk not installed")


def test_bench_quick_run_against_twistproxy(tmp_path):
    scns = ["small", "download", "upload", "connect"] + (["websocket"] if WEBSOCKET else [])
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--proxies", "twistproxy",
         "--duration", "1", "--rounds", "1", "--scenarios", ",".join(scns),
         "--stream-bytes", str(4 * 1024 * 1024), "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

    rows = re.findall(r"^twistproxy \(1 process\)\s+(\d+)", done.stdout, re.M)
    assert len(rows) == len(scns), done.stdout  # one row per scenario
    assert int(rows[0]) > 0, done.stdout        # req/s in small
    assert "== targets" in done.stdout

    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    small = doc["scenarios"]["small"]["median"]["twistproxy"]
    assert small["rps"] > 0 and small["ok"] == 1 and "errors" not in small, small
    for scn in ("download", "upload", "connect"):      # connect: through a CONNECT tunnel
        ours = doc["scenarios"][scn]["median"]["twistproxy"]
        assert ours["mbps"] > 0 and ours["peak_rss_mib"] > 0, ours
    if WEBSOCKET:                                         # echo round-trips through 101
        ws = doc["scenarios"]["websocket"]["median"]["twistproxy"]
        assert ws["rps"] > 0 and ws["p99_ms"] > 0 and "errors" not in ws, ws
        assert ws["socket_errors"] == 0, ws


def test_bench_workers_scenario_measures_cpu_of_every_process(tmp_path):
    """One and two worker processes, same run: req/s and the CPU of the master and its
    workers per 10k requests (from /proc), and the scaling target line."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--proxies", "twistproxy,twistproxy-2",
         "--duration", "1", "--rounds", "1", "--scenarios", "workers",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU s/10k" in done.stdout and "workers: 2 processes >= 1.1x" in done.stdout
    (path,) = tmp_path.glob("*.json")
    runs = json.loads(path.read_text())["scenarios"]["workers"]["median"]
    assert runs["twistproxy"]["cpu_per_10k"] > 0 and runs["twistproxy-2"]["cpu_per_10k"] > 0


def test_cpu_seconds_reads_proc():
    sys.path.insert(0, str(ROOT))
    from bench.procs import cpu_seconds, tree
    sum(i * i for i in range(200000))          # some CPU of our own
    assert cpu_seconds([os.getpid()]) > 0
    assert cpu_seconds(tree(os.getpid())) >= cpu_seconds([os.getpid()])
    assert cpu_seconds([999999999]) == 0       # gone: counts nothing

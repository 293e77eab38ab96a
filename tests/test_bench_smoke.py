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

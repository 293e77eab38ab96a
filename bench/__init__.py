"""Benchmark harness: twistproxy against other reverse proxies, same machine, same run.

Run from the repository root (installs nothing; uses what is there and says what is
missing):

    python -m bench                          # everything: 5 s x 3 rounds, ~20 min
    python -m bench --quick --proxies twistproxy --scenarios small    # a few seconds
    python -m bench --duration 5 --rounds 2 --stream-bytes 268435456

What it measures, all on 127.0.0.1 with free ports:
- One backend, started once: nginx with one worker (`return 200` with 128 bytes, a 1 MiB
  file, a sparse file for the streamed download), or `twistproxy.echo` without nginx;
  uploads go to a `twistproxy.echo` process, which reads, hashes and discards bodies;
  WebSocket messages to a `twistproxy.wsecho` process (autobahn), which echoes them.
- In front of it, one process (or worker) of each proxy, configured alike (keep-alive
  to the backend where the proxy can, access log to a file): twistproxy, nginx,
  haproxy, Apache httpd mod_proxy (event MPM, one process), twisted.web.proxy's
  ReverseProxyResource, proxy.py when importable, and `direct` (no proxy, the ceiling).
  A missing one is skipped with a note.
- Scenarios (bench/scenarios.py): small responses at 50 connections and at 1 (added
  latency), 1 MiB responses, a streamed download and upload (--stream-bytes, default
  1 GiB: MB/s and peak RSS), 5,000 concurrent keep-alive clients (RSS), a balancer of
  two members, WebSocket echo round-trips at 50 connections through each proxy's
  upgrade tunnel, and the streamed download through a CONNECT tunnel (the proxy as a
  forward proxy). wrk drives the first kinds, a raw-socket client the streams (and
  the CONNECT), an asyncio `websockets` client the WebSocket echoes. A proxy that
  cannot do a scenario (no balancer, no WebSocket, no CONNECT) is left out with a note.
- Each measurement starts a fresh proxy process (so each peak RSS is its own), checks
  that it relays, warms it up, loads it, then stops it. Rounds interleave the proxies;
  medians over rounds are reported.

Output: a table per scenario on stdout (req/s, p50, p99, ratio to twistproxy, RSS
sampled under load and peak VmHWM, wrk's non-2xx and socket errors), then the issue's
targets evaluated (met / NOT MET / skipped; "info" lines compare twistproxy's
tunnels with no target set), and the same data as JSON in bench/results/
(--results-dir). Progress goes to stderr. Ctrl-C stops every process it started.
"""

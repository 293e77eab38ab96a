"""Counters kept on the request path with plain integer adds, read at scrape time.

Owns the per-route and per-listener counters (the per-member ones live on
balancer.group.Member beside its state). Nothing here is computed per request
beyond an add; rates and ratios are the reader's business (metrics, server-status).
"""

from __future__ import annotations


class RouteCounters:
    """What one route (a ProxyPass) did: requests, responses by class, bytes, errors."""

    __slots__ = ("requests", "responses", "bytes_in", "bytes_out", "errors", "retries",
                 "failovers")

    def __init__(self):
        self.requests = 0
        self.responses = [0] * 6          # index: status // 100 (0: none sent, 499)
        self.bytes_in = 0                 # request body bytes sent to backends
        self.bytes_out = 0                # response body bytes sent to clients
        self.errors: dict[str, int] = {}  # cause kind -> count (see attempt.cause_kind)
        self.retries = 0
        self.failovers = 0

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class ListenerCounters:
    """One listener's connections and requests. TLS handshakes are counted by the
    client connection (wire/client.py): once when one completes, once when a
    connection ends on a TLS error before it did."""

    __slots__ = ("accepted", "open", "requests", "responses", "tls_handshakes",
                 "tls_failures", "bytes_out")

    def __init__(self):
        self.accepted = 0
        self.open = 0
        self.requests = 0
        self.responses = [0] * 6          # index: status // 100 (0: none sent, 499)
        self.tls_handshakes = 0
        self.tls_failures = 0
        self.bytes_out = 0


class Census:
    """What the client connections are doing now, counted at read time (a scan of
    ProxyContext.connections, never kept up to date on the request path): by state
    (mod_status's scoreboard letters: R reading a request head, W a request being
    answered or a tunnel, C closing, _ waiting for the next request), how many have
    writes held back by a slow client, and requests under way per route."""

    __slots__ = ("reading", "answering", "closing", "waiting", "writing", "by_route",
                 "scoreboard")

    def __init__(self, connections):
        self.reading = self.answering = self.closing = self.waiting = self.writing = 0
        self.by_route: dict = {}          # RouteRuntime -> requests under way
        board = []
        for conn in list(connections):
            if conn.writes_paused:
                self.writing += 1
            if conn.closing or conn.lingering:
                self.closing += 1
                board.append("C")
            elif conn.queue or conn.tunnel is not None:
                self.answering += 1
                board.append("W")
            elif conn.cur is not None:
                self.reading += 1
                board.append("R")
            else:
                self.waiting += 1
                board.append("_")
            for req in conn.queue:        # only the first is dispatched, pipelined or not
                rt = req.route
                if rt is not None:
                    self.by_route[rt] = self.by_route.get(rt, 0) + 1
                break
        self.scoreboard = "".join(board)

    @property
    def busy(self) -> int:
        return self.reading + self.answering

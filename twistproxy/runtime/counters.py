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
    """One listener's connections and requests."""

    __slots__ = ("accepted", "open", "requests", "tls_handshakes", "tls_failures",
                 "bytes_out")

    def __init__(self):
        self.accepted = 0
        self.open = 0
        self.requests = 0
        self.tls_handshakes = 0
        self.tls_failures = 0
        self.bytes_out = 0

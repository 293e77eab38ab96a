"""The error log's account of a backend's failures: state changes, not one line each.

Owns, per backend worker or balancer, what the error log says while requests to it
fail: the first failure of each kind in full (cause, backend, route, status), then every
`interval` seconds a summary of how many requests failed and why, and a line when an
interval passes with no failure (recovered, or no more traffic). Every request still
gets its access-log line; this only keeps an outage under `wrk -c20` from writing
one warning per request. Pure: the clock and the timer come in from the caller.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from twisted.logger import Logger

log = Logger(namespace="twistproxy")

# Distinct causes in one outage that get a line of their own (the first of each);
# causes can carry client-chosen text (a sticky route), so the rest are only counted.
_CAUSES_SHOWN = 8


class Outage:
    """One backend's (or one balancer's) failures as the error log tells them."""

    __slots__ = ("name", "interval", "_now", "_call_later", "failing", "since",
                 "_counts", "_total", "_ok", "_where", "_last", "_causes")

    def __init__(self, name: str, interval: float, now: Callable[[], float],
                 call_later: Callable):
        self.name = name                    # "backend http://b:8080", "balancer://farm"
        self.interval = interval
        self._now = now
        self._call_later = call_later
        self.failing = False                # read on the hot path: see succeeded()
        self.since = 0.0
        self._counts: Counter = Counter()   # causes since the last line
        self._total = 0
        self._ok = False                    # a request succeeded since the last line
        self._where = ""
        self._last = 0.0
        self._causes: set = set()           # causes given a line of their own

    def failed(self, where: str, backend: str, why: str, status: int) -> None:
        """`backend` names it in the first line as the access log does (a balancer
        member with its balancer and route)."""
        cause = f"{why} -> {status}"
        now = self._now()
        if not self.failing:             # the outage begins
            self.failing = True
            self.since = now
            self._total = 0
            self._ok = False
            self._where = where
            self._causes = set()
            self._call_later(self.interval, self._tick)
        self._last = now
        if cause in self._causes or len(self._causes) >= _CAUSES_SHOWN:
            self._counts[cause] += 1     # told in the next summary
            return
        self._causes.add(cause)          # the first of its kind: a line of its own
        self._total += 1
        log.warn("{where}: backend {backend}: {why} -> {status}", where=where,
                 backend=backend, why=why, status=status)

    def succeeded(self) -> None:
        """Callers check `failing` first, so a healthy backend costs one attribute read."""
        self._ok = True

    def _tick(self) -> None:
        counts, self._counts = self._counts, Counter()
        n = sum(counts.values())
        if n:
            self._total += n
            causes = ", ".join(f"{c}: {k}" for c, k in counts.most_common())
            log.warn("{where}: {name}: still failing: {n} more request(s) in the last "
                     "{interval:g}s ({causes})", where=self._where, name=self.name, n=n,
                     interval=self.interval, causes=causes)
            self._ok = False
            self._call_later(self.interval, self._tick)
            return
        self.failing = False
        lasted = self._last - self.since
        what = "recovered" if self._ok else f"no request failed for {self.interval:g}s"
        log.info("{where}: {name}: {what}; {total} request(s) had failed over {lasted:.1f}s",
                 where=self._where, name=self.name, what=what, total=self._total,
                 lasted=lasted)


def summary_interval(retry: float) -> float:
    """Apache marks a worker in error for `retry` seconds: summaries come as often.
    With retry = 0 (try every request) they come every 60 s, Apache's default retry."""
    return retry if retry > 0 else 60.0

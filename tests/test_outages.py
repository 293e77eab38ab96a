"""The error log's account of an outage, driven by a fake clock: a line when failures
begin, a summary per interval while they go on, a line when they stop."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from twistproxy.outages import Outage, summary_interval


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, event):
        if event.get("log_namespace") == "twistproxy":
            self.lines.append(formatEvent(event))

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self.lines

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


def outage(clock: Clock, interval: float = 60.0) -> Outage:
    return Outage("backend http://b:8080", interval, clock.seconds, clock.callLater)


def test_thousands_of_failures_make_one_line_then_a_summary_per_interval():
    clock = Clock()
    o = outage(clock, 10)
    with Lines() as lines:
        for _ in range(5000):
            o.failed("vhost[0].route[0]", "http://b:8080", "connection refused", 503)
        assert lines == ["vhost[0].route[0]: backend http://b:8080: connection refused "
                         "-> 503"]
        clock.advance(10)
        assert len(lines) == 2 and "still failing: 4999 more request(s) in the last 10s" \
            in lines[1] and "connection refused -> 503: 4999" in lines[1]
        for _ in range(3):
            o.failed("vhost[0].route[0]", "http://b:8080", "connect timed out", 503)
        o.failed("vhost[0].route[0]", "http://b:8080", "connection refused", 503)
        assert lines[2].endswith("connect timed out -> 503"), "a new kind of failure"
        clock.advance(10)
        assert "(connect timed out -> 503: 2, connection refused -> 503: 1)" in lines[3]
        clock.advance(5)
        o.succeeded()
        clock.advance(5)
        assert len(lines) == 5 and "recovered; 5004 request(s) had failed over 10.0s" \
            in lines[4]
        assert not o.failing
        clock.advance(100)
        assert len(lines) == 5, "nothing more once it is over"


def test_an_outage_with_no_traffic_after_it_ends_quietly():
    clock = Clock()
    o = outage(clock, 10)
    with Lines() as lines:
        o.failed("r", "b", "connection refused", 503)
        clock.advance(10)
        assert len(lines) == 2 and "no request failed for 10s" in lines[1]


def test_a_new_outage_after_recovery_is_reported_again():
    clock = Clock()
    o = outage(clock, 1)
    with Lines() as lines:
        o.failed("r", "b", "connection refused", 503)
        clock.advance(1)
        o.failed("r", "b", "no answer within 5s", 504)
        assert len(lines) == 3 and lines[2].endswith("no answer within 5s -> 504")


def test_summaries_follow_retry_and_come_every_minute_with_retry_0():
    assert summary_interval(5) == 5 and summary_interval(0) == 60


def test_each_new_kind_of_failure_gets_its_own_line_up_to_a_bound():
    clock = Clock()
    o = outage(clock, 10)
    with Lines() as lines:
        o.failed("r", "b", "connection refused", 503)
        o.failed("r", "b", "connection refused", 503)
        o.failed("r", "b", "no answer within 5s", 504)
        assert len(lines) == 2 and lines[1] == "r: backend b: no answer within 5s -> 504"
        for i in range(100):               # client-chosen text cannot flood the log
            o.failed("r", "b", f"sticky route 'x{i}' is unavailable", 503)
        assert len(lines) == 8
        clock.advance(10)
        assert "still failing: 95 more request(s)" in lines[-1]

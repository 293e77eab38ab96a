"""BackendConnection's response-head bounds, in process: every way a head can be split
across reads gives the same answer at the exact limits (response_field_size per line,
response_head_size in all), and chunked applied twice is refused. The e2e side (real
sockets, memory, the 502) is tests/e2e/test_backend_framing.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from twistproxy.config import WorkerParams
from twistproxy.wire.backend import BackendConnection

FIELD, HEAD = 1024, 4096


class Exchange:
    def __init__(self):
        self.conn = SimpleNamespace(cork=lambda: None, uncork=lambda: None)
        self.events = []

    def backend_interim(self, status, rsn, headers):
        self.events.append(("interim", status))

    def backend_head(self, status, rsn, version, headers, length, bodyless, codings):
        self.events.append(("head", status, codings))

    def backend_body(self, data):
        self.events.append(("body", data))

    def backend_complete(self, conn, trailers):
        self.events.append(("complete",))

    def backend_invalid(self, conn, why):
        self.events.append(("invalid", why))


def feed(response: bytes, *cuts: int) -> list:
    """Parse `response` arriving in reads cut at these offsets; what the exchange heard."""
    params = WorkerParams(response_field_size=FIELD, response_head_size=HEAD)
    conn = BackendConnection(SimpleNamespace(params=params, reactor=None))
    conn._write = lambda data: None
    conn.hang_up = lambda: None
    ex = Exchange()
    conn.begin(ex, b"GET / HTTP/1.1\r\n\r\n", False)
    start = 0
    for cut in (*cuts, len(response)):
        if cut > start:
            conn.dataReceived(response[start:cut])
            if conn.exchange is None:
                break
        start = cut
    return ex.events


def outcome(events) -> str:
    kinds = [e[0] for e in events]
    if "invalid" in kinds:
        why = events[kinds.index("invalid")][1]
        return "line" if "response_field_size" in why else \
            "head" if "response_head_size" in why else why
    assert kinds[-1] == "complete", events
    return "ok"


def with_line(n: int, filler: int = 0) -> bytes:
    """A response with one header line of n bytes ("X-Long: vvv"), `filler` more bytes of
    other header lines, and a 3-byte body."""
    line = b"X-Long: " + b"v" * (n - 8)
    other = b"".join(b"X-F%03d: %s\r\n" % (i, b"f" * 90) for i in range(filler // 100))
    return b"HTTP/1.1 200 OK\r\n" + other + line + b"\r\nContent-Length: 3\r\n\r\nabc"


def cuts_of(data: bytes):
    """Single cuts around every line boundary, and a stride through the rest."""
    points = set(range(1, len(data), 37))
    for i in range(len(data)):
        if data[i:i + 1] in (b"\r", b"\n"):
            points.update((i - 1, i, i + 1, i + 2))
    return sorted(p for p in points if 0 < p < len(data))


@pytest.mark.parametrize("n,expected", [(FIELD, "ok"), (FIELD + 1, "line")])
def test_line_limit_is_exact_wherever_the_reads_are_cut(n, expected):
    data = with_line(n, filler=600)
    assert outcome(feed(data)) == expected
    for cut in cuts_of(data):
        assert outcome(feed(data, cut)) == expected, cut
    assert outcome(feed(data, *range(1, len(data)))) == expected   # a byte at a time


@pytest.mark.parametrize("n,expected", [(FIELD - 13, "ok"), (FIELD - 12, "line")])
def test_status_line_limit_is_exact(n, expected):
    data = b"HTTP/1.1 200 " + b"R" * n + b"\r\nContent-Length: 3\r\n\r\nabc"
    assert outcome(feed(data)) == expected
    for cut in cuts_of(data):
        assert outcome(feed(data, cut)) == expected, cut


def head_of(size: int) -> bytes:
    """A response whose head is exactly `size` bytes (status line to the blank line)."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
    lines, room = [], size - len(start) - 2
    while room:
        n = min(800, room - 2) if room - 2 >= 10 + 800 or room - 2 <= 800 else 400
        lines.append(b"X-F: " + b"f" * (n - 5) + b"\r\n")
        room -= n + 2
    head = start + b"".join(lines) + b"\r\n"
    assert len(head) == size
    return head + b"abc"


@pytest.mark.parametrize("size,expected", [(HEAD, "ok"), (HEAD + 1, "head")])
def test_head_limit_is_exact_wherever_the_reads_are_cut(size, expected):
    data = head_of(size)
    assert outcome(feed(data)) == expected
    for cut in range(1, len(data), 7):
        assert outcome(feed(data, cut)) == expected, cut
        assert outcome(feed(data, cut // 2, cut)) == expected, cut


def test_interim_then_final_in_one_read_measures_the_final_head():
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    assert outcome(feed(interim + with_line(FIELD) + b"x" * 5000)) == "ok"
    assert outcome(feed(interim + with_line(FIELD + 1))) == "line"


def test_short_head_with_a_long_body_in_the_same_read_is_fine():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n" + b"b" * 60000
    assert outcome(feed(data)) == "ok"
    assert outcome(feed(data, 10)) == "ok"


@pytest.mark.parametrize("te", [b"chunked, chunked", b"gzip, chunked, chunked", b"chunked, gzip",
                                b"chunked;x=1", b"Chunked , CHUNKED"])
def test_chunked_applied_twice_or_not_last_is_invalid(te):
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert "applies chunked more than once, or not last" in outcome(feed(data))


def test_two_chunked_lines_are_invalid_and_one_coding_before_chunked_is_relayed():
    two = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert "applies chunked" in outcome(feed(two + b"0\r\n\r\n"))
    events = feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    assert outcome(events) == "ok" and events[0] == ("head", 200, b"gzip")


def test_a_line_trickling_in_is_refused_as_too_long_before_the_head_is():
    data = with_line(2 * HEAD)
    events = feed(data, *range(100, len(data), 100))
    assert outcome(events) == "line"

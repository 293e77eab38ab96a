"""The access log: one Combined Log Format line per request, plus duration and backend.

Owns the line format and the sink ([server] access_log: "-" for stdout, else a file
opened for appending). Lines are buffered and flushed by the service once a second and
at shutdown, so logging costs no system call per request.
"""

from __future__ import annotations

import re
import sys
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\x7f"\\]')


def _escape(match: re.Match) -> str:
    c = match.group()
    return "\\" + c if c in '"\\' else f"\\x{ord(c):02x}"


def _quote(value: bytes | None) -> str:
    """A request-supplied value made safe for one log line (as Apache escapes it)."""
    if not value:
        return "-"
    text = value.decode("latin-1")
    if _NEEDS_ESCAPE.search(text):
        text = _NEEDS_ESCAPE.sub(_escape, text)
    return text


class AccessLog:
    """Writes log lines to a text stream; `line()` formats, `flush()` pushes out."""

    def __init__(self, target: str = "-", clock=time.time):
        self.target = target
        self._clock = clock
        self._own = target != "-"
        self._stream = open(target, "a", encoding="utf-8", buffering=65536) \
            if self._own else None
        self._stamp_second = -1
        self._stamp = ""

    @property
    def stream(self):
        # stdout is looked up each time so test harnesses that swap it still see lines
        return self._stream if self._own else sys.stdout

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._stamp_second:
            t = time.gmtime(second)
            self._stamp = (f"[{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000]")
            self._stamp_second = second
        return self._stamp

    def log(self, client_ip: str, request_line: bytes, status: int, sent: int,
            referer: bytes | None, user_agent: bytes | None, started: float,
            backend: str, user: str = "-") -> None:
        now = self._clock()
        micros = int((now - started) * 1_000_000)
        self.stream.write(
            f'{client_ip} - {user} {self._timestamp(now)} "{_quote(request_line)}" '
            f'{status} {sent if sent else "-"} "{_quote(referer)}" "{_quote(user_agent)}" '
            f'{micros} {backend or "-"}\n')

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._own and self._stream is not None:
            self._stream.close()

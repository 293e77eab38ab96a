"""The access log: one Combined Log Format line per request, plus duration and backend.

Owns the line format and the sink ([server] access_log: "-" for stdout, else a file
opened for appending). Lines are buffered and flushed by the service once a second and
at shutdown, so logging costs no system call per request.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# Apache's ap_escape_logitem: quote and backslash escaped, control characters and
# bytes that are not printable ASCII as \xhh. Lines are bytes, so nothing is decoded.
_NEEDS_ESCAPE = re.compile(rb'[\x00-\x1f\x7f-\xff"\\]')


def _escape(match: re.Match) -> bytes:
    c = match.group()
    return b"\\" + c if c in b'"\\' else b"\\x%02x" % c[0]


def _quote(value: bytes | None) -> bytes:
    """A request-supplied value made safe for one log line (as Apache escapes it)."""
    if not value:
        return b"-"
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(_escape, value)


# With worker processes every worker appends to the same file (or stdout): each
# write() carries whole lines only, at most PIPE_BUF bytes of them (a longer line goes
# alone), so no line is torn or interleaved with another worker's, on a file opened
# O_APPEND and on a pipe alike (POSIX makes pipe writes up to PIPE_BUF atomic).
PIPE_BUF = 4096
_BATCH = 65536          # buffered bytes that cause a flush before the once-a-second one


class AccessLog:
    """Writes log lines to a file (buffered, flushed by the service) or to stdout.

    `fd`: a worker process's log, an open descriptor shared with the other workers
    (the master's file, opened for appending, or stdout): lines are then written with
    os.write in whole-line batches of at most PIPE_BUF bytes (see above)."""

    def __init__(self, target: str = "-", clock=time.time, fd: int | None = None):
        self.target = target
        self._clock = clock
        self._fd = fd
        self._own = target != "-" and fd is None
        self._stream = open(target, "ab", buffering=65536) if self._own else None
        self._lines: list[bytes] = []
        self._size = 0
        self._stamp_second = -1
        self._stamp = b""

    def fileno(self) -> int:
        """The descriptor lines go to (workers inherit it)."""
        if self._fd is not None:
            return self._fd
        return self._stream.fileno() if self._own else sys.stdout.fileno()

    def _write(self, line: bytes) -> None:
        if self._fd is not None:
            self._lines.append(line)
            self._size += len(line)
            if self._size >= _BATCH:
                self.flush()
        elif self._own:
            self._stream.write(line)
        else:
            # stdout is looked up each time so test harnesses that swap it see lines
            sys.stdout.write(line.decode("ascii"))

    def _flush_fd(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > PIPE_BUF:
                self._write_all(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write_all(b"".join(batch))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
                continue
            view = view[n:]

    def _timestamp(self, now: float) -> bytes:
        second = int(now)
        if second != self._stamp_second:
            t = time.gmtime(second)
            self._stamp = (f"[{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000]"
                           ).encode("ascii")
            self._stamp_second = second
        return self._stamp

    def log(self, client_ip: str, request_line: bytes, status: int, sent: int,
            referer: bytes | None, user_agent: bytes | None, started: float,
            backend: str, user: str = "-") -> None:
        now = self._clock()
        self._write(b'%s - %s %s "%s" %d %s "%s" "%s" %d %s\n' % (
            client_ip.encode("ascii"), b"-" if user == "-" else _quote(user.encode("utf-8")),
            self._timestamp(now), _quote(request_line), status,
            b"%d" % sent if sent else b"-", _quote(referer), _quote(user_agent),
            int((now - started) * 1_000_000), backend.encode("latin-1") if backend else b"-"))

    def flush(self) -> None:
        if self._fd is not None:
            try:
                self._flush_fd()
            except OSError:
                pass
            return
        try:
            (self._stream if self._own else sys.stdout).flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._own and self._stream is not None:
            self._stream.close()
        elif self._fd is not None and self.target != "-":
            try:
                os.close(self._fd)
            except OSError:
                pass

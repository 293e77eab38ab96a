"""The access log as a worker process writes it (AccessLog with a shared descriptor):
every write() is whole lines, at most PIPE_BUF bytes of them, a longer line alone."""

from __future__ import annotations

import os

from twistproxy import accesslog
from twistproxy.accesslog import PIPE_BUF, AccessLog


def test_writes_are_whole_lines_within_pipe_buf(monkeypatch, tmp_path):
    path = tmp_path / "a.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    writes = []
    real = os.write

    def spy(f, data):
        writes.append(bytes(data))
        return real(f, data)
    monkeypatch.setattr(accesslog.os, "write", spy)
    log = AccessLog(str(path), clock=lambda: 1e9, fd=fd)
    for i in range(100):
        log.log("127.0.0.1", b"GET /%d HTTP/1.1" % i, 200, 10, None, b"x" * (i * 3),
                1e9, "http://b")
    log.log("127.0.0.1", b"GET /long HTTP/1.1", 200, 10, None, b"y" * 6000, 1e9, "http://b")
    assert writes == []                          # buffered until the flush
    log.close()
    assert writes and all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= PIPE_BUF for w in writes[:-1])
    assert writes[-1].count(b"\n") == 1 and b"/long" in writes[-1]   # too long: alone
    lines = path.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 101
    assert [line.split(b'"')[1] for line in lines[:3]] == [b"GET /0 HTTP/1.1",
                                                           b"GET /1 HTTP/1.1",
                                                           b"GET /2 HTTP/1.1"]

"""ProxyReactor dispatches readiness events as Twisted's EPollReactor does.

Each case runs on both reactors (fresh instances, not installed) with real socket
pairs and one hand-driven doPoll, and must come out the same on each.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher

from twistproxy.reactor import ProxyReactor


class Selectable:
    """A minimal readable/writable descriptor that records what the reactor did."""

    def __init__(self, sock, on_read=None):
        self.sock = sock
        self.on_read = on_read
        self.calls: list = []
        self.closed = False

    def fileno(self):
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self):
        return "Selectable"

    def doRead(self):
        self.calls.append("read")
        if self.on_read is not None:
            return self.on_read()
        data = self.sock.recv(4096)
        self.calls.append(data)
        return None if data else error.ConnectionDone()

    def doWrite(self):
        self.calls.append("write")
        return None

    def connectionLost(self, reason):
        self.calls.append(("lost", reason.type))


@pytest.fixture(params=[EPollReactor, ProxyReactor], ids=["twisted", "proxy"])
def reactor(request):
    r = request.param()
    yield r
    r._poller.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_readable_descriptor_is_read(reactor, pair):
    a, b = pair
    sel = Selectable(a)
    reactor.addReader(sel)
    b.sendall(b"hello")
    reactor.doPoll(1)
    assert sel.calls == ["read", b"hello"]
    assert sel in reactor.getReaders()


def test_writable_descriptor_is_written(reactor, pair):
    sel = Selectable(pair[0])
    reactor.addWriter(sel)
    reactor.doPoll(1)
    assert sel.calls == ["write"]


def test_end_of_stream_disconnects_cleanly(reactor, pair):
    a, b = pair
    sel = Selectable(a)
    reactor.addReader(sel)
    b.close()
    reactor.doPoll(1)
    assert sel.calls == ["read", b"", ("lost", error.ConnectionDone)]
    assert sel not in reactor.getReaders()


def test_an_exception_in_doRead_is_logged_and_disconnects(reactor, pair):
    a, b = pair
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        sel = Selectable(a, on_read=lambda: 1 / 0)
        reactor.addReader(sel)
        b.sendall(b"x")
        reactor.doPoll(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert sel.calls == ["read", ("lost", ZeroDivisionError)]
    failures = [e.get("log_failure") or e.get("failure") for e in events]
    assert any(f is not None and f.check(ZeroDivisionError) for f in failures)
    assert sel not in reactor.getReaders()


def test_a_closed_descriptor_is_dropped_without_a_read(reactor, pair):
    a, b = pair
    sel = Selectable(a)
    reactor.addReader(sel)
    b.sendall(b"x")
    sel.closed = True                  # fileno() is -1, as after a handler closed it
    reactor.doPoll(1)
    assert sel.calls == [("lost", error.ConnectionFdescWentAway)]


def _writer_hang_up(reactor_class) -> list:
    a, b = socket.socketpair()
    a.setblocking(False)
    r = reactor_class()
    try:
        sel = Selectable(a)
        r.addWriter(sel)
        b.close()
        r.doPoll(1)
        return sel.calls
    finally:
        r._poller.close()
        a.close()


def test_hang_up_of_a_writer_only_descriptor_is_handled_as_twisted_does():
    ours = _writer_hang_up(ProxyReactor)
    assert ours and ours == _writer_hang_up(EPollReactor)

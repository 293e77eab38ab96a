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


# -- busy polling: the window's adaptation, with a scripted poller and clock -----------


class ScriptedPoller:
    """Stands in for epoll: each poll() consumes one step, (seconds it takes, events),
    and advances the shared clock by that much."""

    def __init__(self, clock, steps):
        self.clock = clock
        self.steps = list(steps)
        self.calls: list = []

    def poll(self, timeout, maxevents):
        self.calls.append(timeout)
        took, events = self.steps.pop(0) if self.steps else (1e-6, [])
        self.clock.now += took
        return events


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def spinner(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("twistproxy.reactor.monotonic", clock)
    r = ProxyReactor()
    real = r._poller
    r.busy_poll = 100e-6

    def script(*steps):
        r._poller = ScriptedPoller(clock, steps)
        return r._poller

    yield r, script
    real.close()


EVENT = [(999, 1)]          # an fd the reactor does not know: dispatch skips it


def test_busy_poll_off_never_polls_without_sleeping(spinner):
    r, script = spinner
    r.busy_poll = 0.0
    poller = script((30e-6, EVENT), (30e-6, EVENT))
    r.doPoll(5)
    r.doPoll(5)
    assert poller.calls == [5, 5] and r._window == 0.0


def test_window_grows_while_waits_end_soon_and_caps_at_busy_poll(spinner):
    r, script = spinner
    poller = script((30e-6, EVENT))            # window 0: a plain wait, answered in 30us
    r.doPoll(5)
    assert poller.calls == [5] and r._window == pytest.approx(10e-6)
    widths = []
    for _ in range(4):
        # the spin (one poll(0) that takes the whole window) misses; the wait is short
        script((r._window, []), (10e-6, EVENT))
        r.doPoll(5)
        widths.append(round(r._window * 1e6))
    assert widths == [20, 40, 80, 100]
    # at the cap, a wait that ends only after the whole window counts as a long one
    script((r._window, []), (10e-6, EVENT))
    r.doPoll(5)
    assert r._window == pytest.approx(50e-6)


def test_an_event_caught_while_spinning_returns_without_sleeping(spinner):
    r, script = spinner
    r._window = 40e-6
    poller = script((5e-6, []), (5e-6, EVENT))
    r.doPoll(5)
    assert poller.calls == [0, 0]              # never a sleeping poll
    assert r._window == pytest.approx(40e-6)   # a hit leaves the window alone


def test_long_waits_shrink_the_window_to_nothing(spinner):
    r, script = spinner
    r._window = 80e-6
    widths = []
    for _ in range(4):
        script((r._window, []), (2e-3, EVENT))  # a slow backend: 2 ms
        r.doPoll(5)
        widths.append(round(r._window * 1e6))
    assert widths == [40, 20, 10, 0]
    poller = script((2e-3, EVENT))
    r.doPoll(5)
    assert poller.calls == [5]                 # no window: straight to sleep


def test_spinning_respects_the_reactor_timeout(spinner):
    r, script = spinner
    r._window = 20e-6
    poller = script((20e-6, []), (0.0, []))
    r.doPoll(50e-6)                            # a timer is due in 50us
    # a 20us spin, then a sleeping poll for the 30us left
    assert poller.calls[0] == 0 and poller.calls[1] == pytest.approx(30e-6, abs=1e-9)
    r._window = 100e-6
    poller = script((40e-6, []), (0.0, []))
    r.doPoll(40e-6)                            # the window is cut to the 40us
    assert poller.calls == [0, 0]
    poller = script()
    r.doPoll(0)                                # timers due now: no spinning at all
    assert poller.calls == [0]

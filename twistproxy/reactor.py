"""An epoll reactor with a leaner event dispatch, for the proxy's hot path.

Twisted's epoll reactor wraps every readiness event in `log.callWithLogger`: it asks
the selectable for its log prefix and pushes a copied context dict for the legacy
`twisted.python.log` "system" key, then pops it. A proxy handles two events per
request (the client's request, the backend's response), so that wrapper is a sizeable
share of its CPU. This reactor dispatches the events itself with the same semantics
(read before write, disconnect only after pending input, an exception disconnects the
selectable and is logged) but without the per-event context. It can also poll for
a short, adaptive while before it sleeps (`busy_poll`, see _spin_then_wait).
Everything else, including timers, threads and the waker, is Twisted's EPollReactor
unchanged.

The only visible difference: legacy `log.msg` calls made from inside a protocol
callback carry the default "-" system rather than the connection's log prefix; the
proxy logs through `twisted.logger` with its own fields, so its lines do not change.

`install()` is what `twistproxy run` and `twistd --reactor=twistproxy` call.
"""

from __future__ import annotations

import errno
import sys
from os import sched_yield as yield_cpu
from time import monotonic

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log

_IN = EPollReactor._POLL_IN
_OUT = EPollReactor._POLL_OUT
_GONE = EPollReactor._POLL_DISCONNECTED


# Adaptive busy polling, after Linux's cpuidle-haltpoll governor: the spin window
# grows (from _GROW_START, doubling) while waits end within busy_poll, and halves
# (to nothing below _GROW_START) when a wait outlasts it.
_GROW_START = 10e-6


class ProxyReactor(EPollReactor):
    """EPollReactor whose doPoll dispatches events without a log context per event,
    and that can poll for a while before sleeping (`busy_poll`, seconds; 0 is off)."""

    busy_poll = 0.0
    _window = 0.0

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            if self.busy_poll and timeout != 0:
                events = self._spin_then_wait(timeout)
            else:
                events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        reads = self._reads
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            why = None
            in_read = False
            if event & _GONE and not event & _IN:
                # a hang-up after all input was read: clean if we were reading
                if fd in reads:
                    in_read = True
                    why = CONNECTION_DONE
                else:
                    why = CONNECTION_LOST
            else:
                try:
                    if selectable.fileno() == -1:
                        why = _NO_FILEDESC      # closed by an earlier event's handler
                    elif event & _IN:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & _OUT:
                        why = selectable.doWrite()
                        in_read = False
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
            if why:
                self._disconnectSelectable(selectable, why, in_read)

    doIteration = doPoll

    def _spin_then_wait(self, timeout: float):
        """Poll without sleeping for the current window, then sleep, and adapt the
        window to how long the wait turned out to be. An idle CPU of a virtual machine
        can take tens of microseconds to wake (its halt goes through the hypervisor);
        a peer that answers within the window finds us awake. Waits that outlast
        busy_poll (an idle proxy, a slow backend) shrink the window to nothing, so the
        CPU spent on spinning follows the traffic that gains from it."""
        poll = self._poller.poll
        size = len(self._selectables)
        start = now = monotonic()
        window = self._window
        if window:
            until = start + window if timeout < 0 else start + min(window, timeout)
            while now < until:
                events = poll(0, size)
                if events:
                    return events           # caught awake: the window stays
                yield_cpu()                 # a peer waiting for this CPU goes first
                now = monotonic()
            if timeout >= 0:
                timeout = max(0.0, timeout - (now - start))
        events = poll(timeout, size)
        if events:
            waited = monotonic() - start
            if waited <= self.busy_poll:    # a wider window would have caught it
                self._window = min(self.busy_poll, max(_GROW_START, window * 2))
            elif window:
                self._window = window / 2 if window >= 2 * _GROW_START else 0.0
        return events


def install():
    """Install ProxyReactor as the global reactor."""
    reactor = ProxyReactor()
    installReactor(reactor)
    return reactor


__all__ = ["ProxyReactor", "install"]

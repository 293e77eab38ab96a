"""An epoll reactor with a leaner event dispatch, for the proxy's hot path.

Twisted's epoll reactor wraps every readiness event in `log.callWithLogger`: it asks
the selectable for its log prefix and pushes a copied context dict for the legacy
`twisted.python.log` "system" key, then pops it. A proxy handles two events per
request (the client's request, the backend's response), so that wrapper is a sizeable
share of its CPU. This reactor dispatches the events itself with the same semantics
(read before write, disconnect only after pending input, an exception disconnects the
selectable and is logged) but without the per-event context. Everything else,
including timers, threads and the waker, is Twisted's EPollReactor unchanged.

The only visible difference: legacy `log.msg` calls made from inside a protocol
callback carry the default "-" system rather than the connection's log prefix; the
proxy logs through `twisted.logger` with its own fields, so its lines do not change.

`install()` is what `twistproxy run` and `twistd --reactor=twistproxy` call.
"""

from __future__ import annotations

import errno
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log

_IN = EPollReactor._POLL_IN
_OUT = EPollReactor._POLL_OUT
_GONE = EPollReactor._POLL_DISCONNECTED


class ProxyReactor(EPollReactor):
    """EPollReactor whose doPoll dispatches events without a log context per event."""

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
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


def install():
    """Install ProxyReactor as the global reactor."""
    reactor = ProxyReactor()
    installReactor(reactor)
    return reactor


__all__ = ["ProxyReactor", "install"]

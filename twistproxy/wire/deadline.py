"""A timer that is cheap to move: one per connection, rescheduled lazily.

Connections change their timeout on every request (idle, then header read, then
none while an exchange runs). Twisted's DelayedCall.reset() to an earlier time is a
linear search of the reactor's heap, and a callLater per request adds up, so the
deadline is kept as a number: moving it later costs nothing, and the pending call
wakes up, sees the deadline has moved, and sleeps again.
"""

from __future__ import annotations


class Deadline:
    __slots__ = ("reactor", "callback", "when", "call")

    def __init__(self, reactor):
        self.reactor = reactor
        self.callback = None
        self.when: float | None = None
        self.call = None

    def set(self, seconds: float, callback) -> None:
        """Run `callback()` once `seconds` from now, unless moved or cleared before."""
        when = self.reactor.seconds() + seconds
        self.when = when
        self.callback = callback
        call = self.call
        if call is None:
            self.call = self.reactor.callLater(seconds, self._wake)
        elif call.getTime() > when:          # must fire sooner than planned
            call.cancel()
            self.call = self.reactor.callLater(seconds, self._wake)

    def clear(self) -> None:
        self.when = None

    def cancel(self) -> None:
        """For good (the connection is gone): drop the pending call too."""
        self.when = None
        self.callback = None
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None

    def _wake(self) -> None:
        self.call = None
        when = self.when
        if when is None:
            return
        left = when - self.reactor.seconds()
        if left > 0:
            self.call = self.reactor.callLater(left, self._wake)
            return
        self.when = None
        callback, self.callback = self.callback, None
        callback()

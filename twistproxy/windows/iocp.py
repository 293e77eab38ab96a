"""The listening port for Twisted's IOCP reactor, with twistproxy's socket options.

IOCP cannot adopt a bound socket (no IReactorSocket), so listeners.listen_on asks
this port to bind the address again. Twisted's IOCP port makes its socket with
`reactor.createSocket` and binds it in the same method, leaving no hook for options;
this port lends it a reactor whose first createSocket (the listening socket) gets
them, and returns the real reactor at once. Imported only under IOCP: on other
systems twisted_iocpsupport does not exist. Not run by this project's tests (they run
on Linux); README, Windows, says so.
"""

from __future__ import annotations

from twisted.internet.iocpreactor import tcp as iocp_tcp

from .binding import apply


class _OptionsOnFirstSocket:
    def __init__(self, reactor, options):
        self._reactor = reactor
        self._options = options
        self._done = False

    def createSocket(self, af, stype):
        sock = self._reactor.createSocket(af, stype)
        if not self._done:
            self._done = True
            apply(sock, self._options)
        return sock

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class ListenPort(iocp_tcp.Port):
    options: list = []

    def startListening(self):
        reactor = self.reactor
        self.reactor = _OptionsOnFirstSocket(reactor, self.options)
        try:
            iocp_tcp.Port.startListening(self)
        finally:
            self.reactor = reactor

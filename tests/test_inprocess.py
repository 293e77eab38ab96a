"""In-process Twisted on the real reactor, through pytest-twisted (see conftest.py)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.protocols.basic import LineReceiver


class Upper(LineReceiver):
    def lineReceived(self, line):
        self.sendLine(line.upper())


class Ask(LineReceiver):
    def __init__(self):
        self.answer = defer.Deferred()

    def connectionMade(self):
        self.sendLine(b"hello")

    def lineReceived(self, line):
        self.answer.callback(line)


@pytest_twisted.inlineCallbacks
def test_a_real_reactor_runs_a_server_and_a_client():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Upper), interface="127.0.0.1")
    try:
        client = yield protocol.ClientCreator(reactor, Ask).connectTCP(
            "127.0.0.1", port.getHost().port)
        answer = yield client.answer
        assert answer == b"HELLO"
        client.transport.loseConnection()
    finally:
        yield port.stopListening()


@pytest_twisted.ensureDeferred
async def test_async_def_waits_on_deferreds():
    d = defer.Deferred()
    reactor.callLater(0.01, d.callback, 42)
    assert await d == 42

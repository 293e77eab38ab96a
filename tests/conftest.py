"""Shared test configuration.

Tests that run Twisted code in-process on a real reactor (the admin resources, the AMP
channel, the Redis client, ...) use pytest-twisted, not reactor plumbing of their own:
the plugin (a declared test dependency, loaded by its entry point) installs one
reactor for the session and runs it in a greenlet, and a test written as

    @pytest_twisted.inlineCallbacks
    def test_x():
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ...
        yield port.stopListening()

(or `@pytest_twisted.ensureDeferred` on an `async def`) waits on Deferreds. Tests that
only need a fake clock or fake transports keep using twisted.internet.testing
(MemoryReactorClock, StringTransport). tests/test_inprocess.py shows the set-up works.
"""

"""Health checks (mod_proxy_hcheck): the state machine, and checks run on a fake clock."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistproxy.config import loads
from twistproxy.proxy import ProxyContext


def context(member_keys: str, balancer_keys: str = ""):
    cfg = loads(f"""
[server]
access_log = ""
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "x"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"
[balancer.farm]
{balancer_keys}
  [[balancer.farm.member]]
  url = "http://10.1.1.1:8101/app"
  {member_keys}
""")
    reactor = MemoryReactorClock()
    return reactor, ProxyContext(cfg, reactor)


def answer(reactor, index, response: bytes | None):
    """Complete the check's connect; the 'backend' answers `response` (None: refuse)."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    if response is None:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        return None
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    t = StringTransport()
    proto.makeConnection(t)
    sent = t.value()
    if response:
        proto.dataReceived(response)
    return sent


def test_http_check_request_and_state_machine():
    reactor, ctx = context('hcmethod = "GET"\n  hcuri = "health"\n  hcinterval = 5\n'
                           '  hcfails = 2\n  hcpasses = 2')
    (check,) = ctx.health_checks
    member = check.member
    check.start()                                       # first check at once
    sent = answer(reactor, 0, b"HTTP/1.1 200 OK\r\n\r\n")
    assert sent == b"GET /app/health HTTP/1.0\r\nHost: 10.1.1.1:8101\r\n\r\n"
    assert not member.flags
    reactor.advance(5)
    answer(reactor, 1, b"HTTP/1.1 500 Oops\r\n\r\n")
    assert "C" not in member.flags                      # one failure of two
    reactor.advance(5)
    answer(reactor, 2, None)                            # refused: second failure
    assert "C" in member.flags and not member.usable()
    reactor.advance(5)
    answer(reactor, 3, b"HTTP/1.1 302 Found\r\n\r\n")   # 3xx passes by default
    assert "C" in member.flags                          # one pass of two
    reactor.advance(5)
    answer(reactor, 4, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert not member.flags and member.usable()
    check.stop()
    reactor.advance(50)
    assert len(reactor.tcpClients) == 5                 # stopped means stopped


def test_passes_clear_an_error_state_too_and_silence_is_a_failure():
    reactor, ctx = context('hcmethod = "HEAD"', 'hcinterval = 1')
    (check,) = ctx.health_checks
    ctx.runtime.mark_error(check.member, 0.0, "test")
    check.start()
    answer(reactor, 0, b"HTTP/1.1 200 OK\r\n\r\n")
    assert "E" not in check.member.flags
    reactor.advance(1)
    answer(reactor, 1, b"")                             # connected, never answers
    reactor.advance(120)
    assert "C" in check.member.flags


def test_tcp_and_options_checks():
    reactor, ctx = context('hcmethod = "TCP"')
    (check,) = ctx.health_checks
    check.start()
    assert answer(reactor, 0, b"") == b""               # connecting is the check
    assert not check.member.flags and not check.in_flight
    reactor, ctx = context('hcmethod = "OPTIONS"')
    (check,) = ctx.health_checks
    check.start()
    assert answer(reactor, 0, b"").startswith(b"OPTIONS * HTTP/1.0\r\n")


def test_expected_status_range_and_stopped_members_are_skipped():
    reactor, ctx = context('hcmethod = "GET"\n  hcexpect = [200, 200]\n  status = "+S"')
    (check,) = ctx.health_checks
    check.start()
    assert reactor.tcpClients == []                     # S: never checked
    check.member.flags.discard("S")
    reactor.advance(30)
    answer(reactor, 0, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert "C" in check.member.flags

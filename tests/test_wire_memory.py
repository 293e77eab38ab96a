"""Exact transcripts of the client and backend protocols, in memory, with a fake clock.

The real ProxyContext runs on a MemoryReactorClock: connections are StringTransports,
backend connects are recorded and completed by hand, and time only moves when the test
says so. What the end-to-end tests show with real sockets, these pin down byte for byte.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistproxy.config import loads
from twistproxy.proxy import ProxyContext
from twistproxy.wire.client import ClientFactory

CONFIG = """
[server]
access_log = ""
timeout = 30
keepalive_timeout = 5
header_timeout = 20
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "http://10.9.9.9:8081/base/"
"""


class Harness:
    def __init__(self, text=CONFIG):
        self.reactor = MemoryReactorClock()
        self.ctx = ProxyContext(loads(text), self.reactor, access_log=None)
        self.factory = ClientFactory(self.ctx, "127.0.0.1:8080")

    def client(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        proto.makeConnection(t)
        return proto, t

    def backend(self, index=-1):
        """Complete the recorded connect attempt: returns (protocol, transport)."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        t = StringTransport()
        proto.makeConnection(t)
        return proto, t


def take(t: StringTransport) -> bytes:
    data = t.value()
    t.clear()
    return data


def test_request_and_response_transcript():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET /x/y?q=%2F HTTP/1.1\r\nHost: proxy.test\r\nUser-Agent: t\r\n"
                        b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n")
    assert h.reactor.tcpClients[0][:2] == ("10.9.9.9", 8081)
    backend, bt = h.backend()
    assert take(bt) == (b"GET /base/x/y?q=%2F HTTP/1.1\r\nHost: 10.9.9.9:8081\r\n"
                        b"User-Agent: t\r\nX-Keep: 2\r\nX-Forwarded-For: 127.0.0.1\r\n"
                        b"X-Forwarded-Host: proxy.test\r\nX-Forwarded-Server: proxy.test\r\n"
                        b"X-Forwarded-Proto: http\r\nX-Forwarded-Port: 8080\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 201 Made\r\nServer: iis\r\nKeep-Alive: timeout=5\r\n"
                         b"Content-Length: 5\r\n\r\nhello")
    out = take(ct)
    assert out.startswith(b"HTTP/1.1 201 Made\r\nServer: iis\r\nContent-Length: 5\r\nDate: ")
    assert out.endswith(b"\r\n\r\nhello")
    assert b"Keep-Alive" not in out and not ct.disconnecting
    # the backend connection went back to the pool and serves the next request
    client.dataReceived(b"HEAD /h HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1
    assert take(bt).startswith(b"HEAD /base/h HTTP/1.1\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    out = take(ct)
    assert b"Content-Length: 1234\r\n" in out and out.endswith(b"\r\n\r\n")


def test_chunked_request_rechunked_and_trailers_kept():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n")
    backend, bt = h.backend()
    client.dataReceived(b"2\r\nde\r\n0\r\nX-Sum: 9\r\n\r\n")
    sent = take(bt)
    assert b"Transfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 9\r\n\r\n")


def test_header_timeout_answers_408_and_closes():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")      # never finished
    h.reactor.advance(19.9)
    assert ct.value() == b"" and not ct.disconnecting
    h.reactor.advance(0.2)
    assert ct.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert ct.disconnecting


def test_silent_connection_closed_without_answer():
    h = Harness()
    client, ct = h.client()
    h.reactor.advance(20.1)
    assert ct.value() == b"" and ct.disconnecting


def test_idle_keepalive_timeout():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert take(ct).startswith(b"HTTP/1.1 204 No Content\r\n")
    h.reactor.advance(4.9)
    assert not ct.disconnecting
    h.reactor.advance(0.2)
    assert ct.disconnecting


def test_backend_silent_gives_504():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    h.reactor.advance(29.0)
    assert ct.value() == b""
    h.reactor.advance(1.5)
    assert ct.value().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert bt.disconnecting          # that backend connection is never reused


def test_stale_keepalive_connection_is_retried_once_on_a_new_one():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    take(ct), take(bt)
    client.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert take(bt).startswith(b"GET /base/2 ")
    backend.connectionLost(None)         # the backend had closed it: no byte came back
    assert len(h.reactor.tcpClients) == 2
    backend2, bt2 = h.backend()
    assert take(bt2).startswith(b"GET /base/2 ")
    backend2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert take(ct).endswith(b"\r\n\r\n2")


def test_post_with_body_sent_is_not_replayed():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    take(ct)
    client.dataReceived(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    assert take(bt).endswith(b"\r\n\r\nabc")
    backend.connectionLost(None)
    assert len(h.reactor.tcpClients) == 1
    assert take(ct).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_pipelined_requests_answered_in_order():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.reactor.tcpClients) == 1      # the second waits for the first
    assert ct.producerState == "paused"        # and reading stops meanwhile
    backend, bt = h.backend()
    assert take(bt).startswith(b"GET /base/1 ")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert take(bt).startswith(b"GET /base/2 ")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    out = take(ct)
    assert out.index(b"\r\n\r\n1") < out.index(b"\r\n\r\n2")
    assert ct.producerState == "producing"


def test_backend_extra_bytes_make_connection_unusable():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    out = take(ct)
    assert out.endswith(b"\r\n\r\nok") and b"EXTRA" not in out
    assert bt.disconnecting and not h.ctx.pools[0].idle


def test_head_response_with_length_leaves_connection_reusable():
    h = Harness()
    client, ct = h.client()
    client.dataReceived(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    out = take(ct)
    assert b"Content-Length: 10\r\n" in out and out.endswith(b"\r\n\r\n")
    pool = h.ctx.pools[0]
    assert list(pool.idle) == [backend] and not bt.disconnecting


PING_CONFIG = CONFIG.replace('url = "http://10.9.9.9:8081/base/"',
                             'url = "http://10.9.9.9:8081/base/"\n  ping = 2')


def _warm(h, client, ct):
    """One GET so that the pool holds a kept-alive connection."""
    client.dataReceived(b"GET /w HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    take(ct), take(bt)
    return backend, bt


def test_ping_holds_the_body_until_the_backend_says_100():
    h = Harness(PING_CONFIG)
    client, ct = h.client()
    backend, bt = _warm(h, client, ct)
    client.dataReceived(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    head = take(bt)
    assert head.endswith(b"Expect: 100-continue\r\n\r\n")      # body held back
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert take(bt) == b"hello"
    assert b"100 Continue" not in ct.value()                   # the client did not ask
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert take(ct).startswith(b"HTTP/1.1 200 OK\r\n")


def test_ping_unanswered_put_goes_to_a_fresh_connection():
    h = Harness(PING_CONFIG)
    client, ct = h.client()
    backend, bt = _warm(h, client, ct)
    client.dataReceived(b"PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    take(bt)
    h.reactor.advance(2.1)
    assert bt.disconnecting and len(h.reactor.tcpClients) == 2
    backend2, bt2 = h.backend()
    sent = take(bt2)
    assert b"Expect" not in sent and sent.endswith(b"\r\n\r\nhello")   # fresh: no ping
    backend2.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert take(ct).startswith(b"HTTP/1.1 201 Created\r\n")


def test_ping_unanswered_post_is_503_and_never_sent_again():
    """The POST's head went out: the backend may have acted on it, body or not."""
    h = Harness(PING_CONFIG)
    client, ct = h.client()
    backend, bt = _warm(h, client, ct)
    client.dataReceived(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    take(bt)
    h.reactor.advance(2.1)
    assert bt.disconnecting and len(h.reactor.tcpClients) == 1
    assert take(ct).startswith(b"HTTP/1.1 503 ")


def test_idempotent_put_with_small_body_is_replayed_on_a_new_connection():
    h = Harness()
    client, ct = h.client()
    backend, bt = _warm(h, client, ct)
    client.dataReceived(b"PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    assert take(bt).endswith(b"\r\n\r\nabc")
    backend.connectionLost(None)
    backend2, bt2 = h.backend()
    assert take(bt2).endswith(b"\r\n\r\nabc")


def test_ntlm_401_pins_the_backend_connection_to_the_client_connection():
    h = Harness()
    one, ct1 = h.client()
    two, ct2 = h.client()
    one.dataReceived(b"GET /auth HTTP/1.1\r\nHost: a\r\n\r\n")
    b1, bt1 = h.backend()
    b1.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\n"
                    b"Content-Length: 0\r\n\r\n")
    take(ct1), take(bt1)
    pool = h.ctx.pools[0]
    assert not pool.idle and one.pinned == {pool: b1}
    # another client gets its own connection: the pinned one is not in the pool
    two.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(h.reactor.tcpClients) == 2
    # the first client's next request goes on its pinned connection
    one.dataReceived(b"GET /auth HTTP/1.1\r\nHost: a\r\nAuthorization: NTLM TlRMTVNT\r\n\r\n")
    assert take(bt1).startswith(b"GET /base/auth HTTP/1.1\r\n")
    b1.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert take(ct1).startswith(b"HTTP/1.1 200 OK")
    assert one.pinned == {pool: b1}          # stays pinned until either side closes
    one.connectionLost(None)
    assert bt1.disconnecting


def test_remembered_routing_keeps_an_empty_query_apart_from_none():
    """Routing answers are remembered per (listener, Host, target): "/x?" and "/x" are
    different targets and stay so on the second request."""
    h = Harness()
    client, ct = h.client()
    sent = []
    for target in (b"/x?", b"/x", b"/x?", b"/x"):
        client.dataReceived(b"GET %s HTTP/1.1\r\nHost: proxy.test\r\n\r\n" % target)
        if not sent:
            backend, bt = h.backend()
        sent.append(take(bt).split(b"\r\n", 1)[0])
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert sent[0] != sent[1] and sent[2] == sent[0] and sent[3] == sent[1], sent


def test_routing_on_headers_is_never_remembered():
    h = Harness(CONFIG.replace('''  [[vhost.route]]
  path = "/"''', '''  [[vhost.route]]
  path = "/"
  match_headers = { User-Agent = "MSIE" }
  url = "http://10.9.9.8:8081/old/"
  [[vhost.route]]
  path = "/"'''))
    client, ct = h.client()
    client.dataReceived(b"GET /p HTTP/1.1\r\nHost: proxy.test\r\nUser-Agent: MSIE 6\r\n\r\n")
    old, old_t = h.backend()
    assert take(old_t).startswith(b"GET /old/p HTTP/1.1")
    old.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.dataReceived(b"GET /p HTTP/1.1\r\nHost: proxy.test\r\nUser-Agent: curl\r\n\r\n")
    new, new_t = h.backend()
    assert take(new_t).startswith(b"GET /base/p HTTP/1.1")


# ---------------------------------------------------------------------------
# the balancer timeout's polling (review findings)

POLLING = CONFIG.replace('url = "http://10.9.9.9:8081/base/"', 'url = "balancer://farm/"') + """
[balancer.farm]
timeout = 5
stickysession = "ROUTEID"
{extra}
  [[balancer.farm.member]]
  url = "http://10.9.9.9:8081/"
  route = "a"
  status = "D"
"""


def test_a_client_that_leaves_while_the_balancer_polls_is_logged_once_and_not_answered():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    h = Harness(POLLING.format(extra=""))
    logged = []
    h.ctx.log_access = lambda conn, req: logged.append(req.status)
    client, ct = h.client()
    client.dataReceived(b"GET /x HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert take(ct) == b""                       # waiting for a usable member
    client.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(0.1)
    assert logged == [499] and take(ct) == b""
    assert not h.ctx.runtime.balancer("farm").outage.failing


def test_a_route_cookie_waits_for_a_member_too_unless_nofailover():
    for extra, waits in (("", True), ("nofailover = true", False)):
        h = Harness(POLLING.format(extra=extra))
        client, ct = h.client()
        client.dataReceived(b"GET /x HTTP/1.1\r\nHost: proxy.test\r\n"
                            b"Cookie: ROUTEID=.a\r\n\r\n")
        answered = take(ct)
        assert (answered == b"") is waits, (extra, answered[:40])
        if waits:
            h.reactor.advance(5.1)
            assert take(ct).startswith(b"HTTP/1.1 503 ")

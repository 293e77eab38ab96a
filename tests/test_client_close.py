"""How a client connection ends, in memory with a fake clock: lingering close after an
early answer (lingering_time, lingering_timeout), the client's FIN, abort_on_close.

The end-to-end tests (tests/e2e/test_half_close.py) show the same with real sockets;
these pin down the timers exactly, which real sockets cannot without asserting timings.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from test_wire_memory import CONFIG as WIRE_CONFIG, Harness, take

# test_wire_memory's, with the one route under /app/ (so that other paths get a 404)
CONFIG = WIRE_CONFIG.replace('access_log = ""', 'access_log = ""\n{server}').replace(
    'path = "/"', 'path = "/app/"')

UPLOAD = b"POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100


class HalfClosingTransport(StringTransport):
    """A StringTransport that can shut down its write side, as TCP's can."""

    write_shut = False

    def loseWriteConnection(self):
        self.write_shut = True


def connect(server: str = ""):
    h = Harness(CONFIG.format(server=server))
    logged = []
    h.ctx.log_access = lambda conn, req: logged.append((req.target, req.status))
    proto = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    t = HalfClosingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                             hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    proto.makeConnection(t)
    return h, proto, t, logged


def refused_upload(server: str = ""):
    """A 404 sent while the body is still coming: the connection starts lingering."""
    h, proto, t, logged = connect(server)
    proto.dataReceived(UPLOAD)
    assert take(t).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert t.write_shut and not t.disconnecting      # our FIN, and reading goes on
    proto.writeConnectionLost()                      # (the answer has left)
    return h, proto, t, logged


def test_early_answer_shuts_the_write_side_then_drops_what_comes():
    h, proto, t, logged = refused_upload()
    for _ in range(100):
        proto.dataReceived(b"x" * 65536)             # read and dropped, never kept
    assert t.value() == b"" and not t.disconnecting
    assert logged == [(b"/elsewhere", 404)]


def test_lingering_ends_after_lingering_timeout_without_a_read():
    h, proto, t, _ = refused_upload()
    h.reactor.advance(4.9)
    proto.dataReceived(b"x" * 1000)                  # each read gives it 5 s more
    h.reactor.advance(4.9)
    assert not t.disconnecting
    h.reactor.advance(0.2)
    assert t.disconnecting and not t.disconnected    # closed in order, not reset


def test_lingering_ends_after_lingering_time_however_the_client_sends():
    h, proto, t, _ = refused_upload()
    for _ in range(7):
        h.reactor.advance(4)
        proto.dataReceived(b"x" * 1000)              # 28 s, never 5 s apart
    assert not t.disconnecting
    h.reactor.advance(2.1)                           # 30 s since the answer
    assert t.disconnecting


def test_answer_never_read_is_reset_at_the_end():
    h, proto, t, _ = connect()
    proto.dataReceived(UPLOAD)                       # no writeConnectionLost: not sent
    h.reactor.advance(5.1)
    assert t.disconnected                            # abortConnection


def test_fin_while_lingering_closes_at_once():
    h, proto, t, _ = refused_upload()
    proto.readConnectionLost()
    assert t.disconnecting and not t.disconnected


def test_lingering_time_zero_closes_at_once():
    h, proto, t, _ = connect("lingering_time = 0")
    proto.dataReceived(UPLOAD)
    assert take(t).startswith(b"HTTP/1.1 404 ")
    assert t.disconnecting and not t.write_shut


def test_malformed_body_answer_lingers_too():
    """The parser refused the rest: what the client still sends must not reset it."""
    h, proto, t, _ = connect()
    proto.dataReceived(b"POST /app/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n3\r\nabc\r\nZZ\r\n")
    assert take(t).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert t.write_shut and not t.disconnecting


def test_fin_after_pipelined_requests_answers_each_in_order_then_closes():
    h, proto, t, logged = connect()
    proto.dataReceived(b"GET /app/1 HTTP/1.1\r\nHost: a\r\n\r\n"
                       b"GET /app/2 HTTP/1.1\r\nHost: a\r\n\r\n")
    proto.readConnectionLost()
    backend, bt = h.backend()
    assert take(bt).startswith(b"GET /base/1 HTTP/1.1\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    first = take(t)
    assert first.endswith(b"\r\n\r\none") and b"Connection: close" not in first
    assert take(bt).startswith(b"GET /base/2 HTTP/1.1\r\n")     # same backend connection
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    second = take(t)
    assert second.endswith(b"\r\n\r\ntwo") and b"Connection: close\r\n" in second
    assert t.disconnecting and not t.write_shut      # all was read: no lingering
    assert logged == [(b"/app/1", 200), (b"/app/2", 200)]


def test_early_answer_within_a_read_starts_nothing_after_it():
    """The 404 comes while the same read still holds a bad chunk and a pipelined
    request: neither is answered on a connection that is lingering."""
    h, proto, t, logged = connect()
    proto.dataReceived(b"POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
                       b"okGET /app/x HTTP/1.1\r\nHost: a\r\n\r\n")
    out = take(t)
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 404 ")
    assert h.reactor.tcpClients == [] and logged == [(b"/elsewhere", 404)]


def test_fin_with_nothing_asked_closes_without_a_log_line():
    h, proto, t, logged = connect()
    proto.readConnectionLost()
    assert t.value() == b"" and t.disconnecting and logged == []


def test_abort_on_close_finishes_the_answer_under_way_and_drops_the_rest():
    """abort_on_close: the response already streaming is completed; the pipelined
    request behind it is abandoned (its backend connect cancelled) and logged 499."""
    h, proto, t, logged = connect("abort_on_close = true")
    proto.dataReceived(b"GET /app/a HTTP/1.1\r\nHost: a\r\n\r\n"
                       b"GET /app/b HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    proto.readConnectionLost()
    assert logged == [(b"/app/b", 499)]
    backend.dataReceived(b"cd")
    assert take(t).endswith(b"\r\n\r\nabcd")
    assert t.disconnecting
    assert logged == [(b"/app/b", 499), (b"/app/a", 200)]
    assert len(h.reactor.tcpClients) == 1            # /app/b never went to the backend


def test_client_gone_logs_what_was_queued_once():
    h, proto, t, logged = connect()
    proto.dataReceived(b"GET /app/a HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, bt = h.backend()
    proto.connectionLost(None)                       # reset: nothing more can be sent
    assert logged == [(b"/app/a", 499)]
    assert bt.disconnecting                          # the backend exchange is aborted


def test_fin_behind_a_declined_upgrade_answers_it_then_closes():
    """A FIN while an Upgrade request waits for the backend stays pending (it would
    be a tunnel's half-close); when the backend declines, the answer is relayed and
    then the connection closes."""
    h = Harness(CONFIG.format(server="").replace("http://10.9.9.9", "ws://10.9.9.9"))
    proto, t = h.client()
    proto.dataReceived(b"GET /app/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\n\r\n")
    proto.readConnectionLost()
    assert not t.disconnecting
    backend, bt = h.backend()
    assert b"Upgrade: websocket" in take(bt)
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
    assert take(t).endswith(b"\r\n\r\nno")
    h.reactor.advance(0)                             # what followed the request: nothing
    assert t.disconnecting


# request trailers are bounded like a head (httptools buffers an unfinished field)

CHUNKED = (b"POST /app/p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\n")


def test_a_trailer_field_that_never_ends_is_431_not_a_growing_buffer():
    h, proto, t, logged = connect()
    proto.dataReceived(CHUNKED + b"X-T: ")
    for _ in range(200):                 # 1.6 MB of one trailer value, no CRLF
        proto.dataReceived(b"a" * 8192)
        if t.write_shut:
            break
    assert t.write_shut, "the proxy kept buffering the trailer"
    assert take(t).startswith(b"HTTP/1.1 431 ")
    assert logged == [(b"/app/p", 431)]


def test_too_many_trailer_fields_is_431():
    h, proto, t, logged = connect()
    proto.dataReceived(CHUNKED + b"X-T: v\r\n" * 200 + b"\r\n")
    assert take(t).startswith(b"HTTP/1.1 431 ")


def test_a_body_in_many_chunks_is_not_mistaken_for_trailers():
    h, proto, t, logged = connect()
    proto.dataReceived(b"POST /app/p HTTP/1.1\r\nHost: a\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    backend, bt = h.backend()
    for _ in range(300):                 # chunk-size lines read apart from their data
        proto.dataReceived(b"1000\r\n")
        proto.dataReceived(b"x" * 4096 + b"\r\n")
    proto.dataReceived(b"0\r\nX-Done: 1\r\n\r\n")
    assert t.value() == b"" and not t.write_shut
    assert b"X-Done: 1" in bt.value()

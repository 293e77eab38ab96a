"""The pool's bookkeeping with a fake clock: limits, waiting, ttl, sweeping, sharing."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistproxy.config import loads
from twistproxy.pool import Pool
from twistproxy.workers import Workers, longest, worker_name


class Ex:
    """Stands in for an exchange: records what the pool tells it."""

    def __init__(self):
        self.conn = None
        self.reused = None
        self.failed = None

    def backend_connected(self, conn, reused):
        self.conn, self.reused = conn, reused

    def backend_connect_failed(self, why):
        self.failed = why


def connect(reactor: MemoryReactorClock, index: int = -1):
    """Complete a recorded connectTCP: the connection is established."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    proto.makeConnection(StringTransport())
    return proto


def pool(reactor, **kw) -> Pool:
    return Pool(reactor, "10.0.0.1", 8080, **kw)


def test_lazy_connect_then_reuse_most_recent_first():
    r = MemoryReactorClock()
    p = pool(r)
    assert r.tcpClients == []                 # nothing until asked
    a, b = Ex(), Ex()
    p.acquire(a)
    p.acquire(b)
    ca, cb = connect(r, 0), connect(r, 1)
    assert a.conn is ca and a.reused is False and b.conn is cb
    assert p.stats()["open"] == 2 and p.stats()["busy"] == 2
    p.release(ca)
    p.release(cb)
    c = Ex()
    p.acquire(c)
    assert c.conn is cb and c.reused is True   # LIFO: the oldest ages out
    assert len(r.tcpClients) == 2 and p.reused == 1
    assert "open=2 idle=1 busy=1" in repr(p)


def test_backend_closing_an_idle_connection_drops_it():
    r = MemoryReactorClock()
    p = pool(r)
    a = Ex()
    p.acquire(a)
    conn = connect(r)
    p.release(conn)
    conn.connectionLost(None)
    assert p.stats()["idle"] == 0 and p.stats()["open"] == 0
    b = Ex()
    p.acquire(b)
    assert b.conn is None and len(r.tcpClients) == 2     # a new connect, not the dead one


def test_max_makes_requests_wait_then_hands_over_in_order():
    r = MemoryReactorClock()
    p = pool(r, max=2)
    exs = [Ex() for _ in range(4)]
    for e in exs:
        p.acquire(e)
    assert len(r.tcpClients) == 2 and p.stats()["waiting"] == 2
    c0, c1 = connect(r, 0), connect(r, 1)
    p.release(c0)
    assert exs[2].conn is c0 and exs[2].reused
    c1.reusable = False                       # not reusable: closed, a new one connects
    p.release(c1)
    c1.connectionLost(None)
    assert len(r.tcpClients) == 3
    assert connect(r, 2) is exs[3].conn
    assert p.stats()["waiting"] == 0


def test_acquire_timeout_fails_the_waiter():
    r = MemoryReactorClock()
    p = pool(r, max=1, acquire=0.5)
    a, b = Ex(), Ex()
    p.acquire(a)
    p.acquire(b)
    r.advance(0.4)
    assert b.failed is None
    r.advance(0.2)
    assert "no free connection within acquire=0.5s" in b.failed
    assert p.stats()["waiting"] == 0


def test_cancelled_waiter_is_forgotten():
    r = MemoryReactorClock()
    p = pool(r, max=1)
    a, b, c = Ex(), Ex(), Ex()
    p.acquire(a)
    p.acquire(b)
    p.acquire(c)
    p.cancel(b)
    conn = connect(r)
    p.release(conn)
    assert b.conn is None and c.conn is conn


def test_ttl_old_idle_connection_is_not_reused():
    r = MemoryReactorClock()
    p = pool(r, ttl=10)
    a = Ex()
    p.acquire(a)
    conn = connect(r)
    p.release(conn)
    r.advance(11)
    b = Ex()
    p.acquire(b)
    assert b.conn is None and conn.transport.disconnecting
    assert len(r.tcpClients) == 2


def test_sweep_closes_idle_above_smax_older_than_ttl():
    r = MemoryReactorClock()
    p = pool(r, max=10, smax=1, ttl=5)
    exs = [Ex() for _ in range(3)]
    for e in exs:
        p.acquire(e)
    conns = [connect(r, i) for i in range(3)]
    for c in conns:
        p.release(c)
    r.advance(3)
    p.sweep()
    assert p.stats()["idle"] == 3              # not old enough yet
    r.advance(3)
    p.sweep()
    assert [c.transport.disconnecting for c in conns] == [True, True, False]
    assert p.stats()["idle"] == 1              # smax kept


def test_disablereuse_closes_after_each_request():
    r = MemoryReactorClock()
    p = pool(r, reuse=False)
    a = Ex()
    p.acquire(a)
    conn = connect(r)
    p.release(conn)
    assert conn.transport.disconnecting and p.stats()["idle"] == 0


def test_failed_connect_counts_and_reports():
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    r = MemoryReactorClock()
    p = pool(r)
    a = Ex()
    p.acquire(a)
    factory = r.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert a.failed == "connection refused" and p.failed == 1 and p.opening == 0


def _config(routes: str):
    return loads(f"""
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "x"
{routes}
""")


def test_worker_sharing_by_prefix_ignores_later_parameters():
    cfg = _config("""
[[vhost.route]]
path = "/apps"
url = "http://b:8000/"
timeout = 60
[[vhost.route]]
path = "/ex"
url = "http://b:8000/ex"
timeout = 10
""")
    w = Workers(MemoryReactorClock(), cfg.server)
    r0, r1 = cfg.vhosts[0].routes
    p0 = w.define(r0.url, r0.worker, "r0")
    p1 = w.define(r1.url, r1.worker, "r1")
    assert p0 is p1 and p1.timeout == 60


def test_longer_url_first_gives_two_workers_and_longest_prefix_wins():
    cfg = _config("""
[[vhost.route]]
path = "/ex"
url = "http://b:8000/ex"
timeout = 10
[[vhost.route]]
path = "/"
url = "http://B:8000/"
timeout = 60
""")
    w = Workers(MemoryReactorClock(), cfg.server)
    r0, r1 = cfg.vhosts[0].routes
    p_ex = w.define(r0.url, r0.worker, "r0")
    p_all = w.define(r1.url, r1.worker, "r1")
    assert p_ex is not p_all
    candidates = w.candidates(r1.url)
    assert longest(candidates, "http://b:8000/ex/1") is p_ex
    assert longest(candidates, "http://b:8000/other") is p_all
    assert worker_name(r1.url) == "http://b:8000/"


def test_regex_template_worker_name_stops_at_the_substitution():
    cfg = _config("""
[[vhost.route]]
regex = "^/x/(.*)$"
url = "http://b/app/$1?q=1"
""")
    assert worker_name(cfg.vhosts[0].routes[0].url) == "http://b/app/"


def test_forward_proxy_workers_are_forgotten_once_their_connections_are_gone():
    from twistproxy.config import BackendURL, ServerConfig
    from twistproxy.workers import FORWARD_TTL
    reactor = MemoryReactorClock()
    workers = Workers(reactor, ServerConfig())
    url = BackendURL("http", "origin.test", 80, "", "")
    p = workers.forward_pool(url, "http://origin.test/", "vhost[0]")
    assert workers.forward_pool(url, "http://origin.test/", "vhost[0]") is p          # one per origin
    assert p.ttl == FORWARD_TTL and workers.by_origin["http://origin.test"] == [
        ("http://origin.test", p)]
    ex = Ex()
    p.acquire(ex)
    conn = connect(reactor)
    workers.sweep_forward()                                    # a connect under way, busy
    assert "http://origin.test" in workers.forward
    p.release(conn)                                            # idle now
    workers.sweep_forward()
    assert "http://origin.test" in workers.forward
    reactor.advance(FORWARD_TTL + 1)
    p.sweep()                                                  # idle past ttl: closed
    conn.connectionLost(None)
    assert p.open == 0
    workers.sweep_forward()
    assert "http://origin.test" not in workers.forward
    assert "http://origin.test" not in workers.by_origin
    assert workers.forward_pool(url, "http://origin.test/", "vhost[0]") is not p      # a new one next time


# ---------------------------------------------------------------------------
# the peek before reusing a connection for a request that must not be sent twice


class SocketTransport(StringTransport):
    """A StringTransport with a real socket under it, for the pool's peek."""

    def __init__(self, sock):
        super().__init__()
        self.socket = sock


def idle_on_socketpair(r):
    """A pool with one idle connection whose socket is one end of a real pair."""
    import socket
    p = pool(r)
    ours, backend = socket.socketpair()
    ours.setblocking(False)
    p.acquire(Ex())
    host, port, factory, _, _ = r.tcpClients[0]
    conn = factory.buildProtocol(IPv4Address("TCP", host, port))
    conn.makeConnection(SocketTransport(ours))
    p.release(conn)
    return p, conn, backend


def test_connection_the_backend_closed_unread_is_not_handed_to_a_post():
    """The backend's FIN arrived but the reactor has not read it yet: the peek sees
    it, the connection is dropped and a new one is connected instead."""
    r = MemoryReactorClock()
    p, conn, backend = idle_on_socketpair(r)
    backend.close()
    post = Ex()
    p.acquire(post, check_open=True)
    assert post.conn is None and len(r.tcpClients) == 2
    assert p.stats()["stale"] == 1 and conn.transport.disconnecting


def test_peek_leaves_an_open_connection_and_its_bytes_alone():
    r = MemoryReactorClock()
    p, conn, backend = idle_on_socketpair(r)
    post = Ex()
    p.acquire(post, check_open=True)
    assert post.conn is conn and post.reused is True and p.stats()["stale"] == 0
    backend.close()


def test_bytes_nobody_asked_for_make_an_idle_connection_untrusted():
    r = MemoryReactorClock()
    p, conn, backend = idle_on_socketpair(r)
    backend.sendall(b"HTTP/1.1 200 OK\r\n")
    post = Ex()
    p.acquire(post, check_open=True)
    assert post.conn is None and p.stats()["stale"] == 1
    backend.close()


def test_idempotent_requests_skip_the_peek_and_rely_on_the_retry():
    r = MemoryReactorClock()
    p, conn, backend = idle_on_socketpair(r)
    backend.close()
    get = Ex()
    p.acquire(get)
    assert get.conn is conn and get.reused is True


def test_a_standalone_worker_with_minus_i_enters_error_state_again_after_retry():
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    r = MemoryReactorClock()
    r.advance(1000)                  # (error_time 0.0 means "not in error")
    p = pool(r, retry=10, ignore_errors=False)

    def refused_request():
        ex = Ex()
        p.acquire(ex)
        if len(r.tcpClients) > refused_request.connects:
            refused_request.connects += 1
            _, _, factory, _, _ = r.tcpClients[-1]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        return ex.failed
    refused_request.connects = 0
    assert refused_request() == "connection refused"            # t=0: error state
    r.advance(5)
    assert "in error state" in refused_request()                 # no connect
    r.advance(6)                                                 # t=11: retry passed
    assert refused_request() == "connection refused"             # tried, failed again
    r.advance(4)
    assert "in error state" in refused_request(), "the second error period never began"
    assert refused_request.connects == 2


def test_over_tls_a_pending_record_is_a_ticket_but_an_alert_is_the_close():
    r = MemoryReactorClock()
    p, conn, backend = idle_on_socketpair(r)
    p.tls = True
    backend.sendall(b"\x17\x03\x03")     # application data (a TLS 1.3 session ticket)
    first = Ex()
    p.acquire(first, check_open=True)
    assert first.conn is conn, "a session ticket made the connection look closed"
    p.release(conn)
    r2 = MemoryReactorClock()
    p2, conn2, backend2 = idle_on_socketpair(r2)
    p2.tls, p2.tls_options = True, (lambda sni: None)
    backend2.sendall(b"\x15\x03\x03")    # an alert: close_notify before the FIN
    post = Ex()
    p2.acquire(post, check_open=True)
    assert post.conn is None and p2.stats()["stale"] == 1 and len(r2.sslClients) == 1
    backend.close()
    backend2.close()

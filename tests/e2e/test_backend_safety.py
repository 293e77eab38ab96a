"""Backend-side safety: what must never happen twice, and whose login nobody else sees.

Transcripts against scripted backends that misbehave the way real ones do (a
kept-alive connection closed as the request arrives, a dying process that closes
every connection unanswered, a refused port, a silent backend), counting how many
times each request reached a backend and the exact status its client got; then an
IIS-like backend with connection-based Windows authentication (NTLM and Kerberos
via Negotiate), where no response may ever carry another user's identity.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter

import pytest

from clients import HOST, HTTPClient
from scripted import (Wire, close_idle_after, in_threads, kill_second_request, lab_fixture,
                      route, serve)

lab = pytest.fixture(lab_fixture)

RETRY_LINE = "sending again on a new one"

# (method, body): every way a request may or may not carry a body
IDEMPOTENT = [("GET", None), ("HEAD", None), ("OPTIONS", None), ("TRACE", None),
              ("DELETE", None), ("PUT", b"x" * 300), ("PUT", b"")]
NON_IDEMPOTENT = [("POST", None), ("POST", b""), ("POST", b"order=1"), ("PATCH", None),
                  ("PATCH", b"op=1")]


def farm(*urls: str, **params) -> str:
    out = ["[balancer.farm]"] + [f"{k} = {v!r}" for k, v in params.items()]
    for url in urls:
        out += ["[[balancer.farm.member]]", f'url = "{url}"']
    return "\n".join(out) + "\n"


def seen(backends, seq: int) -> int:
    """How many times the request with X-Seq: seq reached any of these backends."""
    return sum(len(b.tracker.seen(str(seq))) for b in backends)


def dying(w: Wire):
    """A process on its way down: it accepts, reads the request, closes unanswered."""
    w.head()


def refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))        # bound, never listening: connections are refused
    port = s.getsockname()[1]
    refused_url.keep.append(s)
    return f"http://127.0.0.1:{port}"


refused_url.keep = []


def send(c: HTTPClient, seq: int, method: str, body: bytes | None, chunked: bool = False):
    headers = [("X-Seq", str(seq))]
    if chunked:
        c.sendall(f"{method} /r{seq} HTTP/1.1\r\nHost: {HOST}\r\nX-Seq: {seq}\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode())
        return c.response(method)
    return c.call(method, f"/r{seq}", headers, body)


# ---------------------------------------------------------------------------
# one backend: a kept-alive connection closed as the request arrives


@pytest.mark.parametrize("method,body", IDEMPOTENT)
def test_idempotent_request_on_a_connection_closed_unanswered_is_sent_again_once(
        lab, method, body):
    b = lab.backend(kill_second_request("close"))
    p = lab.proxy(route("/", b.url + "/"))
    c = HTTPClient(p.port)
    assert c.get("/warm-up").status == 200
    r = send(c, 1, method, body)
    assert (r.status, seen([b], 1)) == (200, 2), "the stale keep-alive race showed"
    assert p.log_lines(RETRY_LINE)


@pytest.mark.parametrize("method,body", NON_IDEMPOTENT)
def test_non_idempotent_request_on_a_connection_closed_unanswered_is_never_sent_twice(
        lab, method, body):
    """The backend read the request, then closed: it may have acted on it, body or
    no body. The client gets 502 and the log says why it was not sent again."""
    b = lab.backend(kill_second_request("close"))
    p = lab.proxy(route("/", b.url + "/"))
    c = HTTPClient(p.port)
    assert c.get("/warm-up").status == 200
    r = send(c, 1, method, body)
    assert (r.status, seen([b], 1)) == (502, 1), f"{method} reached the backend " \
        f"{seen([b], 1)} times"
    p.wait_for_line(f"{method} is not idempotent: not sent again", "-> 502")
    assert RETRY_LINE not in p.log()
    assert b.tracker.accepted == 1


def test_empty_chunked_put_sent_again_carries_its_last_chunk(lab):
    """A retried empty chunked body is just its last chunk: it must go again, or the
    backend waits for it and the client gets a 504 after the timeout."""
    b = lab.backend(kill_second_request("close"))
    p = lab.proxy(route("/", b.url + "/", timeout=30))
    c = HTTPClient(p.port, timeout=5)
    assert c.get("/warm-up").status == 200
    r = send(c, 1, "PUT", None, chunked=True)
    assert (r.status, seen([b], 1)) == (200, 2)
    assert b.tracker.seen("1")[1].body == b""


def test_empty_chunked_post_on_a_connection_closed_unanswered_is_502_at_once(lab):
    b = lab.backend(kill_second_request("close"))
    p = lab.proxy(route("/", b.url + "/", timeout=30))
    c = HTTPClient(p.port, timeout=5)                # a hang would time out here
    assert c.get("/warm-up").status == 200
    r = send(c, 1, "POST", None, chunked=True)
    assert (r.status, seen([b], 1)) == (502, 1)


# ---------------------------------------------------------------------------
# one backend: other failure timings, the same for every method


@pytest.mark.parametrize("method,body", [("GET", None), ("POST", None), ("POST", b"a=1")])
def test_new_connection_closed_unanswered_is_502_and_sent_once(lab, method, body):
    b = lab.backend(dying)
    p = lab.proxy(route("/", b.url + "/"))
    r = send(HTTPClient(p.port), 1, method, body)
    assert (r.status, seen([b], 1)) == (502, 1)


@pytest.mark.parametrize("method,body", [("GET", None), ("POST", None), ("POST", b"a=1")])
def test_connection_cut_after_the_status_line_began_is_502_and_sent_once(lab, method, body):
    b = lab.backend(kill_second_request("partial"))
    p = lab.proxy(route("/", b.url + "/"))
    c = HTTPClient(p.port)
    assert c.get("/warm-up").status == 200
    r = send(c, 1, method, body)
    assert (r.status, seen([b], 1)) == (502, 1)


@pytest.mark.parametrize("method,body", [("GET", None), ("POST", None)])
def test_silent_backend_is_504_and_sent_once(lab, method, body):
    b = lab.backend(kill_second_request("silent"))
    p = lab.proxy(route("/", b.url + "/", timeout=1))
    c = HTTPClient(p.port)
    assert c.get("/warm-up").status == 200
    r = send(c, 1, method, body)
    assert (r.status, seen([b], 1)) == (504, 1)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_refused_backend_is_503_and_never_reached(lab, method):
    p = lab.proxy(route("/", refused_url() + "/"))
    r = send(HTTPClient(p.port), 1, method, b"a=1" if method == "POST" else None)
    assert r.status == 503


# ---------------------------------------------------------------------------
# a balancer of two


@pytest.mark.parametrize("method,body,status,times", [
    ("GET", None, 200, 2), ("PUT", b"v=1", 200, 2), ("DELETE", None, 200, 2),
    ("POST", None, 502, 1), ("POST", b"a=1", 502, 1), ("PATCH", None, 502, 1)])
def test_balancer_kept_alive_connection_closed_unanswered(lab, method, body, status, times):
    """Both members close a kept-alive connection as the request arrives: an
    idempotent request goes once more on a new connection; a POST goes nowhere
    else. Neither member is put in error state by one closed connection."""
    m1 = lab.backend(kill_second_request("close"))
    m2 = lab.backend(kill_second_request("close"))
    p = lab.proxy(route("/", "balancer://farm/"), extra=farm(m1.url, m2.url))
    c = HTTPClient(p.port)
    assert c.get("/warm-1").status == 200 and c.get("/warm-2").status == 200
    r = send(c, 1, method, body)
    assert (r.status, seen([m1, m2], 1)) == (status, times), \
        f"{method}: {seen([m1, m2], 1)} times, {r.status}"
    assert "in error state" not in p.log(), p.log()
    # both members still take requests, in turn
    for i in range(4):
        assert HTTPClient(p.port).get(f"/after{i}").status == 200
    for m in (m1, m2):
        assert len({x.target for x in m.tracker.requests
                    if x.target.startswith("/after")}) == 2, "a member was left out"


def dies_when(state: dict):
    """Serves while state["dead"] is false; then closes every request unanswered, on
    its kept-alive connections and on new ones alike (a member going down)."""
    def behaviour(w: Wire):
        while True:
            req = w.request()
            if req is None or state["dead"]:
                return
            w.reply(req)
    return behaviour


@pytest.mark.parametrize("method,body,status,times", [
    ("GET", None, 502, 4), ("POST", None, 502, 1), ("PATCH", None, 502, 1)])
def test_balancer_of_two_going_down_sees_a_post_once_not_four_times(
        lab, method, body, status, times):
    """Both members go down with kept-alive connections in the pool: a GET may try
    each member's kept-alive connection and a new one (four sends, all answered by a
    close); a POST reaches the first member once and nothing else."""
    state = {"dead": False}
    m1, m2 = lab.backend(dies_when(state)), lab.backend(dies_when(state))
    p = lab.proxy(route("/", "balancer://farm/"), extra=farm(m1.url, m2.url))
    c = HTTPClient(p.port)
    assert c.get("/warm-1").status == 200 and c.get("/warm-2").status == 200
    state["dead"] = True
    r = send(c, 1, method, body)
    assert (r.status, seen([m1, m2], 1)) == (status, times), \
        f"{method}: {seen([m1, m2], 1)} times, {r.status}"
    assert "in error state" not in p.log(), "closed connections put a member in error"


@pytest.mark.parametrize("method,body,status,times", [
    ("GET", None, 200, 2), ("HEAD", None, 200, 2), ("POST", None, 502, 1),
    ("POST", b"a=1", 502, 1), ("PATCH", b"op=1", 502, 1)])
def test_balancer_member_closing_new_connections_unanswered(lab, method, body, status, times):
    """A dying member: an idempotent request fails over to the other member (once
    there, twice in all); a POST that reached it is not sent to the other one."""
    dead = lab.backend(dying)
    alive = lab.backend(serve())
    p = lab.proxy(route("/", "balancer://farm/"), extra=farm(dead.url, alive.url))
    r = send(HTTPClient(p.port), 1, method, body)
    assert (r.status, seen([dead], 1), seen([alive], 1)) == \
        (status, 1, times - 1), (method, r)
    assert "in error state" not in p.log(), p.log()


@pytest.mark.parametrize("method,body", [("GET", None), ("POST", None), ("POST", b"a=1")])
def test_balancer_refused_member_fails_over_for_every_method(lab, method, body):
    """A refused connect never carried a byte: even a POST goes to the other member,
    once, and the refusing member is in error state for `retry` seconds."""
    dead = refused_url()
    alive = lab.backend(serve())
    p = lab.proxy(route("/", "balancer://farm/"), extra=farm(dead, alive.url))
    r = send(HTTPClient(p.port), 1, method, body)
    assert (r.status, seen([alive], 1)) == (200, 1)
    p.wait_for_line(f"member {dead} in error state", "connection refused")


# ---------------------------------------------------------------------------
# many POSTs against a backend with a short keep-alive timeout


def test_posts_with_ttl_below_the_backends_keepalive_timeout_never_fail(lab):
    """The backend closes a connection idle for 50-100 ms and clients pause up to
    120 ms; with ttl = 0.02 the proxy never reuses a connection that old, and the
    peek catches a close it has not read yet: no POST fails, none is sent twice."""
    b = lab.backend(close_idle_after(0.05, 0.1))
    p = lab.proxy(route("/", b.url + "/", ttl=0.02))
    results = in_threads(6, lambda i: _post_loop(p.port, i, 30, pause=0.12))
    assert results == [{200: 30}] * 6, results
    assert _max_times_seen(b) == 1


def test_posts_crossing_the_backends_close_are_502_never_sent_twice(lab):
    """One request in five on a kept-alive connection arrives as the backend closes
    it: each such POST is a 502 for its client, and no POST reaches the backend
    twice."""
    b = lab.backend(close_idle_after(0.01, 0.05, race=0.2))
    p = lab.proxy(route("/", b.url + "/"))
    results = in_threads(6, lambda i: _post_loop(p.port, i, 40, pause=0.06))
    total = sum(results, start=Counter())
    assert set(total) <= {200, 502}, total
    assert total[502] >= 1, "no POST crossed a close: no test"
    assert _max_times_seen(b) == 1
    assert RETRY_LINE not in p.log()


def _post_loop(port: int, i: int, n: int, pause: float) -> Counter:
    """n POSTs on one keep-alive client connection (a new one after a close), with
    random pauses; the statuses it got, and client-side errors."""
    rnd = random.Random(i)
    statuses: Counter = Counter()
    c = HTTPClient(port)
    for k in range(n):
        try:
            # bodyless and with a body, alternately: neither may be sent twice
            r = c.call("POST", f"/c{i}/{k}", [("X-Seq", f"{i}.{k}")],
                       b"p" * 200 if k % 2 else None)
            statuses[r.status] += 1
            if r.header("connection") == "close":
                c.close()
                c = HTTPClient(port)
        except (OSError, EOFError) as e:
            statuses[repr(e)] += 1
            c.close()
            c = HTTPClient(port)
        time.sleep(rnd.uniform(0.0, pause))
    c.close()
    return statuses


def _max_times_seen(b) -> int:
    counts = Counter(r.header("x-seq") for r in b.tracker.requests if r.method == "POST")
    return max(counts.values())


# ---------------------------------------------------------------------------
# Windows authentication: a backend connection authenticated for one user


def iis_windows_auth(w: Wire):
    """Models IIS with Windows authentication, which is connection-based: NTLM
    always, Kerberos too (authPersistNonNTLM). `Negotiate user:NAME` or
    `NTLM user:NAME` authenticates the connection at once (a pre-emptive login);
    `NTLM type1:NAME` is challenged with a 401 and `NTLM type3:NAME` then accepted
    on the same connection. A request without Authorization is answered as the
    connection's user, or as anonymous."""
    user = challenged = None
    while True:
        req = w.request()
        if req is None:
            return
        scheme, _, token = (req.header("authorization") or "").partition(" ")
        kind, _, name = token.partition(":")
        if scheme in ("Negotiate", "NTLM") and kind == "user":
            user = name
        elif scheme == "NTLM" and kind == "type1":
            challenged = name
            w.reply(req, 401, b"", [("WWW-Authenticate", "NTLM challenge:" + name)])
            continue
        elif scheme == "NTLM" and kind == "type3" and challenged == name:
            user = name
        w.reply(req, 200, f"user={user or 'anonymous'}".encode())


def _login(c: HTTPClient, name: str, how: str):
    if how == "ntlm-3-leg":
        r = c.get("/login", ("Authorization", f"NTLM type1:{name}"))
        assert r.status == 401, r
        r = c.get("/login", ("Authorization", f"NTLM type3:{name}"))
    else:
        scheme = "Negotiate" if how == "negotiate" else "NTLM"
        r = c.get("/login", ("Authorization", f"{scheme} user:{name}"))
    assert (r.status, r.body) == (200, f"user={name}".encode()), r


@pytest.mark.parametrize("how", ["negotiate", "ntlm"])
def test_preemptive_login_is_never_served_to_an_anonymous_client(lab, how):
    """Authorization: Negotiate (Kerberos) or NTLM up front, answered 200 at once:
    the backend connection is now that user's, and must not go back to the pool,
    where the pool hands out the newest idle connection first."""
    b = lab.backend(iis_windows_auth)
    p = lab.proxy(route("/", b.url + "/"))
    alice, anonymous = HTTPClient(p.port), HTTPClient(p.port)
    assert anonymous.get("/").body == b"user=anonymous"
    _login(alice, "alice", how)
    for i in range(3):
        assert anonymous.get(f"/page{i}").body == b"user=anonymous", "alice's login leaked"
        r = alice.get(f"/page{i}")
        assert r.body == b"user=alice" and r.conn == alice_conn(b, "alice"), r


def alice_conn(b, name: str) -> int:
    return next(x.cid for x in b.tracker.requests
                if name in (x.header("authorization") or ""))


def test_twenty_users_and_anonymous_load_never_see_another_identity(lab):
    """20 users log in at once, each on its own client connection and each by one of
    the three ways, then browse; four anonymous clients browse beside them. Every
    response carries the identity of the client that asked, or anonymous."""
    b = lab.backend(iis_windows_auth)
    p = lab.proxy(route("/", b.url + "/"))
    ways = ["negotiate", "ntlm", "ntlm-3-leg"]
    stop = threading.Event()

    def user(i):
        name = f"user{i}"
        c = HTTPClient(p.port)
        _login(c, name, ways[i % 3])
        wrong = [r.body for r in (c.get(f"/u{i}/{k}") for k in range(25))
                 if r.body != f"user={name}".encode()]
        c.close()
        return wrong

    def anonymous(i):
        wrong, c = [], HTTPClient(p.port)
        while not stop.is_set():
            body = c.get(f"/anon{i}").body
            if body != b"user=anonymous":
                wrong.append(body)
        c.close()
        return wrong

    anon = [threading.Thread(target=lambda i=i: anon_results.append(anonymous(i)))
            for i in range(4)]
    anon_results: list = []
    for t in anon:
        t.start()
    try:
        results = in_threads(20, user)
    finally:
        stop.set()
        for t in anon:
            t.join(30)
    assert results == [[]] * 20, results
    assert anon_results == [[]] * 4, anon_results


def test_pinned_connection_is_closed_with_its_client_and_counts_against_max(lab):
    """With max = 1, a user's pinned connection is the only one: an anonymous client
    waits (acquire) and gets 503 rather than the user's connection; once the user
    leaves, its backend connection is closed, not pooled, and the anonymous client
    is served on a new one."""
    b = lab.backend(iis_windows_auth)
    p = lab.proxy(route("/", b.url + "/", max=1, acquire=0.5))
    alice = HTTPClient(p.port)
    _login(alice, "alice", "negotiate")
    pinned = alice_conn(b, "alice")
    assert HTTPClient(p.port).get("/").status == 503
    alice.close()
    assert b.tracker.wait(lambda: pinned in b.tracker.closed, 3.0), \
        "the pinned connection outlived its client"
    r = HTTPClient(p.port).get("/")
    assert (r.status, r.body) == (200, b"user=anonymous") and r.conn != pinned, r


def test_pinned_user_stays_on_its_member_and_connection_through_a_balancer(lab):
    """byrequests would alternate; a logged-in client stays on the member and the
    connection its login went to, while others still spread over both."""
    m1, m2 = lab.backend(iis_windows_auth), lab.backend(iis_windows_auth)
    p = lab.proxy(route("/", "balancer://farm/"), extra=farm(m1.url, m2.url))
    alice = HTTPClient(p.port)
    _login(alice, "alice", "negotiate")
    home = m1 if any("alice" in (x.header("authorization") or "")
                     for x in m1.tracker.requests) else m2
    for i in range(6):
        r = alice.get(f"/a{i}")
        assert r.body == b"user=alice", r
    assert len([x for x in home.tracker.requests if x.target.startswith("/a")]) == 6
    bodies = {HTTPClient(p.port).get(f"/o{i}").body for i in range(4)}
    assert bodies == {b"user=anonymous"}
    assert all(len([x for x in m.tracker.requests if x.target.startswith("/o")]) == 2
               for m in (m1, m2))

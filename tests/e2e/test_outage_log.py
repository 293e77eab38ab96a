"""A dead backend is one log line, not thousands: the error log over a real outage.

A backend that refuses connections (bound, not listening) while clients keep asking,
then comes up: every request gets its access-log line, and the error log says the
outage began, how it went on every `retry` seconds, and that it ended. Then Apache's
error state for a standalone worker, which is off unless the route says
`status = "-I"` (as ProxyPass workers have implicit status I since Apache 2.4.21).
"""

from __future__ import annotations

import http.client
import threading
import time

import pytest

from clients import HOST, HTTPClient
from scripted import lab_fixture, route, serve

lab = pytest.fixture(lab_fixture)

DOWN_FOR = 2.5


def hammer(port: int, stop: threading.Event, statuses: list) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        try:
            c.request("GET", "/x", headers={"Host": HOST})
            r = c.getresponse()
            r.read()
            statuses.append(r.status)
        except (OSError, http.client.HTTPException) as e:
            statuses.append(repr(e))
            c.close()
    c.close()


def test_an_outage_under_load_is_a_handful_of_lines_and_every_request_is_logged(lab):
    late = lab.late(serve())
    p = lab.proxy(route("/", late.url + "/", retry=1))
    stop, statuses = threading.Event(), []
    threads = [threading.Thread(target=hammer, args=(p.port, stop, statuses))
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(DOWN_FOR)
        late.start()                            # the backend comes back
        time.sleep(1.0)
        failed_before_up = statuses.count(503)
        p.wait_for_line("recovered", timeout=5.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failed_before_up >= 100, f"only {failed_before_up} requests failed: no outage"
    assert set(statuses) == {200, 503}, "a client saw a connection error"
    assert statuses[-1] == 200
    about = p.log_lines(f"backend {late.url}")       # its first line, summaries, the end
    began = [line for line in about if line.endswith("connection refused -> 503")]
    assert len(began) == 1, about
    summaries = p.log_lines("still failing")
    assert 1 <= len(summaries) <= DOWN_FOR / 1 + 2, about
    assert len(p.log_lines("recovered")) == 1
    assert len(about) <= len(summaries) + 2, about
    assert sum(int(s.split("still failing: ")[1].split()[0]) for s in summaries) + 1 == \
        statuses.count(503), "the summaries do not add up to the failed requests"
    # the access log still has every request, failed or not
    # (the access log is flushed in batches: wait for the last ones)
    access = p.wait_for_access_lines(len(statuses), '"GET /x HTTP/1.1"')
    assert len(access) == len(statuses), "a request logged twice"
    logged = [line.split('"GET /x HTTP/1.1" ')[1].split()[0] for line in access]
    assert logged.count("503") == statuses.count(503)


def test_a_balancer_with_no_usable_member_is_one_line_per_interval(lab):
    late1, late2 = lab.late(serve()), lab.late(serve())
    p = lab.proxy(route("/", "balancer://farm/"),
                  extra=f'[balancer.farm]\nforcerecovery = false\n'
                        f'[[balancer.farm.member]]\nurl = "{late1.url}"\nretry = 30\n'
                        f'[[balancer.farm.member]]\nurl = "{late2.url}"\nretry = 30\n')
    c = HTTPClient(p.port)
    statuses = [c.get(f"/n{i}").status for i in range(300)]
    assert statuses == [503] * 300
    assert len(p.log_lines("no usable member -> 503")) == 1, p.log()
    assert len(p.log_lines("in error state for 30s")) == 2, p.log()


def test_a_standalone_worker_is_tried_on_every_request_by_default(lab):
    """Apache 2.4.21+ gives ProxyPass workers status I: a restarted backend serves the
    very next request (checked against Apache 2.4.71)."""
    late = lab.late(serve())
    p = lab.proxy(route("/", late.url + "/", retry=60))
    assert HTTPClient(p.port).get("/x").status == 503
    late.start()
    assert HTTPClient(p.port).get("/y").status == 200


def test_status_minus_i_puts_a_standalone_worker_in_error_for_retry_seconds(lab):
    late = lab.late(serve())
    p = lab.proxy(route("/", late.url + "/", retry=60, status="-I"))
    assert HTTPClient(p.port).get("/x").status == 503
    p.wait_for_line(f"backend {late.url}", "in error state for 60s", "connection refused")
    late.start()
    r = HTTPClient(p.port).get("/y")
    assert r.status == 503 and late.tracker.accepted == 0, "tried before retry had passed"


def test_status_minus_i_with_retry_0_tries_every_request(lab):
    late = lab.late(serve())
    p = lab.proxy(route("/", late.url + "/", retry=0, status="-I"))
    assert HTTPClient(p.port).get("/x").status == 503
    late.start()
    assert HTTPClient(p.port).get("/y").status == 200

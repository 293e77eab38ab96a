"""The Windows service end to end, through an emulated service manager on Linux.

pywin32 is replaced by the stand-ins of winstandins.py and the service host by its
driver (a subprocess on Twisted's select reactor, Windows's default); the service in
between is the real one: twistproxy/windows/service.py and runner.py, a real
configuration file, real listeners and a real echo backend. Read as a transcript:
what the service manager sees (statuses, the event log), what a client sees, and what
the files named in the configuration hold.
"""

from __future__ import annotations

import socket
import threading
import time

from clients import fetch
from harness import Lab, free_port, read_head, wait_until
from winstandins import ServiceProcess, service_config

STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_service_serves_and_a_stop_lets_the_slow_request_finish(tmp_path):
    with Lab(tmp_path) as lab:
        echo = lab.echo("win-backend")
        port = free_port()
        (tmp_path / "logs").mkdir()
        config = tmp_path / "edge.toml"
        # a slow request is in flight when the service manager stops the service: the
        # backend holds it until the service has reported its stop's progress twice
        arrived, release = threading.Event(), threading.Event()

        def hold(conn):
            read_head(conn)
            arrived.set()
            release.wait(20)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        slow_backend = lab.raw(hold)
        config.write_text(service_config(
            port, echo.url, access_log="logs/access.log", graceful_timeout=6,
            server='error_log = "logs/service.log"',
            extra=f'[[vhost]]\nserver_name = "slow.test"\n[[vhost.route]]\npath = "/"\n'
                  f'url = "{slow_backend.url}"\n'))

        # the service manager starts the service: START_PENDING ... RUNNING
        svc = ServiceProcess(tmp_path, config, name="twistproxy-edge")
        svc.wait_for_state("RUNNING")
        started = svc.wait_for(lambda line: "started" in str(line.get("event")))["event"][1]
        assert f"config {config}" in started and f"listening on 127.0.0.1:{port}" in started

        # a client is served through it
        r = fetch(port, "/hello")
        assert r.status == 200 and r.echo["server"] == "win-backend"
        assert (r.echo["method"], r.echo["target"]) == ("GET", "/hello")

        slow: dict = {}

        def slow_client():
            slow["response"] = fetch(port, "/slow/x", host="slow.test")
            slow["at"] = time.monotonic()
        t = threading.Thread(target=slow_client)
        t.start()
        assert arrived.wait(10)            # it has reached the backend
        svc.control("stop")
        svc.wait_for_state("STOP_PENDING")
        # it stops accepting at once ...
        wait_until(lambda: refused(port), 3, "the listener closed")
        closed_at = time.monotonic()
        # ... keeps telling the service manager it is still stopping ...
        svc.wait_for(lambda line: sum(1 for x in svc.lines if
                                      x.get("status", [0, 0])[1] == STOP_PENDING) >= 2,
                     what="a second STOP_PENDING")
        release.set()
        # ... and the request in flight is answered, after the listener closed
        t.join(10)
        assert slow["response"].status == 200, slow
        assert slow["response"].body == b"slow"
        assert slow["at"] > closed_at
        assert slow_backend.accepted == 1

        record = svc.finish()
        states = [s[2][1] for s in record["statuses"]]
        stopping = [s[2] for s in record["statuses"] if s[2][1] == STOP_PENDING]
        # the stop took about 2 s: STOP_PENDING was reported again meanwhile, with
        # growing checkpoints and a wait hint covering graceful_timeout
        assert len(stopping) >= 2, record["statuses"]
        assert [s[5] for s in stopping] == sorted({s[5] for s in stopping})
        assert all(s[6] >= 6000 for s in stopping)
        assert states.count(STOPPED) == 1 and states[-1] == STOPPED
        assert record["statuses"][-1][2][3] == 0          # a clean stop
        assert RUNNING not in states[states.index(STOP_PENDING):]

        # the event log: the start and the stop, no error
        events = record["events"]
        assert [kind for kind, _ in events] == [4, 4], events
        assert events[-1][1] == "twistproxy stopped"

        # the access log and the service log are the files the configuration names
        access = (tmp_path / "logs" / "access.log").read_text()
        assert '"GET /hello HTTP/1.1" 200' in access
        assert '"GET /slow/x HTTP/1.1" 200' in access
        log = (tmp_path / "logs" / "service.log").read_text()
        assert f"listening on 127.0.0.1:{port}" in log
        assert "stop requested by the service manager" in log
        assert "SelectReactor" in log
        assert "Traceback" not in log
        assert not (tmp_path / "twistproxy.log").exists()


def test_service_start_with_the_port_taken_fails_at_once(tmp_path):
    port = free_port()
    (tmp_path / "logs").mkdir()
    config = tmp_path / "edge.toml"
    config.write_text(service_config(port, access_log="logs/access.log",
                                     server='error_log = "logs/service.log"'))
    with socket.socket() as holder:           # another program has the port
        holder.bind(("127.0.0.1", port))
        holder.listen()
        svc = ServiceProcess(tmp_path, config)
        record = svc.finish(timeout=15)

    # one clear line in the event log (and the host's report of the exception)
    errors = [line for kind, line in record["events"] if kind == 1]
    ours = [line for line in errors if not line.startswith("host: ")]
    assert len(ours) == 1, errors
    assert ours[0].startswith(f"cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in ours[0]
    assert record["error"] == ["ServiceStartFailed", ours[0]]
    # a failed start, reported once by the host: STOPPED with 1066; never RUNNING
    states = [s[2][1] for s in record["statuses"]]
    assert set(states[:-1]) == {START_PENDING}
    assert record["statuses"][-1][2][1:4] == [STOPPED, 0, 1066]
    # no hang: finish() above fails if the process is still there after 15 s
    assert ours[0] in (tmp_path / "logs" / "service.log").read_text()
    assert not (tmp_path / "logs" / "access.log").exists()

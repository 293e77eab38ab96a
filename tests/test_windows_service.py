"""The Windows service (twistproxy/windows/), tested on any system with pywin32's
stand-ins (tests/e2e/winstandins.py).

A service that really runs (a reactor, listeners) runs in a subprocess, the driver in
winstandins.py, since a reactor runs once per process; it reports what the emulated
service manager saw (statuses in order, event-log lines). The commands (`twistproxy
service ...`) are run in this process against the stand-ins' in-memory registry, and
as a real subprocess without them (what Linux says).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "e2e"))     # the shared harness
import winstandins
from harness import ROOT, free_port, one_line_failure, run_cli, wait_port
from winstandins import ServiceProcess, service_config

STOPPED, START_PENDING, STOP_PENDING, RUNNING = 1, 2, 3, 4
ACCEPT_STOP, ACCEPT_SHUTDOWN = 1, 4


def write_config(tmp: Path, text: str, name: str = "svc.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def statuses(record) -> list[tuple]:
    return [tuple(s[2]) for s in record["statuses"]]


def assert_stopped_once(record, exit_code: int) -> None:
    """The host's STOPPED is the last status and the only one; nothing came after."""
    stopped = [s for s in statuses(record) if s[1] == STOPPED]
    assert len(stopped) == 1, statuses(record)
    assert statuses(record)[-1] == stopped[0]
    assert stopped[0][3] == exit_code, stopped


def service_errors(record) -> list[str]:
    """The service's own event-log errors (not the host's report of the exception)."""
    return [line for kind, line in record["events"] if kind == 1 and
            not line.startswith("host: ")]


# ---------------------------------------------------------------------------
# the status sequence


def test_start_run_stop_status_sequence(tmp_path):
    port = free_port()
    path = write_config(tmp_path, service_config(port))
    svc = ServiceProcess(tmp_path, path)
    svc.wait_for_state("RUNNING")
    wait_port("127.0.0.1", port)
    svc.control("interrogate")      # the current status again: RUNNING
    svc.wait_for(lambda line: line.get("thread") == "control-dispatcher", what="interrogate")
    # a connection that has sent nothing yet gets FIRST_REQUEST_GRACE (2 s) at a stop:
    # the stop takes that long, and reports its progress meanwhile
    idle = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.2)
    svc.control("stop")
    record = svc.finish()
    idle.close()

    seq = statuses(record)
    states = [s[1] for s in seq]
    first_running = states.index(RUNNING)
    starting = seq[:first_running]
    assert starting and all(s[1] == START_PENDING for s in starting)
    assert [s[5] for s in starting] == list(range(1, len(starting) + 1))   # checkpoints
    assert all(s[2] == 0 for s in starting), "controls accepted while starting"
    assert all(s[6] > 0 for s in starting), "no wait hint while starting"
    running = seq[first_running]
    assert running[5] == 0 and running[2] == ACCEPT_STOP | ACCEPT_SHUTDOWN
    assert seq[first_running + 1][1] == RUNNING       # the interrogation's answer
    stopping = [s for s in seq if s[1] == STOP_PENDING]
    assert len(stopping) >= 2, seq                    # the stop, then progress
    checkpoints = [s[5] for s in stopping]
    assert checkpoints == sorted(set(checkpoints)), checkpoints
    assert all(s[6] >= 4000 for s in stopping), "wait hint under graceful_timeout"
    assert states.index(STOP_PENDING) > first_running
    assert RUNNING not in states[states.index(STOP_PENDING):]
    assert_stopped_once(record, 0)

    threads = [s[1] for s in record["statuses"]]
    assert set(threads[:first_running + 1]) == {"service-main"}
    assert threads[states.index(STOP_PENDING)] == "control-dispatcher"
    assert record["error"] is None and record["reactor"] == "SelectReactor"
    assert record["source"] == "twistproxy" and record["handlers"] == ["twistproxy"]
    infos = [line for kind, line in record["events"] if kind == 4]
    assert infos[0].startswith("twistproxy ") and f"listening on 127.0.0.1:{port}" in infos[0]
    assert f"config {path}" in infos[0] and f"log {tmp_path / 'twistproxy.log'}" in infos[0]
    assert infos[-1] == "twistproxy stopped"
    assert service_errors(record) == []


def test_another_name_is_its_own_event_source_and_handler(tmp_path):
    port = free_port()
    path = write_config(tmp_path, service_config(port, server='error_log = "edge.log"'))
    svc = ServiceProcess(tmp_path, path, name="edge-b")
    svc.wait_for_state("RUNNING")
    svc.control("shutdown")                 # the system shuts down: stops as a stop
    record = svc.finish()
    assert record["source"] == "edge-b" and record["handlers"] == ["edge-b"]
    assert STOP_PENDING in [s[1] for s in statuses(record)]
    assert_stopped_once(record, 0)
    assert record["log_path"] == str(tmp_path / "edge.log")
    assert "stop requested" in (tmp_path / "edge.log").read_text()


@pytest.mark.parametrize("at", [1, 2], ids=["before-the-config-is-read",
                                            "after-the-config-is-read"])
def test_a_stop_while_starting(tmp_path, at):
    port = free_port()
    path = write_config(tmp_path, service_config(port))
    svc = ServiceProcess(tmp_path, path, stop_at_start=at)
    record = svc.finish()
    states = [s[1] for s in statuses(record)]
    assert RUNNING not in states, states          # never back from STOP_PENDING
    assert STOP_PENDING in states
    assert_stopped_once(record, 0)
    assert record["error"] is None
    assert record["events"][-1][1].startswith("twistproxy stopped")
    with pytest.raises(OSError):                  # nothing left listening
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ---------------------------------------------------------------------------
# failed starts: one event-log line, a failed stop (1066), no hang


def assert_failed_start(svc: ServiceProcess, *expected: str) -> str:
    record = svc.finish(timeout=15)
    errors = service_errors(record)
    assert len(errors) == 1, record["events"]
    line = errors[0]
    assert "\n" not in line
    for text in expected:
        assert text in line, line
    assert record["error"] == ["ServiceStartFailed", line]
    states = [s[1] for s in statuses(record)]
    assert RUNNING not in states, states
    assert_stopped_once(record, winstandins.ERROR_SERVICE_SPECIFIC_ERROR)
    assert "Traceback" not in record["stderr"]
    return line


def test_failed_start_bad_config(tmp_path):
    port = free_port()
    path = write_config(tmp_path, service_config(port, server="graceful_timeout_s = 3"))
    assert_failed_start(ServiceProcess(tmp_path, path), str(path),
                        "server.graceful_timeout_s", "unknown key")


def test_failed_start_missing_config_file(tmp_path):
    path = tmp_path / "gone.toml"
    assert_failed_start(ServiceProcess(tmp_path, path), str(path), "cannot read")


def test_failed_start_port_taken(tmp_path):
    port = free_port()
    path = write_config(tmp_path, service_config(port))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        line = assert_failed_start(ServiceProcess(tmp_path, path), f"127.0.0.1:{port}")
    assert "in use" in line
    assert line in (tmp_path / "twistproxy.log").read_text()   # the service log too


def test_failed_start_access_log_on_stdout(tmp_path):
    port = free_port()
    text = service_config(port).replace('access_log = "access.log"', 'access_log = "-"')
    path = write_config(tmp_path, text)
    assert_failed_start(ServiceProcess(tmp_path, path), str(path), "server.access_log",
                        "'-'", "no console")


def test_failed_start_service_log_cannot_be_opened(tmp_path):
    port = free_port()
    (tmp_path / "log-dir").mkdir()
    path = write_config(tmp_path, service_config(port, server='error_log = "log-dir"'))
    assert_failed_start(ServiceProcess(tmp_path, path), "server.error_log",
                        str(tmp_path / "log-dir"))


def test_failed_start_no_config_stored(tmp_path):
    line = assert_failed_start(ServiceProcess(tmp_path, None, name="bare"),
                               "service bare has no configuration")
    assert "twistproxy service install --config FILE --name bare" in line


# ---------------------------------------------------------------------------
# `twistproxy service ...` against the stand-ins' service manager


@pytest.fixture
def scm(monkeypatch):
    """The stand-ins in sys.modules for this test; their in-memory service manager."""
    modules = winstandins.make_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "twistproxy.windows.service", raising=False)
    return modules["win32serviceutil"].SCM


def service_cli(*args: str) -> int:
    from twistproxy.cli import main
    return main(["service", *args])


@pytest.mark.parametrize("startup,start_type", [("auto", 2), ("manual", 3)])
def test_install_arguments(scm, tmp_path, monkeypatch, capsys, startup, start_type):
    write_config(tmp_path, service_config(free_port()), "edge.toml")
    monkeypatch.chdir(tmp_path)                       # a relative --config
    assert service_cli("install", "--config", "edge.toml", "--name", "edge2",
                       "--startup", startup) == 0
    (_, args), = [c for c in scm.calls if c[0] == "InstallService"]
    assert args["pythonClassString"] == "twistproxy.windows.service.TwistproxyService"
    assert args["serviceName"] == "edge2"
    assert args["displayName"] == "twistproxy (edge2)"
    assert args["startType"] == start_type
    assert args["exeName"] is None                    # pythonservice.exe
    assert "edge proxy" in args["description"]
    assert scm.options == {("edge2", "config"): str(tmp_path / "edge.toml")}
    out = capsys.readouterr().out
    assert "installed service 'edge2'" in out and str(tmp_path / "edge.toml") in out


def test_install_default_name(scm, tmp_path, capsys):
    path = write_config(tmp_path, service_config(free_port()))
    assert service_cli("install", "--config", str(path)) == 0
    assert scm.services["twistproxy"]["displayName"] == "twistproxy"
    assert scm.options[("twistproxy", "config")] == str(path)


@pytest.mark.parametrize("text,expected", [
    (service_config(8080, server="bogus = 1"), "server.bogus: unknown key"),
    ("[server]\nmaster_process = false\naccess_log = 'a.log'\n", "listen: missing"),
    ("[server]\nmaster_process = false\n[[listen]]\naddress = '127.0.0.1'\nport = 8080\n"
     "[[vhost]]\nserver_name = 'x.test'\n[[vhost.route]]\npath = '/'\nurl = 'http://b'\n",
     "server.access_log: '-'"),
    ("[server\n", "not valid TOML"),
], ids=["unknown-key", "no-listener", "access-log-on-stdout", "not-toml"])
def test_install_refuses_a_bad_config_and_stores_nothing(scm, tmp_path, capsys, text,
                                                         expected):
    path = write_config(tmp_path, text)
    assert service_cli("install", "--config", str(path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert scm.calls == [] and scm.services == {} and scm.options == {}


def test_pywin32_errors_are_one_line(scm, tmp_path, capsys):
    path = write_config(tmp_path, service_config(free_port()))

    def one_line(rc: int, *expected: str) -> None:
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err
        for text in expected:
            assert text in captured.err, captured.err
        assert rc == 1

    scm.elevated = False
    one_line(service_cli("install", "--config", str(path)),
             "twistproxy service install: access denied",
             "run it from an elevated prompt (Run as administrator)")
    assert scm.services == {}
    scm.elevated = True
    assert service_cli("install", "--config", str(path)) == 0
    capsys.readouterr()
    one_line(service_cli("install", "--config", str(path)),
             "'twistproxy' exists already", "`twistproxy service remove --name twistproxy`")
    one_line(service_cli("stop"), "'twistproxy' is not running")
    assert service_cli("start", "--wait", "1") == 0
    assert "'twistproxy' is running" in capsys.readouterr().out
    one_line(service_cli("start"), "'twistproxy' is running already")
    assert service_cli("stop", "--wait", "1") == 0
    assert "has stopped" in capsys.readouterr().out
    scm.start_state = STOPPED                       # a start that failed
    one_line(service_cli("start", "--wait", "1"), "stopped while starting",
             "Event Log (Application, source twistproxy)")
    assert service_cli("remove") == 0
    capsys.readouterr()
    one_line(service_cli("remove"), "no service named 'twistproxy' is installed")
    one_line(service_cli("start", "--name", "other"), "no service named 'other'")
    assert [c[0] for c in scm.calls].count("InstallService") == 3   # refused, made, exists


def test_debug_without_any_config(scm, capsys):
    assert service_cli("debug", "--name", "nothing-here") == 1
    err = capsys.readouterr().err
    assert "no service named 'nothing-here' is installed" in err


def test_debug_reads_the_installed_config(scm, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(sys.modules["win32serviceutil"], "DebugService",
                        lambda cls, argv: ran.append((cls.__name__, argv)))
    path = write_config(tmp_path, service_config(free_port()))
    assert service_cli("install", "--config", str(path), "--name", "edge") == 0
    assert service_cli("debug", "--name", "edge") == 0
    assert ran == [("TwistproxyService", ["edge", str(path)])]


def test_debug_runs_in_the_console_and_ctrl_c_stops_it(tmp_path):
    import signal
    port = free_port()
    path = write_config(tmp_path, service_config(port))
    proc = subprocess.Popen(
        [sys.executable, str(Path(winstandins.__file__)), "cli", "service", "debug",
         "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        proc.send_signal(signal.SIGINT)               # Ctrl+C
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Debugging service twistproxy" in out
    assert "Traceback" not in err
    assert f"listening on 127.0.0.1:{port}" in err      # the log on the console too
    assert "stop requested" in err


def test_debug_failed_start_is_one_line(tmp_path):
    path = tmp_path / "missing.toml"
    result = subprocess.run(
        [sys.executable, str(Path(winstandins.__file__)), "cli", "service", "debug",
         "--config", str(path)], capture_output=True, text=True, timeout=20, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    one_line_failure(result, str(path), "cannot read")


# ---------------------------------------------------------------------------
# other systems, and the types


@pytest.mark.skipif(sys.platform == "win32", reason="what other systems say")
def test_service_elsewhere_is_one_line_exit_2():
    result = run_cli("service", "install", "--config", "whatever.toml")
    assert result.returncode == 2
    one_line_failure(result, "Windows services exist only on Windows",
                     f"(this is {sys.platform})", "twistproxy run FILE",
                     "etc/systemd/twistproxy.service")
    assert run_cli("service", "stop").returncode == 2


def test_service_help_lists_the_commands():
    result = run_cli("service", "--help")
    assert result.returncode == 0
    for command in ("install", "remove", "start", "stop", "debug"):
        assert f"    {command} " in result.stdout, result.stdout
    result = run_cli("service", "install", "--help")
    assert "--config" in result.stdout and "--startup {auto,manual}" in result.stdout
    assert "--name" in result.stdout
    assert "service" in run_cli("--help").stdout


def test_types_against_pywin32_stubs():
    """twistproxy/windows/ as mypy sees it on Windows, against types-pywin32 (a
    missing stub would fail it: the modules import pywin32 at the top)."""
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    try:
        importlib.metadata.version("types-pywin32")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("types-pywin32 is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--platform", "win32", "--follow-imports=silent",
         "--no-incremental", "twistproxy/windows/"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout

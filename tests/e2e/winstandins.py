"""Stand-ins for pywin32, so the Windows service runs (and is tested) on Linux.

`install()` puts four modules into sys.modules: win32serviceutil, win32service,
servicemanager and pywintypes. They behave as pywin32's do where the service relies
on it (mhammond/pywin32 win32/Lib/win32serviceutil.py, win32/src/PythonService.cpp):

- `win32serviceutil.ServiceFramework`: __init__ registers the control handler under
  args[0] (None when debugging) and names the event source after `_svc_name_`;
  ReportServiceStatus returns at once when debugging, accepts no controls while
  START_PENDING, counts checkPoint up for pending states (0 for RUNNING/STOPPED) and
  calls win32service.SetServiceStatus; ServiceCtrlHandlerEx dispatches STOP,
  SHUTDOWN and INTERROGATE; the default SvcRun reports RUNNING around SvcDoRun.
- `win32service.SetServiceStatus` records (time, thread name, status tuple) in order;
  the constants have pywin32's (winsvc.h's) values; `error` is pywintypes.error
  (winerror, funcname, strerror).
- `servicemanager`: the event log is `events` [(type, line)]; Debugging,
  RegisterServiceCtrlHandler, SetEventSourceName...
- the service manager's side of win32serviceutil (InstallService, Set/Get
  ServiceCustomOption, RemoveService, StartService, StopService, QueryServiceStatus)
  works on an in-memory registry (`SCM`) and raises what Windows does: 1073 for a
  name installed already, 1060 for one that is not, 5 when not elevated
  (`SCM.elevated = False`).
- `DebugService(cls, argv)` as pywin32's: Debugging(True), PrepareToHostSingle,
  cls(argv), Ctrl+C (here SIGINT) calls SvcStop, then SvcRun.

win32event is not emulated: the service never waits on a Win32 event (the stop is
`reactor.callFromThread`), so it does not import win32event.

`Host` is the C service host (pythonservice.exe): it creates the instance and runs
SvcRun on a "service main" thread, sends controls from another ("control
dispatcher") thread, and reports SERVICE_STOPPED itself, once, when SvcRun has
returned (exit code 0) or raised (1066, after logging the Python error).

Run as a program it is the subprocess driver of the tests (the reactor runs once per
process): `python tests/e2e/winstandins.py --name N --config FILE --out OUT.json
[--stop-at-start K]` runs the service through a Host on Twisted's select reactor
(Windows's default), prints each status and event-log line as a JSON line on
standard output as it happens, takes "stop"/"shutdown"/"interrogate" lines on
standard input as the service manager's controls, and writes everything recorded to
OUT.json at the end; `ServiceProcess` runs it for a test. `python
tests/e2e/winstandins.py cli ARGS...` is `twistproxy ARGS...` with the stand-ins
installed (`service debug`).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ERROR_SERVICE_SPECIFIC_ERROR = 1066


class pywintypes_error(Exception):
    """pywintypes.error: (winerror, funcname, strerror)."""

    def __init__(self, winerror: int, funcname: str, strerror: str):
        super().__init__(winerror, funcname, strerror)
        self.winerror, self.funcname, self.strerror = winerror, funcname, strerror


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def make_modules(on_status=None, on_event=None) -> dict[str, types.ModuleType]:
    """Fresh stand-in modules; `on_status(status)` is called after each recorded
    SetServiceStatus (on the reporting thread), `on_event((type, line))` after each
    event-log line."""
    pywintypes = _module("pywintypes", error=pywintypes_error)

    # --- win32service ---------------------------------------------------------
    statuses: list = []

    def SetServiceStatus(handle, status):
        assert handle is not None, "SetServiceStatus without a handle"
        assert len(status) == 7
        statuses.append((time.monotonic(), threading.current_thread().name, tuple(status)))
        if on_status is not None:
            on_status(tuple(status))

    win32service = _module(
        "win32service", error=pywintypes_error, statuses=statuses,
        SetServiceStatus=SetServiceStatus,
        SERVICE_WIN32_OWN_PROCESS=0x10,
        SERVICE_STOPPED=1, SERVICE_START_PENDING=2, SERVICE_STOP_PENDING=3,
        SERVICE_RUNNING=4, SERVICE_CONTINUE_PENDING=5, SERVICE_PAUSE_PENDING=6,
        SERVICE_PAUSED=7,
        SERVICE_CONTROL_STOP=1, SERVICE_CONTROL_PAUSE=2, SERVICE_CONTROL_CONTINUE=3,
        SERVICE_CONTROL_INTERROGATE=4, SERVICE_CONTROL_SHUTDOWN=5,
        SERVICE_ACCEPT_STOP=1, SERVICE_ACCEPT_PAUSE_CONTINUE=2,
        SERVICE_ACCEPT_SHUTDOWN=4,
        SERVICE_BOOT_START=0, SERVICE_SYSTEM_START=1, SERVICE_AUTO_START=2,
        SERVICE_DEMAND_START=3, SERVICE_DISABLED=4,
        SERVICE_ERROR_NORMAL=1,
    )
    ws = win32service

    # --- servicemanager ---------------------------------------------------------
    events: list = []

    def log(errorType, line):
        events.append((errorType, line))
        if on_event is not None:
            on_event((errorType, line))

    sm_state = {"debugging": False, "source": None, "hosted": None, "handlers": []}

    def Debugging(newVal=-1):
        old = sm_state["debugging"]
        if newVal != -1:
            sm_state["debugging"] = bool(newVal)
        return old

    def RegisterServiceCtrlHandler(serviceName, callback, extra_args=False):
        sm_state["handlers"].append((serviceName, callback, extra_args))
        return None if sm_state["debugging"] else f"ssh:{serviceName}"

    def SetEventSourceName(sourceName, registerNow=False):
        sm_state["source"] = sourceName

    def LogMsg(errorType, eventId, inserts=None):
        log(errorType, f"event {eventId:#x}: {inserts!r}")

    servicemanager = _module(
        "servicemanager", events=events, state=sm_state,
        EVENTLOG_ERROR_TYPE=1, EVENTLOG_WARNING_TYPE=2, EVENTLOG_INFORMATION_TYPE=4,
        # message ids of pywin32's PythonServiceMessages.mc (not asserted on)
        PYS_SERVICE_STARTING=0x40001001, PYS_SERVICE_STARTED=0x40001002,
        PYS_SERVICE_STOPPING=0x40001005, PYS_SERVICE_STOPPED=0x40001006,
        Debugging=Debugging, RegisterServiceCtrlHandler=RegisterServiceCtrlHandler,
        SetEventSourceName=SetEventSourceName, LogMsg=LogMsg,
        LogInfoMsg=lambda msg: log(4, msg), LogWarningMsg=lambda msg: log(2, msg),
        LogErrorMsg=lambda msg: log(1, msg), log=log,
        PrepareToHostSingle=lambda klass=None: sm_state.__setitem__("hosted", klass),
        Initialize=lambda *a: None, Finalize=lambda: None,
        RunningAsService=lambda: not sm_state["debugging"],
        StartServiceCtrlDispatcher=lambda: None,
    )
    sm = servicemanager

    # --- win32serviceutil ---------------------------------------------------------
    class ServiceFramework:
        def __init__(self, args):
            self.ssh = sm.RegisterServiceCtrlHandler(args[0], self.ServiceCtrlHandlerEx,
                                                     True)
            sm.SetEventSourceName(self._svc_name_)
            self.checkPoint = 0

        def GetAcceptedControls(self):
            accepted = 0
            if hasattr(self, "SvcStop"):
                accepted |= ws.SERVICE_ACCEPT_STOP
            if hasattr(self, "SvcPause") and hasattr(self, "SvcContinue"):
                accepted |= ws.SERVICE_ACCEPT_PAUSE_CONTINUE
            if hasattr(self, "SvcShutdown"):
                accepted |= ws.SERVICE_ACCEPT_SHUTDOWN
            return accepted

        def ReportServiceStatus(self, serviceStatus, waitHint=5000, win32ExitCode=0,
                                svcExitCode=0):
            if self.ssh is None:        # debugging
                return
            if serviceStatus == ws.SERVICE_START_PENDING:
                accepted = 0
            else:
                accepted = self.GetAcceptedControls()
            if serviceStatus in (ws.SERVICE_RUNNING, ws.SERVICE_STOPPED):
                checkPoint = 0
            else:
                self.checkPoint += 1
                checkPoint = self.checkPoint
            ws.SetServiceStatus(self.ssh, (ws.SERVICE_WIN32_OWN_PROCESS, serviceStatus,
                                           accepted, win32ExitCode, svcExitCode,
                                           checkPoint, waitHint))

        def SvcInterrogate(self):
            self.ReportServiceStatus(ws.SERVICE_RUNNING)

        def SvcOther(self, control):
            pass

        def ServiceCtrlHandler(self, control):
            return self.ServiceCtrlHandlerEx(control, 0, None)

        def SvcOtherEx(self, control, event_type, data):
            return self.SvcOther(control)

        def ServiceCtrlHandlerEx(self, control, event_type, data):
            if control == ws.SERVICE_CONTROL_STOP:
                return self.SvcStop()
            if control == ws.SERVICE_CONTROL_SHUTDOWN and hasattr(self, "SvcShutdown"):
                return self.SvcShutdown()
            if control == ws.SERVICE_CONTROL_INTERROGATE:
                return self.SvcInterrogate()
            return self.SvcOtherEx(control, event_type, data)

        def SvcRun(self):
            self.ReportServiceStatus(ws.SERVICE_RUNNING)
            self.SvcDoRun()
            self.ReportServiceStatus(ws.SERVICE_STOP_PENDING)

    class SCM:
        """The service manager's registry and states, in memory."""
        elevated = True
        services: dict = {}         # name -> InstallService's arguments
        options: dict = {}          # (name, option) -> value (the Parameters key)
        state: dict = {}            # name -> SERVICE_* state
        calls: list = []            # (function, args) in order
        start_state = ws.SERVICE_RUNNING    # where StartService leaves a service

    def _admin(func):
        if not SCM.elevated:
            raise pywintypes_error(5, "OpenSCManager", "Access is denied.")

    def _known(name, func):
        _admin(func)
        if name not in SCM.services:
            raise pywintypes_error(1060, func, "The specified service does not exist as "
                                   "an installed service.")

    def InstallService(pythonClassString, serviceName, displayName, startType=None,
                       errorControl=None, bRunInteractive=0, serviceDeps=None,
                       userName=None, password=None, exeName=None, perfMonIni=None,
                       perfMonDll=None, exeArgs=None, description=None,
                       delayedstart=None):
        args = dict(pythonClassString=pythonClassString, serviceName=serviceName,
                    displayName=displayName, startType=startType,
                    errorControl=errorControl, exeName=exeName, exeArgs=exeArgs,
                    description=description, userName=userName)
        SCM.calls.append(("InstallService", args))
        _admin("OpenSCManager")
        if serviceName in SCM.services:
            raise pywintypes_error(1073, "CreateService",
                                   "The specified service already exists.")
        SCM.services[serviceName] = args
        SCM.state[serviceName] = ws.SERVICE_STOPPED

    def SetServiceCustomOption(serviceName, option, value):
        SCM.calls.append(("SetServiceCustomOption", (serviceName, option, value)))
        _known(serviceName, "RegOpenKey")
        SCM.options[(serviceName, option)] = value

    def GetServiceCustomOption(serviceName, option, defaultValue=None):
        return SCM.options.get((serviceName, option), defaultValue)

    def RemoveService(serviceName):
        SCM.calls.append(("RemoveService", serviceName))
        _known(serviceName, "OpenService")
        del SCM.services[serviceName]
        SCM.state.pop(serviceName, None)
        for key in [k for k in SCM.options if k[0] == serviceName]:
            del SCM.options[key]

    def StartService(serviceName, args=None, machine=None):
        SCM.calls.append(("StartService", serviceName))
        _known(serviceName, "OpenService")
        if SCM.state[serviceName] != ws.SERVICE_STOPPED:
            raise pywintypes_error(1056, "StartService",
                                   "An instance of the service is already running.")
        SCM.state[serviceName] = SCM.start_state

    def StopService(serviceName, machine=None):
        SCM.calls.append(("StopService", serviceName))
        _known(serviceName, "OpenService")
        if SCM.state[serviceName] == ws.SERVICE_STOPPED:
            raise pywintypes_error(1062, "ControlService",
                                   "The service has not been started.")
        SCM.state[serviceName] = ws.SERVICE_STOPPED
        return (ws.SERVICE_WIN32_OWN_PROCESS, ws.SERVICE_STOP_PENDING, 0, 0, 0, 1, 5000)

    def QueryServiceStatus(serviceName, machine=None):
        _known(serviceName, "OpenService")
        return (ws.SERVICE_WIN32_OWN_PROCESS, SCM.state[serviceName], 0, 0, 0, 0, 0)

    def DebugService(cls, argv=[]):
        print(f"Debugging service {cls._svc_name_} - press Ctrl+C to stop.")
        sm.Debugging(True)
        sm.PrepareToHostSingle(cls)
        obj = cls(argv)
        previous = signal.signal(signal.SIGINT, lambda *a: obj.SvcStop())
        try:
            obj.SvcRun()
        finally:
            signal.signal(signal.SIGINT, previous)
            sm.Debugging(False)

    win32serviceutil = _module(
        "win32serviceutil", ServiceFramework=ServiceFramework, SCM=SCM,
        error=RuntimeError,
        InstallService=InstallService, SetServiceCustomOption=SetServiceCustomOption,
        GetServiceCustomOption=GetServiceCustomOption, RemoveService=RemoveService,
        StartService=StartService, StopService=StopService,
        QueryServiceStatus=QueryServiceStatus, DebugService=DebugService)
    SCM.services, SCM.options, SCM.state, SCM.calls = {}, {}, {}, []
    return {"pywintypes": pywintypes, "win32service": win32service,
            "servicemanager": servicemanager, "win32serviceutil": win32serviceutil}


def install(on_status=None, on_event=None) -> dict[str, types.ModuleType]:
    """Put the stand-ins into sys.modules (and forget twistproxy's modules that imported
    the old ones); returns them by name."""
    modules = make_modules(on_status, on_event)
    sys.modules.update(modules)
    for name in ("twistproxy.windows.service",):
        sys.modules.pop(name, None)
    return modules


class Host:
    """pythonservice.exe: SvcRun on a service-main thread, controls from another."""

    def __init__(self, cls, args, modules):
        self.cls, self.args = cls, list(args)
        self.ws = modules["win32service"]
        self.sm = modules["servicemanager"]
        self.service = None
        self.error: BaseException | None = None
        self.created = threading.Event()
        self.thread = threading.Thread(target=self._main, name="service-main", daemon=True)

    def start(self) -> Host:
        self.thread.start()
        self.created.wait(10)
        return self

    def _main(self) -> None:
        try:
            self.service = self.cls(self.args)
        finally:
            self.created.set()
        exit_code = 0
        try:
            self.service.SvcRun()
        except BaseException as e:          # what the host does with a Python error
            self.error = e
            self.sm.log(self.sm.EVENTLOG_ERROR_TYPE,
                        f"host: SvcRun raised {type(e).__name__}: {e}")
            exit_code = ERROR_SERVICE_SPECIFIC_ERROR
        ssh = self.service.ssh
        if ssh is not None:
            self.ws.SetServiceStatus(ssh, (self.ws.SERVICE_WIN32_OWN_PROCESS,
                                           self.ws.SERVICE_STOPPED, 0, exit_code, 0, 0, 0))

    def control(self, code: int, wait: bool = True) -> threading.Thread:
        """The service manager's control `code`, on a control-dispatcher thread."""
        t = threading.Thread(target=self.service.ServiceCtrlHandlerEx,
                             args=(code, 0, None), name="control-dispatcher", daemon=True)
        t.start()
        if wait:
            t.join(10)
        return t

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


# ---------------------------------------------------------------------------
# the subprocess driver


class ServiceProcess:
    """The driver in a subprocess, seen from a test: statuses and event-log lines as
    they come, controls sent on its standard input, the record at the end."""

    STATES = {1: "STOPPED", 2: "START_PENDING", 3: "STOP_PENDING", 4: "RUNNING"}

    def __init__(self, tmp: Path, config: Path | None, name: str = "twistproxy",
                 stop_at_start: int = 0):
        import os
        import subprocess
        self.out = tmp / f"{name}-record.json"
        self.stderr_path = tmp / f"{name}-driver.err"
        self._err = open(self.stderr_path, "wb")
        args = [sys.executable, str(Path(__file__)), "--name", name, "--out", str(self.out)]
        if config is not None:
            args += ["--config", str(config)]
        if stop_at_start:
            args += ["--stop-at-start", str(stop_at_start)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, cwd=ROOT, env=env, text=True)
        self.lines: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"eof": True})
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or any("eof" in line for line in self.lines):
                    raise AssertionError(f"{what or predicate} not seen: {self.lines}\n"
                                         f"{self.stderr_path.read_text(errors='replace')}")
                self._cond.wait(left)

    def wait_for_state(self, state: str, timeout: float = 10.0) -> dict:
        return self.wait_for(lambda line: self.STATES.get(line.get("status", [0, 0])[1])
                             == state, timeout, state)

    def control(self, what: str) -> None:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20.0) -> dict:
        """Wait for the driver's end; its record (statuses, events, error...). A
        driver still running after `timeout` (a hang) fails the test."""
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._err.close()
        err = self.stderr_path.read_text(errors="replace")
        assert self.proc.returncode == 0, f"driver exit {self.proc.returncode}: {err}"
        record = json.loads(self.out.read_text())
        record["stderr"] = err
        record["states"] = [self.STATES[s[2][1]] for s in record["statuses"]]
        return record


def _driver(argv: list[str]) -> int:
    if argv[:1] == ["cli"]:        # `twistproxy ARGS` with the stand-ins (service debug)
        from twisted.internet import selectreactor
        selectreactor.install()
        install()
        from twistproxy.cli import main
        return main(argv[1:])
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="twistproxy")
    ap.add_argument("--config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-at-start", type=int, default=0,
                    help="send the stop at the K-th START_PENDING report")
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args(argv)

    from twisted.internet import selectreactor
    selectreactor.install()            # Windows's default reactor

    lock = threading.Lock()
    started_pending = [0]
    host_box: list[Host] = []

    def emit(obj) -> None:
        with lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def on_status(status) -> None:
        emit({"status": list(status), "thread": threading.current_thread().name})
        if status[1] == 2 and a.stop_at_start:
            started_pending[0] += 1
            if started_pending[0] == a.stop_at_start:
                host_box[0].control(1, wait=False)

    modules = install(on_status, lambda event: emit({"event": list(event)}))
    sm = modules["servicemanager"]

    wsu = modules["win32serviceutil"]
    if a.config:
        wsu.SCM.services[a.name] = {}
        wsu.SCM.options[(a.name, "config")] = a.config
    from twistproxy.windows.service import TwistproxyService
    host = Host(TwistproxyService, [a.name], modules)
    host_box.append(host)
    host.start()

    def controls() -> None:
        codes = {"stop": 1, "interrogate": 4, "shutdown": 5}
        for line in sys.stdin:
            if line.strip() in codes:
                host.control(codes[line.strip()], wait=False)
    threading.Thread(target=controls, daemon=True).start()

    finished = host.join(a.timeout)
    from twisted.internet import reactor
    record = {
        "finished": finished,
        "statuses": [[t, thread, list(s)] for t, thread, s in modules["win32service"].statuses],
        "events": [list(e) for e in sm.events],
        "error": None if host.error is None else
        [type(host.error).__name__, str(host.error)],
        "source": sm.state["source"],
        "handlers": [h[0] for h in sm.state["handlers"]],
        "reactor": type(reactor).__name__,
        "log_path": getattr(getattr(host.service, "runner", None), "log_path", None),
    }
    Path(a.out).write_text(json.dumps(record, indent=1))
    emit({"done": True})
    return 0 if finished else 3


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_driver(sys.argv[1:]))


def service_config(port: int, url: str = "http://127.0.0.1:9", server: str = "",
                   extra: str = "", access_log: str = "access.log",
                   graceful_timeout: float = 4) -> str:
    """A configuration as a Windows service would run it: one process (what Windows
    forces; these tests run on Linux) and an access log file (a service has no
    console); `server` adds [server] lines, `extra` goes after the route."""
    return f"""
[server]
master_process = false
access_log = "{access_log}"
graceful_timeout = {graceful_timeout}
{server}

[[listen]]
address = "127.0.0.1"
port = {port}

[[vhost]]
server_name = "proxy.test"
[[vhost.route]]
path = "/"
url = "{url}"
{extra}
"""

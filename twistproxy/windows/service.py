"""The Windows service: pywin32's ServiceFramework around twistproxy/windows/runner.py.

Installed by `twistproxy service install` (servicecli.py) with the class string
"twistproxy.windows.service.TwistproxyService"; pywin32's service host
(pythonservice.exe) creates one `TwistproxyService([name, *start_args])` and calls
`SvcRun()` on its service-main thread. The same class serves every installed name
(`--name`): the name the service manager started is args[0], and the configuration
is the absolute path stored under that name's Parameters key ("config"), unless a
start argument (or `service debug`) gives one as args[1].

This module is the thin glue only (statuses and event-log lines); what the service
does is ServiceRunner's. It needs pywin32, and is type-checked against its stubs
(types-pywin32, `mypy --platform win32`); tests on other systems put stand-ins for
the pywin32 modules into sys.modules (tests/e2e/winstandins.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import servicemanager
import win32service
import win32serviceutil

from .runner import (
    RUNNING,
    START_PENDING,
    STOP_PENDING,
    ServiceRunner,
    ServiceStartFailed,
)

CLASS_STRING = "twistproxy.windows.service.TwistproxyService"
CONFIG_OPTION = "config"          # the Parameters value holding the configuration path

_STATES = {
    START_PENDING: win32service.SERVICE_START_PENDING,
    RUNNING: win32service.SERVICE_RUNNING,
    STOP_PENDING: win32service.SERVICE_STOP_PENDING,
}


def display_name(name: str) -> str:
    return "twistproxy" if name == TwistproxyService._svc_name_ else f"twistproxy ({name})"


class TwistproxyService(win32serviceutil.ServiceFramework):
    _svc_name_ = "twistproxy"
    _svc_display_name_ = "twistproxy"
    _svc_description_ = ("twistproxy, an edge proxy on Twisted: listeners, virtual "
                         "hosts and reverse proxying, as its configuration file says")

    def __init__(self, args: Sequence[str]) -> None:
        # before the base class: it names the event source and the control handler
        # after _svc_name_, which must be the name this instance was started as
        self._svc_name_ = args[0]
        super().__init__(args)
        config = args[1] if len(args) > 1 else \
            win32serviceutil.GetServiceCustomOption(args[0], CONFIG_OPTION)
        self.config_path: str = config or ""
        # the base class's control handler is None when debugging (`service debug`):
        # no statuses then, and the service log goes to the console as well
        self.runner = ServiceRunner(self.config_path, self._report, self._event,
                                    console=self.ssh is None)

    def _report(self, state: str, wait_hint_ms: int) -> None:
        self.ReportServiceStatus(_STATES[state], waitHint=wait_hint_ms)

    @staticmethod
    def _event(level: str, line: str) -> None:
        if level == "error":
            servicemanager.LogErrorMsg(line)
        elif level == "warning":
            servicemanager.LogWarningMsg(line)
        else:
            servicemanager.LogInfoMsg(line)

    def SvcRun(self) -> None:
        # Replaces the base class's SvcRun, which reports RUNNING before anything has
        # started: here RUNNING comes once the listeners are bound and the reactor runs.
        #
        # SERVICE_STOPPED is never reported here. The service host reports it, once,
        # when SvcRun returns (exit code 0) or raises (after logging the Python error:
        # ERROR_SERVICE_SPECIFIC_ERROR, 1066, a failed start); reporting it twice can
        # crash the process (SetServiceStatus). So a start that fails writes its one
        # clear line to the event log (ServiceRunner) and raises ServiceStartFailed.
        if not self.config_path:
            line = (f"service {self._svc_name_} has no configuration file stored: "
                    f"install it with `twistproxy service install --config FILE "
                    f"--name {self._svc_name_}`")
            servicemanager.LogErrorMsg(line)
            raise ServiceStartFailed(line)
        self.runner.run()

    def SvcStop(self) -> None:
        # the control dispatcher's thread: STOP_PENDING now, the reactor stops itself
        self.runner.stop()

    def SvcShutdown(self) -> None:
        self.runner.stop()

    def SvcInterrogate(self) -> None:
        # the base class would report RUNNING whatever the state (also while stopping)
        self.runner.interrogate()

"""What the Windows service does, in plain Python: start, serve, stop gracefully.

`ServiceRunner` is the logic behind twistproxy/windows/service.py (the thin pywin32
glue), kept free of pywin32 so it can be read and tested anywhere. It talks to the
service manager only through two callbacks:

  report(state, wait_hint_ms)   a service status: START_PENDING, RUNNING, STOP_PENDING
                                (never STOPPED: the service host reports that once,
                                when `run()` returns or raises; see service.py)
  event(level, line)            one line for the Windows Event Log ("info", "error")

`run()` is called on the service-main thread (not the process's main thread) and
blocks until the proxy has stopped; `stop()` may be called from any thread (the
service manager's control dispatcher calls it) at any time, also while starting.
The reactor is installed by `run()`, never at import, and stopped from its own thread
(`callFromThread`): the graceful ProxyService.stopService runs as a "before shutdown"
trigger, as under `twistproxy run`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TextIO, cast

START_PENDING = "START_PENDING"
RUNNING = "RUNNING"
STOP_PENDING = "STOP_PENDING"

START_WAIT_HINT_MS = 10_000      # per start-up step (each one reports a new checkpoint)
STOP_MARGIN_S = 5.0              # the stop's wait hint: graceful_timeout + this
STOP_PROGRESS_S = 1.0            # how often a stop reports that it is still under way
LOG_NAME = "twistproxy.log"      # the service log beside the configuration by default

Report = Callable[[str, int], None]
Event = Callable[[str, str], None]


class ServiceStartFailed(Exception):
    """The service could not start; the message is the one line for the event log."""


class ServiceRunner:
    def __init__(self, config_path: str, report: Report, event: Event,
                 console: bool = False):
        """`console`: also write the service log to standard error (`service debug`)."""
        self.config_path = config_path
        self._report_cb = report
        self._event = event
        self.console = console
        self.state: str | None = None
        self.log_path = ""
        self._lock = threading.Lock()
        self._stopping = False
        self._reactor: Any = None
        self._stop_wait_ms = self._stop_hint_ms(None)
        self._log_file: TextIO | None = None
        self._progress: Any = None

    # -- called by the service manager (any thread) -------------------------------

    def stop(self) -> None:
        """A stop (or a system shutdown): STOP_PENDING with a wait hint covering the
        grace period, then the reactor is stopped from its own thread. A stop before
        the reactor exists is remembered and `run()` starts nothing."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._set(STOP_PENDING, self._stop_wait_ms)
            reactor = self._reactor
        if reactor is not None:
            reactor.callFromThread(self._stop_reactor)

    def interrogate(self) -> None:
        """The service manager asks for the status again: the current one."""
        with self._lock:
            if self.state is not None:
                self._set(self.state, self._stop_wait_ms if self.state == STOP_PENDING
                          else START_WAIT_HINT_MS if self.state == START_PENDING else 0)

    # -- the service-main thread ---------------------------------------------------

    def run(self) -> None:
        """Start, serve until stopped, return; or raise ServiceStartFailed after one
        event-log line (nothing is left bound or running then)."""
        try:
            self._run()
        except ServiceStartFailed:
            raise
        except Exception as e:      # a bug: one line still, the traceback in the log
            from twisted.logger import Logger
            Logger(namespace="twistproxy").failure("the service failed")
            line = f"twistproxy failed: {type(e).__name__}: {e} (the service log, " \
                   f"{self.log_path or 'not opened yet'}, has the traceback)"
            self._event("error", line)
            raise ServiceStartFailed(line) from e
        finally:
            # flushed, not closed: the global log observer may still write to it
            # (the process ends right after; the host reports STOPPED)
            if self._log_file is not None:
                try:
                    self._log_file.flush()
                except OSError:
                    pass

    def _run(self) -> None:
        from .. import __version__
        from ..config import ConfigError, load

        if not self._pending():
            return self._stopped_before_start()
        reactor = self._install_reactor()
        with self._lock:
            self._reactor = reactor
            stopping = self._stopping
        if stopping:
            return self._stopped_before_start()

        try:
            config = load(self.config_path)
        except ConfigError as e:
            self._fail(str(e))
        server = config.server
        self._stop_wait_ms = self._stop_hint_ms(server.graceful_timeout)
        if server.access_log == "-":
            self._fail(f"{config.path}: server.access_log: '-' (standard output) cannot be "
                       "used by a Windows service, which has no console: name a file, "
                       'or "" for no access log')
        if server.master_process:          # only off Windows (config refuses it there)
            self._fail(f"{config.path}: server.master_process: true cannot be used by a "
                       "Windows service, which runs as one process: set it to false")
        self.log_path = server.error_log or os.path.join(
            os.path.dirname(os.path.abspath(config.path)), LOG_NAME)
        self._open_log(config.path, bool(server.error_log))
        if not self._pending():
            return self._stopped_before_start()

        from ..service import StartupError, build_service
        try:
            service = build_service(config, reactor)
        except (ConfigError, StartupError) as e:     # a certificate; a port taken
            self._fail(str(e))
        try:
            service.startService()
        except Exception as e:
            from twisted.logger import Logger
            Logger(namespace="twistproxy").failure("startService failed")
            for p in getattr(service, "ports", []):
                p.stopListening()
            self._fail(f"{config.path}: twistproxy could not start: "
                       f"{type(e).__name__}: {e}")
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        started = (f"twistproxy {__version__} started: config {config.path}, "
                   f"listening on {', '.join(self._keys(service))}, log {self.log_path}")
        reactor.callWhenRunning(self._running, started)
        reactor.run(installSignalHandlers=False)
        self._event("info", "twistproxy stopped")

    def _pending(self) -> bool:
        """START_PENDING again (a new checkpoint: start-up is making progress), or
        False when a stop has come meanwhile."""
        with self._lock:
            if self._stopping:
                return False
            self._set(START_PENDING, START_WAIT_HINT_MS)
            return True

    def _running(self, started: str) -> None:
        """The reactor runs and the listeners accept: RUNNING, unless a stop came
        first (the status never goes back from STOP_PENDING)."""
        with self._lock:
            if self._stopping:
                return
            self._set(RUNNING, 0)
        self._event("info", started)

    def _stopped_before_start(self) -> None:
        self._event("info", "twistproxy stopped (the stop came before it had started)")

    def _fail(self, line: str) -> NoReturn:
        from twisted.logger import Logger
        Logger(namespace="twistproxy").error("{line}", line=line)
        self._event("error", line)
        raise ServiceStartFailed(line)

    # -- stopping (the reactor's thread) -------------------------------------------

    def _stop_reactor(self) -> None:
        from twisted.internet import task
        from twisted.internet.error import ReactorNotRunning
        from twisted.logger import Logger
        Logger(namespace="twistproxy").info("stop requested by the service manager")
        self._progress = task.LoopingCall(self._still_stopping)
        self._progress.clock = self._reactor
        self._progress.start(STOP_PROGRESS_S, now=False)
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass

    def _still_stopping(self) -> None:
        with self._lock:
            self._set(STOP_PENDING, self._stop_wait_ms)

    # -- helpers --------------------------------------------------------------------

    def _set(self, state: str, wait_hint_ms: int) -> None:
        """Report a status (the caller holds the lock, so reports keep their order)."""
        self.state = state
        self._report_cb(state, wait_hint_ms)

    @staticmethod
    def _stop_hint_ms(graceful_timeout: float | None) -> int:
        from ..config import ServerConfig
        if graceful_timeout is None:
            graceful_timeout = ServerConfig().graceful_timeout
        return int((graceful_timeout + STOP_MARGIN_S) * 1000)

    @staticmethod
    def _install_reactor():
        from ..cli import _install_reactor
        _install_reactor()       # on Windows: Twisted's default (select)
        from twisted.internet import reactor
        return reactor

    def _open_log(self, config_path: str, named: bool) -> None:
        """The service log (server.error_log, or twistproxy.log beside the
        configuration): Twisted's log, at level info, to that file."""
        import sys

        from twisted.logger import (
            FilteringLogObserver,
            LogLevel,
            LogLevelFilterPredicate,
            globalLogBeginner,
            textFileLogObserver,
        )
        try:
            self._log_file = open(self.log_path, "a", encoding="utf-8")
        except OSError as e:
            where = "server.error_log" if named else \
                f'the service log (server.error_log = "" means {LOG_NAME} here)'
            line = f"{config_path}: {where}: {self.log_path!r} cannot be opened: " \
                   f"{e.strerror or e}"
            self._event("error", line)
            raise ServiceStartFailed(line) from None
        files = [self._log_file] + ([sys.stderr] if self.console else [])
        # Any: zope interfaces (ILogObserver...) are not seen by mypy without a plugin
        from ..balancer.dnsnoise import quiet_dns_ports
        info: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        quiet: Any = quiet_dns_ports        # members_from's per-query UDP port lines
        observers: list[Any] = [FilteringLogObserver(cast(Any, textFileLogObserver(f)),
                                                     [quiet, info])
                                for f in files]
        globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    @staticmethod
    def _keys(service) -> list[str]:
        keys = [b.listen.key if b.listen.port else f"{b.listen.address}:{b.port}"
                for b in service.bound]
        if service.admin_bound is not None:
            b = service.admin_bound
            keys.append("admin " + (b.listen.key if b.listen.port else
                                    f"{b.listen.address}:{b.port}"))
        return keys

"""The master process: holds the listening sockets it bound, spawns the workers that
adopt them, replaces a worker that dies (with back-off), and stops them all gracefully.

It accepts no connection and proxies nothing; it must never die because a worker did.
Every listener's accept queue is the master's socket, shared by all workers (no
SO_REUSEPORT), so a worker that exits leaves queued connections to the others.
The config is validated once here and handed to each worker whole (pickled on its
stdin), so a replacement runs what the master validated even if the file changed.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import struct
import sys

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

from .. import __version__

log = Logger(namespace="twistproxy")

_WORKER_LINE = re.compile(r"^(\w+) (\S+) (worker \d+: .*)$", re.S)
_LEVELS = {lvl.name: lvl for lvl in LogLevel.iterconstants()}

BACKOFF_FIRST = 0.5      # first delay before replacing a worker that died at once
BACKOFF_MAX = 30.0       # doubling up to this
KILL_MARGIN = 5.0        # after graceful_timeout, this long before SIGKILL


def describe_exit(reason) -> str:
    """'exited with status 1' / 'was killed by signal 9 (SIGKILL)'."""
    v = reason.value
    sig = getattr(v, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by signal {sig} ({name})"
    return f"exited with status {getattr(v, 'exitCode', 0) or 0}"


class WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, master: "MasterService", index: int):
        self.master = master
        self.index = index
        self.pid = None
        self.started = 0.0
        self.ended = defer.Deferred()
        self._err = b""
        self.ready = False       # it said it serves (a death before that: "at once")

    def connectionMade(self):
        self.pid = self.transport.pid
        self.started = self.master.reactor.seconds()
        # the whole validated config, length-prefixed; the pipe then stays open: its
        # end (EOF in the worker) means the master is gone
        blob = pickle.dumps(self.master.config)
        self.transport.writeToChild(0, struct.pack("!I", len(blob)) + blob)

    def childDataReceived(self, fd, data):
        if fd == 3:
            if not self.ready and b"ready" in data:
                self.ready = True
                self.master._ready(self)
            return
        if fd != 2:
            return
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            self.master.relay(self.index, line.decode("utf-8", "replace"))

    def childConnectionLost(self, fd):
        if fd == 2 and self._err:
            self.master.relay(self.index, self._err.decode("utf-8", "replace"))
            self._err = b""

    def processEnded(self, reason):
        self.master._ended(self, reason)
        self.ended.callback(None)


class MasterService(Service):
    def __init__(self, config, bound, access_log, reactor=None, log_level: str = "info"):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.bound = bound
        self.access_log = access_log
        self.reactor = reactor
        self.log_level = log_level
        self.count = config.server.worker_processes
        self.workers: dict[int, WorkerProtocol] = {}
        self.stopping = False
        self._quick: dict[int, int] = {}       # slot -> deaths at once in a row
        self._pending: dict[int, object] = {}  # slot -> the delayed replacement
        self._loggers: dict[str, Logger] = {}
        self.handover = None   # hook: a process/handover.py HandoverServer, if configured

    def addresses(self) -> dict[str, int]:
        return {b.listen.key: b.port for b in self.bound}

    def relay(self, index: int, line: str) -> None:
        """A line a worker wrote on stderr, logged by the master: `LEVEL NAMESPACE
        TEXT` from its log observer (process/worker.py), or anything else (a crash's
        traceback, say) as a warning under its worker's number."""
        m = _WORKER_LINE.match(line)
        if m and m.group(1) in _LEVELS:
            ns = m.group(2)
            logger = self._loggers.get(ns) or self._loggers.setdefault(ns, Logger(namespace=ns))
            logger.emit(_LEVELS[m.group(1)], "{line}", line=m.group(3))
        elif line.strip():
            log.warn("worker {index}: {line}", index=index, line=line)

    def startService(self):
        super().startService()
        log.info("twistproxy {version}: master pid {pid}, {n} worker processes",
                 version=__version__, pid=os.getpid(), n=self.count)
        for b in self.bound:
            log.info("listening on {key}", key=b.listen.key if b.listen.port else
                     f"{b.listen.address}:{b.port}")
        for i in range(1, self.count + 1):
            self._spawn(i)
        if self.handover is not None:                    # hook: process/handover.py
            self.handover.start(self)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self.stopping:
            return
        # 0: config, then open while the master lives; 1: stdout (the access log's
        # "-"); 2: the worker's log lines, relayed; 3: "ready" once it serves
        fds = {0: "w", 1: 1, 2: "r", 3: "r"}
        n = 4
        listen_fds = []
        for b in self.bound:
            fds[n] = b.sock.fileno()
            listen_fds.append(str(n))
            n += 1
        args = [sys.executable, "-m", "twistproxy.process.worker", "--index", str(index),
                "--fds", ",".join(listen_fds), "--log-level", self.log_level]
        if self.access_log is not None:
            fds[n] = self.access_log.fileno()
            args += ["--log-fd", str(n)]
        proto = WorkerProtocol(self, index)
        self.workers[index] = proto
        try:
            self.reactor.spawnProcess(proto, sys.executable, args, env=os.environ.copy(),
                                      childFDs=fds)
        except OSError as e:         # no fork (memory, process limits): try again later
            del self.workers[index]
            self._quick[index] = self._quick.get(index, 0) + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._quick[index] - 1))
            log.error("worker {index} could not be started ({e}); trying again in "
                      "{delay:g}s", index=index, e=e.strerror or e, delay=delay)
            self._pending[index] = self.reactor.callLater(delay, self._spawn, index)
            return
        log.info("worker {index} started (pid {pid})", index=index, pid=proto.pid)

    def _ended(self, proto: WorkerProtocol, reason) -> None:
        index = proto.index
        if self.workers.get(index) is proto:
            del self.workers[index]
        how = describe_exit(reason)
        if self.stopping:
            log.info("worker {index} (pid {pid}) {how}", index=index, pid=proto.pid, how=how)
            return
        if not proto.ready:
            self._quick[index] = self._quick.get(index, 0) + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._quick[index] - 1))
        else:
            self._quick[index] = 0
            delay = 0.0
        log.warn("worker {index} (pid {pid}) {how}; replacing it{when}", index=index,
                 pid=proto.pid, how=how,
                 when=f" in {delay:g}s (it died at once {self._quick[index]} time(s) in a "
                      f"row)" if delay else "")
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)

    def _ready(self, proto: WorkerProtocol) -> None:
        self._quick[proto.index] = 0
        if self.handover is not None:                    # hook: process/handover.py
            self.handover.worker_ready(self)

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True
        if self.handover is not None:                    # hook: process/handover.py
            self.handover.stop()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        running = list(self.workers.values())
        log.info("stopping: {n} worker(s) finish in-flight requests (at most {t:g}s)",
                 n=len(running), t=self.config.server.graceful_timeout)
        for w in running:
            self._signal(w, "TERM")
        # the master's copies of the listening sockets: once the workers have stopped
        # listening too, the port is closed and new connections are refused
        for b in self.bound:
            b.sock.close()
        killer = self.reactor.callLater(self.config.server.graceful_timeout + KILL_MARGIN,
                                        self._kill_all)
        yield defer.DeferredList([w.ended for w in running])
        if killer.active():
            killer.cancel()
        if self.access_log is not None:
            self.access_log.close()
        log.info("all workers have exited")
        yield defer.maybeDeferred(super().stopService)

    def _kill_all(self) -> None:
        for w in list(self.workers.values()):
            log.warn("worker {index} (pid {pid}) did not stop in time: SIGKILL",
                     index=w.index, pid=w.pid)
            self._signal(w, "KILL")

    @staticmethod
    def _signal(w: WorkerProtocol, sig: str) -> None:
        try:
            w.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError):
            pass

"""A worker process: `python -m twistproxy.process.worker`, started by the master only.

Reads the master's validated config (pickled, length-prefixed) from stdin, adopts the
listening sockets it was given as descriptors (TLS listeners: the TCP port adopted, the
listener's TLS factory around it), appends to the shared access log descriptor, and
serves exactly as the single process does. SIGTERM/SIGINT: a graceful stop, once. The
end of stdin means the master is gone: the worker stops gracefully too.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import struct
import sys


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the master closed the pipe before the whole config arrived")
        data += chunk
    return data


def read_config(fd: int = 0):
    (n,) = struct.unpack("!I", _read_exact(fd, 4))
    return pickle.loads(_read_exact(fd, n))


class MasterWatch:
    """Reads the master's pipe (stdin); its end means the master is gone."""

    def __init__(self, fd: int, on_gone):
        self.fd = fd
        self.on_gone = on_gone
        os.set_blocking(fd, False)

    def fileno(self):
        return self.fd

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet import main
            return main.CONNECTION_DONE
        return None

    def connectionLost(self, reason):
        self.on_gone()

    def logPrefix(self):
        return "master-pipe"


def _start_logging(level: str, index: int) -> None:
    """Log events as `LEVEL NAMESPACE worker I: TEXT` lines on stderr, a pipe the master
    reads and logs through its own observers (a file under twistd, stderr with
    `twistproxy run`), so worker lines land where the master's do, timestamped once."""
    from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel,
                                LogLevelFilterPredicate, formatEvent, globalLogBeginner)

    def fmt(event):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
        lvl = event.get("log_level")
        ns = event.get("log_namespace") or "-"
        return f"{lvl.name if lvl else 'info'} {ns} worker {index}: {text}\n"

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, fmt), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="twistproxy.process.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--fds", default="")
    p.add_argument("--log-fd", type=int, default=None)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from ..cli import _install_reactor
    _install_reactor()
    from twisted.internet import reactor
    from twisted.logger import Logger

    from ..accesslog import AccessLog
    from ..config import ConfigError
    from ..listeners import BoundSocket
    from ..service import ProxyService
    from ..tls import check_files

    config = read_config(0)
    fds = [int(f) for f in args.fds.split(",") if f]
    if len(fds) != len(config.listeners):
        print(f"{len(fds)} sockets for {len(config.listeners)} "
              "listeners", file=sys.stderr)
        return 2
    try:
        tls = check_files(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    bound = [BoundSocket(listen, socket.socket(fileno=fd))
             for listen, fd in zip(config.listeners, fds)]
    access_log = None
    if config.server.access_log:
        fd = args.log_fd if args.log_fd is not None else 1
        access_log = AccessLog(config.server.access_log, fd=fd)
    service = ProxyService(config, bound, access_log, reactor, tls)
    service.ctx.served_by(args.index)
    _start_logging(args.log_level, args.index)
    log = Logger(namespace="twistproxy")

    stopping = []

    def stop(why: str) -> None:
        if stopping:
            return
        stopping.append(why)
        log.info("stopping ({why})", why=why)
        if reactor.running:
            reactor.stop()

    def on_signal(signum, frame):
        reactor.callFromThread(stop, signal.Signals(signum).name)

    # SIGINT ignored when we started (inherited from a master started in the
    # background) stays ignored: the worker then stops when the master says so
    sigint = signal.getsignal(signal.SIGINT) != signal.SIG_IGN

    signal.signal(signal.SIGTERM, on_signal)     # queued until the reactor runs
    if sigint:
        signal.signal(signal.SIGINT, on_signal)

    def running():
        reactor.addReader(MasterWatch(0, lambda: stop("the master is gone")))
        log.info("pid {pid} serving", pid=os.getpid())
        try:                     # tell the master: a death from now on is not "at once"
            os.write(3, b"ready\n")
            os.close(3)
        except OSError:
            pass

    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(running)
    # our own handlers (Twisted's would be put back to the defaults when run() returns,
    # and a late SIGTERM from the master would then kill a worker that stopped cleanly)
    reactor.run(installSignalHandlers=False)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())

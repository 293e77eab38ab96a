"""A worker process: `python -m twistproxy.process.worker`, started by the master only.

Reads the master's validated config (pickled, length-prefixed) from stdin, adopts the
listening sockets it was given as descriptors (TLS listeners: the TCP port adopted, the
listener's TLS factory around it), appends to the shared access log descriptor, and
serves exactly as the single process does, except for what the master owns: health
checks, the admin pages and admin state. Those reach it over the control channel on
fd 3 (process/control.py): edits to apply, counters to report, and the admin pages of
vhost routes, which the master answers. SIGTERM/SIGINT: a graceful stop, once. The
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


from . import control, totals
from ..runtime.state import Invalid


CONTROL_FD = 3       # the control channel's end (a socketpair), see process/control.py


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


class WorkerControl(control.Channel):
    """The worker's end of the control channel."""

    def __init__(self, ctx, index: int):
        super().__init__()
        self.ctx = ctx
        self.index = index
        self.applying = False          # edits from the master: not reported back
        ctx.runtime.subscribe(self._changed)

    @control.Apply.responder
    def apply(self, edits, source, who):
        self.applying = True
        try:
            for batch in control.batches(edits):
                self.ctx.runtime.apply(control.edits_from_rows(batch), source, who,
                                       now=self.ctx.reactor.seconds())
        except Invalid as e:
            raise ValueError(str(e)) from None
        finally:
            self.applying = False
        return {}

    @control.Census.responder
    def census(self):
        return {"snapshot": totals.snapshot(self.ctx)}

    def _changed(self, changes) -> None:
        if self.applying:
            return
        mine = [c for c in changes if c.source in ("failover", "retry")]
        if mine and self.transport is not None:
            self.callRemote(control.Report, edits=control.edits_of(mine),
                            source=mine[0].source, who=f"worker {self.index}")

    def admin_request(self, handler: str, vhost, raw: bytes, peer, host, secure: bool):
        """A vhost route's admin page, answered by the master: (Deferred, None)."""
        vhosts = self.ctx.config.vhosts
        index = next((i for i, v in enumerate(vhosts) if v is vhost), -1)
        d = self.callRemote(control.AdminRequest, handler=handler, vhost=index, raw=raw,
                            peer=peer.host, peer_port=peer.port, host=host.host,
                            host_port=host.port, secure=secure)
        d.addCallback(lambda r: r["answer"])
        return d, None


class RemoteAdmin:
    """ctx.admin in a worker: a vhost route's admin page goes to the master."""

    def __init__(self, ctx, control: WorkerControl):
        self.ctx = ctx
        self.control = control

    def serve(self, conn, req, handler: str) -> None:
        from ..admin.site import _Bridge
        vhost = req.route.vhost if req.route is not None else None
        _Bridge(self.ctx, lambda raw, peer, host, secure: self.control.admin_request(
            handler, vhost, raw, peer, host, secure), conn, req)


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
    p.add_argument("--reactor", default="auto")
    args = p.parse_args(argv)
    from ..cli import _install_reactor
    _install_reactor(args.reactor)
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
    service = ProxyService(config, bound, access_log, reactor, tls, controlled=True)
    ctx = service.ctx
    ctx.served_by(args.index)
    channel = WorkerControl(ctx, args.index)
    if any(r.handler for v in config.vhosts for r in v.routes):
        ctx.admin = RemoteAdmin(ctx, channel)
    from twisted.internet.protocol import Factory
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX,
                                  Factory.forProtocol(lambda: channel))
    os.close(CONTROL_FD)
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

    def synced(answer):
        # the master's runtime state first, then the listeners: no request is served
        # with the configuration's state when the master's differs
        channel.apply(answer["edits"], "master", "")
        service.startService()
        log.info("pid {pid} serving", pid=os.getpid())

    def running():
        reactor.addReader(MasterWatch(0, lambda: stop("the master is gone")))
        # tell the master: a death from now on is not "at once", and it may send work
        d = channel.callRemote(control.Ready, index=args.index, pid=os.getpid())
        d.addCallback(synced)
        d.addErrback(lambda f: (log.failure("starting", f),
                                stop("the master's state could not be applied")))

    reactor.addSystemEventTrigger("before", "shutdown", lambda: service.stopService()
                                  if service.running else None)
    reactor.callWhenRunning(running)
    # our own handlers (Twisted's would be put back to the defaults when run() returns,
    # and a late SIGTERM from the master would then kill a worker that stopped cleanly)
    reactor.run(installSignalHandlers=False)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())

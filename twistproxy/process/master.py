"""The master process: holds the listening sockets, spawns the workers that adopt them,
owns what must exist once (health checks, the admin listener and admin state), and
replaces its workers: one that died (with back-off), or all of them at a reload.

It accepts no proxied connection; it must never die because a worker did. Every
listener's accept queue is the master's socket, shared by all workers (no
SO_REUSEPORT), so a worker that exits leaves queued connections to the others.

A configuration is validated here and handed to each worker whole (pickled on its
stdin), so a replacement runs what the master validated even if the file changed.
Workers of one configuration are a `Generation`; a reload (SIGHUP) starts a new one
beside the old, and only once all of it serves does the old one stop accepting and
drain. Each worker has a control channel (AMP over a socketpair, process/control.py):
runtime changes made here are applied in every worker before a manager POST is
answered, a worker's own failovers come here and go on to the others, and the admin
pages sum the workers' counters when they are read.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import struct
import sys

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

from .. import __version__
from . import control, totals

log = Logger(namespace="twistproxy")

_WORKER_LINE = re.compile(r"^(\w+) (\S+) (worker \d+: .*)$", re.S)
_LEVELS = {lvl.name: lvl for lvl in LogLevel.iterconstants()}

BACKOFF_FIRST = 0.5      # first delay before replacing a worker that died at once
BACKOFF_MAX = 30.0       # doubling up to this
KILL_MARGIN = 5.0        # after graceful_timeout, this long before SIGKILL
READY_TIMEOUT = 60.0     # a reload's new workers must all serve within this
CENSUS_TIMEOUT = 5.0     # a worker that does not report its counters within this is left out


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


class MasterControl(control.Channel):
    """The master's end of one worker's control channel."""

    def __init__(self, master: "MasterService", worker: "WorkerProtocol"):
        super().__init__()
        self.master = master
        self.worker = worker

    @control.Ready.responder
    def ready(self, index, pid):
        return {"edits": self.master._ready(self.worker)}

    @control.Report.responder
    def report(self, edits, source, who):
        self.master._reported(self.worker, edits, source, who)
        return {}

    @control.AdminRequest.responder
    def admin_request(self, handler, vhost, raw, peer, peer_port, host, host_port, secure):
        return self.master._admin_request(self.worker, handler, vhost, raw, peer, peer_port,
                                          host, host_port, secure)


class WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, master: "MasterService", generation: "Generation", index: int):
        self.master = master
        self.generation = generation
        self.index = index
        self.pid = None
        self.started = 0.0
        self.ended = defer.Deferred()
        self._err = b""
        self.ready = False       # it said it serves (a death before that: "at once")
        self.control: MasterControl | None = None

    def connectionMade(self):
        self.pid = self.transport.pid
        self.started = self.master.reactor.seconds()
        # the whole validated config, length-prefixed; the pipe then stays open: its
        # end (EOF in the worker) means the master is gone
        blob = pickle.dumps(self.generation.config)
        self.transport.writeToChild(0, struct.pack("!I", len(blob)) + blob)

    def childDataReceived(self, fd, data):
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
        if self.control is not None and self.control.transport is not None:
            self.control.transport.loseConnection()
        self.master._ended(self, reason)
        self.ended.callback(None)

    def call(self, command, **kw):
        if self.control is None or self.control.transport is None:
            return defer.fail(error.ConnectionLost("the worker's control channel is closed"))
        return self.control.callRemote(command, **kw)


class Plane:
    """What the master owns for one configuration: its context (balancers, runtime,
    health checks) and its admin pages. It proxies nothing."""

    def __init__(self, config, reactor, tls: dict, started: float | None = None):
        from ..proxy import ProxyContext
        self.config = config
        self.tls = tls
        self.ctx = ProxyContext(config, reactor, None)
        self.admin = None
        if config.admin is not None or any(r.handler for v in config.vhosts for r in v.routes):
            from ..admin.site import Admin
            self.admin = self.ctx.admin = Admin(self.ctx, config.admin, started)

    def start(self) -> None:
        self.ctx.start_owned()          # health checks, members_from lookups

    def stop(self) -> None:
        self.ctx.stop_owned()

    def sync_rows(self) -> list[list]:
        """Edits that bring a worker's runtime (fresh from the same configuration) to
        this one's state: the manager's changes (as the state file has them) and the
        health and error flags."""
        from ..admin import persist
        runtime = self.ctx.runtime
        rows = control.edits_of_edits(persist.edits_from(persist.state_of(runtime), runtime))
        return _discovered_rows(runtime, runtime) + rows + _flag_rows(runtime, runtime)

    def carry_from(self, old: "Plane") -> int:
        """A reload: the old plane's admin state for what still exists here, and its
        nonces (a manager page open in a browser keeps working). Changes applied."""
        from ..admin import persist
        state = persist.still_existing(persist.state_of(old.ctx.runtime), self.ctx.runtime)
        rows = _discovered_rows(old.ctx.runtime, self.ctx.runtime)
        rows += control.edits_of_edits(persist.edits_from(state, self.ctx.runtime))
        rows += _flag_rows(old.ctx.runtime, self.ctx.runtime)
        n = 0
        for batch in control.batches(rows):
            try:
                n += len(self.ctx.runtime.apply(control.edits_from_rows(batch), "reload",
                                                now=self.ctx.reactor.seconds()))
            except Exception as e:      # the state of a member that changed its kind
                log.warn("reload: the admin state could not all be kept: {e}", e=e)
        if self.admin is not None and old.admin is not None:
            for name, nonce in old.admin.nonces.items():
                if name in self.admin.nonces:
                    self.admin.nonces[name] = nonce
        return n


def _discovered_rows(source, target) -> list[list]:
    """Edits making `source`'s members found by DNS again in `target` (a new worker,
    or a reload's runtime while its own lookups start), with their lbset, loadfactor
    and flags, for the balancers that still take members from DNS there."""
    from ..runtime.state import ADMIN_FLAGS
    rows = []
    for b in source.balancers.values():
        there = target.balancers.get(b.name)
        if there is None or there.config.members_from is None:
            continue
        for m in b.members:
            if not m.discovered:
                continue
            url = m.config.url.raw
            rows.append([b.name, None, "discover_member", url])
            rows.append([b.name, url, "lbset", m.lbset])
            rows.append([b.name, url, "loadfactor", m.lbfactor / 100])
            for f in ADMIN_FLAGS + "C":
                rows.append([b.name, url, f"status.{f}", f in m.flags])
    return rows


def _flag_rows(source, target) -> list[list]:
    """Edits setting the error (E) and health (C) flags `source`'s members have, for
    the members `target` has too (a reload's new configuration may have dropped some:
    an edit naming one would refuse its whole batch)."""
    from ..runtime.state import find_member
    rows = []
    for b in source.balancers.values():
        there = target.balancers.get(b.name)
        for m in b.members:
            if there is None or find_member(there, m.config.url.raw) is None:
                continue
            for f in "EC":
                if f in m.flags:
                    rows.append([b.name, m.config.url.raw, f"status.{f}", True])
    return rows


class Generation:
    """The workers started with one configuration."""

    def __init__(self, number: int, config, bound: list, access_log):
        self.number = number
        self.config = config
        self.bound = bound
        self.access_log = access_log
        self.count = config.server.worker_processes
        self.workers: dict[int, WorkerProtocol] = {}
        self.stopping = False
        self.all_ready = defer.Deferred()    # fires when every worker served once
        self.failed = None                   # why it could not start (before all_ready)

    def ready_workers(self):
        return [w for w in self.workers.values() if w.ready]


class MasterService(Service):
    def __init__(self, config, bound, access_log, reactor=None, log_level: str = "info",
                 tls: dict | None = None, admin_bound=None):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.bound = bound
        self.access_log = access_log
        self.admin_bound = admin_bound
        self.reactor = reactor
        self.log_level = log_level
        self.reactor_name = "auto"      # the workers' reactor: twistproxy run --reactor
        self.started = None
        self.plane = Plane(config, reactor, tls or {})
        self.cluster = None              # cluster/sync.py: this host's link to the others
        if config.cluster is not None:
            from ..cluster.sync import ClusterSync
            self.cluster = ClusterSync(config, reactor)
        self._wire(self.plane)
        self.generation = Generation(1, config, bound, access_log)
        self.draining: list[Generation] = []
        self.stopping = False
        self.reloading = False
        self.admin_port = None
        self._quick: dict[int, int] = {}       # slot -> deaths at once in a row
        self._pending: dict[int, object] = {}  # slot -> the delayed replacement
        self._loggers: dict[str, Logger] = {}
        self._origin: WorkerProtocol | None = None   # whose report is being applied

    @property
    def count(self) -> int:
        return self.generation.count

    @property
    def workers(self) -> dict[int, WorkerProtocol]:
        return self.generation.workers
        self.handover = None   # hook: a process/handover.py HandoverServer, if configured

    def addresses(self) -> dict[str, int]:
        out = {b.listen.key: b.port for b in self.bound}
        if self.admin_bound is not None:
            out["admin"] = self.admin_bound.port
        return out

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

    # -- starting ------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.started = self.reactor.seconds()
        log.info("twistproxy {version}: master pid {pid}, {n} worker process{es}",
                 version=__version__, pid=os.getpid(), n=self.count,
                 es="" if self.count == 1 else "es")
        for b in self.bound:
            log.info("listening on {key}", key=_shown(b))
        if self.plane.admin is not None:
            self.plane.admin.restore()         # the state file, before any worker serves
        if self.admin_bound is not None:
            self._start_admin(self.admin_bound)
        self.plane.start()
        if self.cluster is not None:
            self.cluster.start()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        self._start_generation(self.generation)
        if self.handover is not None:                    # hook: process/handover.py
            self.handover.start(self)

    def _wire(self, plane: Plane) -> None:
        plane.ctx.runtime.subscribe(self._broadcast)
        if self.cluster is not None:
            self.cluster.attach(plane.ctx)
        if plane.admin is not None:
            plane.admin.refresh = self.refresh

    def _start_admin(self, b) -> None:
        factory = self._admin_factory(self.plane)
        # the master keeps its copy (a hand-over sends it on; a reload keeps it)
        self.admin_port = self.reactor.adoptStreamPort(b.sock.fileno(), b.family, factory)
        log.info("admin listener on {scheme}://{key}/ ({pages})",
                 scheme="https" if "admin" in self.plane.tls else "http", key=_shown(b),
                 pages=", ".join(self.plane.admin.pages))

    @staticmethod
    def _admin_factory(plane: Plane):
        factory = plane.admin.listener_site()
        tls = plane.tls.get("admin")
        if tls is not None:
            from ..tls import listener_factory
            factory = listener_factory(tls, factory)
        return factory

    def _start_generation(self, gen: Generation) -> None:
        for i in range(1, gen.count + 1):
            self._spawn(gen, i)

    def _spawn(self, gen: Generation, index: int) -> None:
        self._pending.pop(index, None)
        if self.stopping or gen.stopping:
            return
        # 0: config, then open while the master lives; 1: stdout (the access log's
        # "-"); 2: the worker's log lines, relayed; 3: the control channel
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {0: "w", 1: 1, 2: "r", 3: theirs.fileno()}
        n = 4
        listen_fds = []
        for b in gen.bound:
            fds[n] = b.sock.fileno()
            listen_fds.append(str(n))
            n += 1
        args = [sys.executable, "-m", "twistproxy.process.worker", "--index", str(index),
                "--fds", ",".join(listen_fds), "--log-level", self.log_level,
                "--reactor", self.reactor_name]
        if gen.access_log is not None:
            fds[n] = gen.access_log.fileno()
            args += ["--log-fd", str(n)]
        proto = WorkerProtocol(self, gen, index)
        gen.workers[index] = proto
        try:
            self.reactor.spawnProcess(proto, sys.executable, args, env=os.environ.copy(),
                                      childFDs=fds)
        except OSError as e:         # no fork (memory, process limits): try again later
            ours.close()
            theirs.close()
            del gen.workers[index]
            self._quick[index] = self._quick.get(index, 0) + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._quick[index] - 1))
            log.error("worker {index} could not be started ({e}); trying again in "
                      "{delay:g}s", index=index, e=e.strerror or e, delay=delay)
            self._pending[index] = self.reactor.callLater(delay, self._spawn, gen, index)
            return
        theirs.close()
        proto.control = MasterControl(self, proto)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           protocol.Factory.forProtocol(lambda: proto.control))
        ours.close()
        log.info("worker {index} started (pid {pid})", index=index, pid=proto.pid)

    def _ready(self, proto: WorkerProtocol) -> list[list]:
        """A worker is about to accept connections: from now on it gets every change,
        and first the state as it is (the manager's changes, health and error flags;
        a new generation gets them again at the switch), which it applies before it
        accepts anything."""
        self._quick[proto.index] = 0
        proto.ready = True
        gen = proto.generation
        if not gen.all_ready.called and len(gen.ready_workers()) == gen.count:
            self.reactor.callLater(0, gen.all_ready.callback, gen)
        if self.handover is not None and gen is self.generation:  # hook: process/handover.py
            self.reactor.callLater(0, self.handover.worker_ready, self)
        return self._plane_of(gen).sync_rows()

    def _plane_of(self, gen: Generation) -> Plane:
        return getattr(gen, "plane", None) or self.plane

    def _ended(self, proto: WorkerProtocol, reason) -> None:
        index, gen = proto.index, proto.generation
        if gen.workers.get(index) is proto:
            del gen.workers[index]
        how = describe_exit(reason)
        if self.stopping or gen.stopping:
            log.info("worker {index} (pid {pid}) {how}", index=index, pid=proto.pid, how=how)
            return
        if gen is not self.generation and not gen.all_ready.called:
            # a reload's new worker died before all of them served: the reload fails
            gen.failed = f"worker {index} (pid {proto.pid}) {how} before serving"
            gen.all_ready.errback(RuntimeError(gen.failed))
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
        self._pending[index] = self.reactor.callLater(delay, self._spawn, gen, index)

    # -- runtime state: made here, applied in every worker --------------------------------

    def _broadcast(self, changes) -> None:
        """Every change of the master's runtime goes to the current generation's
        workers (not back to the worker that reported it); a page that made them
        waits for their answers (Admin.settled)."""
        rows = control.edits_of(changes)
        if not rows:
            return
        admin = self.plane.admin
        for w in self.generation.ready_workers():
            if w is self._origin:
                continue
            d = w.call(control.Apply, edits=rows, source=changes[0].source,
                       who=changes[0].who)
            d.addErrback(self._apply_failed, w)
            if admin is not None:
                admin.pending.append(d)

    def _apply_failed(self, failure, w: WorkerProtocol) -> None:
        if w.control is not None and w.control.transport is not None:
            log.error("worker {index} (pid {pid}) could not apply a runtime change: "
                      "{why}", index=w.index, pid=w.pid, why=failure.getErrorMessage())

    def _reported(self, w: WorkerProtocol, rows, source: str, who: str) -> None:
        if w.generation is not self.generation:
            return                       # a draining worker's failovers are its own
        self._origin = w
        try:
            for batch in control.batches(rows):
                self.plane.ctx.runtime.apply(control.edits_from_rows(batch), source, who,
                                             now=self.reactor.seconds())
        except Exception as e:
            log.warn("worker {index}'s {source} change was not taken: {e}",
                     index=w.index, source=source, e=e)
        finally:
            self._origin = None

    def refresh(self):
        """Sum every serving worker's counters into the master's context."""
        workers = self.generation.ready_workers()
        calls = [w.call(control.Census).addTimeout(CENSUS_TIMEOUT, self.reactor)
                 for w in workers]
        ctx = self.plane.ctx

        def summed(results):
            snaps = [r["snapshot"] for ok, r in results if ok]
            ctx.totals = totals.merge(ctx, snaps)
            ctx.generation = self.generation.number
            return None

        return defer.DeferredList(calls, consumeErrors=True).addCallback(summed)

    def _admin_request(self, w, handler, vhost, raw, peer, peer_port, host, host_port,
                       secure):
        from ..admin.site import _address, run_in_memory
        plane = self._plane_of(w.generation)
        vhosts = plane.config.vhosts
        site = plane.admin.route_site(handler, vhosts[vhost] if 0 <= vhost < len(vhosts)
                                      else None) if plane.admin is not None else None
        if site is None:
            body = f"handler {handler!r} is not available in this build\n".encode()
            return {"answer": b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                              b"\r\n" + body}
        d, _ = run_in_memory(site, self.reactor, raw, _address(peer, peer_port),
                             _address(host, host_port), secure)
        return d.addCallback(lambda answer: {"answer": answer})

    # -- reloading ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def reload(self):
        """SIGHUP: read and check the file again; a valid one gets a new generation of
        workers, and the old one drains once all of it serves. Anything wrong: one log
        line and nothing changed."""
        if self.stopping:
            return
        if self.reloading:
            log.warn("reload: one is already under way; this signal is ignored")
            return
        self.reloading = True
        try:
            yield self._reload()
        except Exception:
            log.failure("reload failed; nothing changed")
        finally:
            self.reloading = False

    @defer.inlineCallbacks
    def _reload(self):
        from ..config import ConfigError, load
        from ..listeners import BindError, bind_one
        from ..service import StartupError, open_access_log
        from ..tls import check_files
        path = self.config.path
        log.info("reload: reading {path}", path=path)
        try:
            config = load(path)
            tls = check_files(config)
            if not config.server.master_process:
                raise ConfigError(f"{path}: server.master_process: false needs a restart, "
                                  "not a reload")
        except ConfigError as e:
            log.error("reload: {e}; nothing changed", e=e)
            return
        old = {b.listen.key: b for b in self.bound}
        fresh = []                 # bound for this reload: closed again if it fails
        try:
            bound = []
            for listen in config.listeners:
                b = old.get(listen.key)
                if b is None:
                    b = bind_one(listen)
                    fresh.append(b)
                else:
                    b = type(b)(listen, b.sock)
                bound.append(b)
            admin_bound = None
            want = config.admin.listen if config.admin is not None else None
            if want is not None:
                if self.admin_bound is not None and self.admin_bound.listen.key == want.key:
                    admin_bound = self.admin_bound
                else:
                    admin_bound = bind_one(want)
                    fresh.append(admin_bound)
            if config.server.access_log == self.config.server.access_log:
                access_log = self.access_log
            else:
                access_log = open_access_log(config, [])
            plane = Plane(config, self.reactor, tls, self.plane.admin.started
                          if self.plane.admin is not None else None)
        except (BindError, StartupError, ConfigError) as e:
            for b in fresh:
                b.sock.close()
            log.error("reload: {e}; nothing changed", e=e)
            return
        kept = plane.carry_from(self.plane)
        gen = Generation(self.generation.number + 1, config, bound, access_log)
        gen.plane = plane
        log.info("reload: starting generation {n} ({count} worker process{es}){kept}",
                 n=gen.number, count=gen.count, es="" if gen.count == 1 else "es",
                 kept=f"; {kept} admin change(s) kept" if kept else "")
        self._start_generation(gen)
        timer = self.reactor.callLater(READY_TIMEOUT, lambda: None if gen.all_ready.called
                                       else gen.all_ready.errback(RuntimeError(
                                           f"not all its workers served within "
                                           f"{READY_TIMEOUT:g}s")))
        try:
            yield gen.all_ready
        except RuntimeError as e:
            gen.stopping = True
            for w in list(gen.workers.values()):
                self._signal(w, "KILL")
            for b in fresh:
                b.sock.close()
            if access_log is not self.access_log and access_log is not None:
                access_log.close()
            log.error("reload: generation {n} failed: {e}; the running workers go on "
                      "with the old configuration", n=gen.number, e=e)
            return
        finally:
            if timer.active():
                timer.cancel()
        if self.stopping:
            return
        self._switch(gen, plane, bound, admin_bound, access_log)

    def _switch(self, gen: Generation, plane: Plane, bound, admin_bound, access_log) -> None:
        old_gen, old_plane = self.generation, self.plane
        # changes made while the new workers started: carried again (edits that set
        # what is already there are not changes), and every new worker synced again
        plane.carry_from(old_plane)
        del gen.plane
        self.plane, self.generation, self.config = plane, gen, gen.config
        self._wire(plane)
        old_plane.stop()
        plane.start()
        rows = plane.sync_rows()
        if rows:
            for w in gen.ready_workers():
                w.call(control.Apply, edits=rows, source="master", who="").addErrback(
                    self._apply_failed, w)
        # the admin listener: the same socket, the new pages; or another, or none
        if self.admin_port is not None and admin_bound is self.admin_bound \
                and plane.admin is not None:
            old_factory = self.admin_port.factory
            factory = self._admin_factory(plane)
            factory.doStart()
            self.admin_port.factory = factory
            old_factory.doStop()
        else:
            if self.admin_port is not None:
                self.admin_port.stopListening()
                self.admin_port = None
            if self.admin_bound is not None:
                self.admin_bound.sock.close()
            self.admin_bound = admin_bound
            if admin_bound is not None and plane.admin is not None:
                self._start_admin(admin_bound)
        # listeners no longer configured: the master's copy closed (the old workers
        # close theirs as they stop accepting)
        keys = {b.listen.key for b in bound}
        for b in self.bound:
            if b.listen.key not in keys:
                b.sock.close()
                log.info("reload: no longer listening on {key}", key=b.listen.key)
        for b in bound:
            if b.listen.key not in {o.listen.key for o in self.bound}:
                log.info("reload: listening on {key}", key=_shown(b))
        self.bound = bound
        if access_log is not self.access_log:
            old_log, self.access_log = self.access_log, access_log
            old_gen.closing_log = old_log
        self.draining.append(old_gen)
        old_gen.stopping = True
        log.info("reload: generation {n} serves; generation {old} finishes what it has "
                 "in flight (at most {t:g}s)", n=gen.number, old=old_gen.number,
                 t=old_gen.config.server.graceful_timeout)
        self._drain(old_gen)

    @defer.inlineCallbacks
    def _drain(self, gen: Generation):
        yield self._terminate(list(gen.workers.values()), gen.config.server.graceful_timeout)
        if gen in self.draining:
            self.draining.remove(gen)
        closing = getattr(gen, "closing_log", None)
        if closing is not None:
            closing.close()
        log.info("generation {n} has exited", n=gen.number)

    # -- stopping ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True
        if self.handover is not None:                    # hook: process/handover.py
            self.handover.stop()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        self.plane.stop()
        if self.cluster is not None:
            yield self.cluster.stop()
        gens = [self.generation] + self.draining
        running = [w for g in gens for w in g.workers.values()]
        log.info("stopping: {n} worker(s) finish in-flight requests (at most {t:g}s)",
                 n=len(running), t=self.config.server.graceful_timeout)
        ended = self._terminate(running, self.config.server.graceful_timeout)
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
        if self.admin_bound is not None:
            self.admin_bound.sock.close()
        # the master's copies of the listening sockets: once the workers have stopped
        # listening too, the port is closed and new connections are refused
        for b in self.bound:
            b.sock.close()
        yield ended
        if self.access_log is not None:
            self.access_log.close()
        log.info("all workers have exited")
        yield defer.maybeDeferred(super().stopService)

    def _terminate(self, workers, grace: float):
        """SIGTERM to each worker (a graceful stop); SIGKILL to those still there
        `grace` + KILL_MARGIN seconds later. A Deferred that fires once all have ended."""
        for w in workers:
            self._signal(w, "TERM")
        killer = self.reactor.callLater(grace + KILL_MARGIN, self._kill, workers)

        def ended(result):
            if killer.active():
                killer.cancel()
            return result
        return defer.DeferredList([w.ended for w in workers]).addBoth(ended)

    def _kill(self, workers) -> None:
        for w in workers:
            if not w.ended.called:
                log.warn("worker {index} (pid {pid}) did not stop in time: SIGKILL",
                         index=w.index, pid=w.pid)
                self._signal(w, "KILL")

    @staticmethod
    def _signal(w: WorkerProtocol, sig: str) -> None:
        try:
            w.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError, AttributeError):
            pass


def _shown(b) -> str:
    return b.listen.key if b.listen.port else f"{b.listen.address}:{b.port}"

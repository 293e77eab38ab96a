"""The cluster protocol: one host's admin state shared with the others through Redis.

Owns what is written, when, and how a node's runtime is brought to the cluster's:
- `{name}:state`: ONE JSON document {"version": N, "state": <the state file's format
  (admin/persist.py): the manager's changes as differences from the configuration>,
  "origin": {"node", "source", "who", "at"}}; written by compare-and-set on its
  version (store.WRITE, a Lua script), which also PUBLISHes N on `{name}:changes`;
- `{name}:node:{node}`: this node's heartbeat (config digest, version applied, pid,
  time), SET with EX HEARTBEAT_TTL every HEARTBEAT seconds, and its name in the set
  `{name}:nodes` (taken out once its heartbeat has expired);
- a local admin change (source manager, api, state-file) is kept as pending and
  written; a message on the channel, a reconnect, and every heartbeat read the
  document, and a newer version is applied as one batch of edits with source
  "cluster" (who: the node it came from), which the master's broadcast carries to its
  workers and which is never written back (no echo);
- the reconciliation rule (`plan`), for a node that comes back to Redis.
Health (E, C flags) stays each node's own: the document holds only what the manager
changes. With share_health, one node per balancer holds `{name}:lease:{balancer}`
(SET with a TTL, renewed every heartbeat, free again when its holder dies or stops)
and is the only one whose health checks of it run; it writes the members it found
down to `{name}:health:{balancer}` and publishes `health:{balancer}`; the others
apply that (source "cluster"). Without Redis every node checks for itself again. Nothing here is reached by proxied requests; Redis's absence only stops
sharing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from ..admin import persist
from ..balancer.group import parse_status
from ..runtime.state import ADMIN_FLAGS, Edit, _get, changes_text, find_member
from ..process import control

log = Logger(namespace="twistproxy.cluster")

LOCAL = ("manager", "api", "state-file")   # admin sources this node writes to the cluster
HEARTBEAT = 1.0
HEARTBEAT_TTL = 5
HISTORY = 10                               # changes the pages list, with their origin
LEASE_TTL = 3          # share_health: a dead checker is replaced within this


def digest(config) -> str:
    """What must be the same on every node for the shared state to mean the same: the
    balancers (not the listeners, which differ from host to host). 12 hex digits."""
    text = repr(sorted((name, b) for name, b in config.balancers.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Pending:
    """A local admin change not yet in the cluster's document. `offline`: made while
    Redis was unreachable (or before this node first reached it: the state file)."""
    rows: list
    source: str
    who: str
    offline: bool


def plan(cluster: int, applied: int, pending: list[Pending]):
    """The reconciliation rule. `cluster`: the document's version in Redis (0: none),
    `applied`: the version this node's state is (or last was) at.

    - cluster > applied: the cluster moved on; its document is applied here. Changes
      made offline are dropped (each is logged); changes made online (a race with
      another node's write) are made again on top and written.
    - cluster == applied: nothing was written meanwhile; pending changes (online or
      offline) are written as version cluster + 1.
    - cluster < applied: Redis lost the document (restarted without persistence):
      this node writes its state back, as version applied (+ 1 with pending changes).
      Of several nodes, the highest version wins: a node behind applies it later.

    Returns (apply the cluster's document?, pending kept, pending dropped,
    the version to write or None, the version expected there)."""
    if cluster > applied:
        kept = [p for p in pending if not p.offline]
        dropped = [p for p in pending if p.offline]
        return True, kept, dropped, (cluster + 1 if kept else None), cluster
    if cluster == applied:
        return False, pending, [], (cluster + 1 if pending else None), cluster
    return False, pending, [], applied + (1 if pending else 0), cluster


def edits_to(state: dict, runtime) -> tuple[list[Edit], list[str]]:
    """Edits that make `runtime` what `state` (persist's format) says, from its
    configuration: fields the state names take its values, others go back to the
    configuration's. Only edits that change something. And what could not be done."""
    edits: list[Edit] = []
    problems: list[str] = []
    wanted = state.get("balancers") or {}
    for name in wanted:
        if name not in runtime.balancers:
            problems.append(f"balancer://{name} is not in this node's configuration")
    for name, b in runtime.balancers.items():
        entry = wanted.get(name) or {}
        settings = entry.get("settings") or {}
        for k in persist._BALANCER:
            value = settings.get(k, getattr(b.config, k))
            if value is not None and value != getattr(b, k):
                edits.append(Edit(name, k, value))
        fields_of = entry.get("members") or {}
        added = entry.get("added") or []
        configured = {m.url.raw for m in b.config.members}
        for url in added:
            if find_member(b, url) is None:
                edits.append(Edit(name, "add_member", url))
                for k, v in (fields_of.get(url) or {}).items():
                    if k == "flags":
                        edits += [Edit(name, f"status.{f}", f in v, member=url)
                                  for f in ADMIN_FLAGS if (f in v) != (f == "D")]
                    elif k in persist._MEMBER:
                        edits.append(Edit(name, k, v, member=url))
        for m in b.members:
            url = m.config.url.raw
            if url not in configured and url not in added:
                problems.append(f"balancer://{name} member {url} was added here and "
                                "cannot be removed")
            f = fields_of.get(url) or {}
            init = {"loadfactor": m.config.loadfactor, "lbset": m.config.lbset,
                    "route": m.config.route, "redirect": m.config.redirect}
            for k in persist._MEMBER:
                value = f.get(k, init[k])
                if value != _get(m, k):
                    edits.append(Edit(name, k, value, member=url))
            flags = f.get("flags", "".join(parse_status(m.config.status)))
            for fl in ADMIN_FLAGS:
                if (fl in flags) != (fl in m.flags):
                    edits.append(Edit(name, f"status.{fl}", fl in flags, member=url))
    return edits, problems


class ClusterSync:
    """One host's side of the cluster: its master's (or its one process's) runtime,
    kept in step with the document in Redis."""

    def __init__(self, config, reactor):
        from .store import Link
        self.cc = config.cluster
        self.reactor = reactor
        self.digest = digest(config)
        self.prefix = self.cc.name
        self.key = f"{self.prefix}:state"
        self.channel = f"{self.prefix}:changes"
        self.runtime = None
        self.applied = 0                 # the version this node's state is at
        self.pending: list[Pending] = []
        self.origin: dict | None = None  # where the last change applied came from
        self.nodes: dict[str, dict] = {}  # heartbeats read from Redis, by node
        self.dropped = 0                 # offline changes replaced by the cluster's
        self._busy = False
        self._again = False
        self._problems_logged: set = set()
        self.history: deque = deque(maxlen=HISTORY)   # the last versions, newest last
        self.ctx = None
        self.holders: dict[str, str] = {}     # share_health: balancer -> its checker
        self._checking: dict[str, bool] = {}  # balancer -> our checks running
        self._health_seen: dict[str, str] = {}
        self.link = Link(self.cc, reactor, self.channel, self._up, self._down,
                         self._message)
        self._beat = task.LoopingCall(self._tick)
        self._beat.clock = reactor

    # -- wiring ------------------------------------------------------------------------

    def attach(self, ctx) -> None:
        """The context whose runtime is shared (again after a reload)."""
        ctx.cluster = self
        self.ctx = ctx
        self._checking = {}               # the plane starts every check: ours again
        self.holders = {}
        self.digest = digest(ctx.config)
        if ctx.config.cluster != self.cc:
            log.warn("cluster: [cluster] changed in the configuration: a restart takes it "
                     "(this node goes on as cluster {name}, node {node})", name=self.cc.name,
                     node=self.cc.node)
        runtime = self.runtime = ctx.runtime

        def changed(changes):
            if runtime is self.runtime:
                self._local(changes)
        runtime.subscribe(changed)

    def start(self) -> None:
        self.link.start()
        self._beat.start(HEARTBEAT, now=False)

    def stop(self):
        if self._beat.running:
            self._beat.stop()
        cmd = self.link.cmd
        d = defer.succeed(None)
        if cmd is not None and self.link.connected:
            from .store import RELEASE
            calls = [defer.maybeDeferred(cmd.delete, f"{self.prefix}:node:{self.cc.node}"),
                     defer.maybeDeferred(cmd.srem, f"{self.prefix}:nodes", self.cc.node)]
            calls += [defer.maybeDeferred(cmd.eval, RELEASE, keys=[self._lease_key(b)],
                                          args=[self.cc.node])
                      for b, h in self.holders.items() if h == self.cc.node]
            d = defer.DeferredList(calls, consumeErrors=True)
            d.addTimeout(1.0, self.reactor)
            d.addErrback(lambda _: None)
        return d.addBoth(lambda _: self.link.stop())

    # -- events ------------------------------------------------------------------------

    def _local(self, changes) -> None:
        by = {}
        for c in changes:
            if c.source in LOCAL:
                by.setdefault((c.source, c.who), []).append(c)
        if self.cc.share_health and self.link.connected:
            for b in {c.balancer for c in changes if c.source == "health"}:
                if self.holders.get(b) == self.cc.node:
                    self._write_health(b).addErrback(self._redis_failed, "health")
        for (source, who), cs in by.items():
            self.pending.append(Pending(control.edits_of(cs), source, who,
                                        offline=not self.link.connected))
        if by:
            self.kick()

    def _up(self, cmd) -> None:
        self.kick()
        self._tick()

    def _down(self) -> None:
        if self.cc.share_health:
            self.holders = {}
            for b in self._checked_balancers():   # no Redis: every node checks again
                self._run_checks(b, True)

    def _message(self, channel, message) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if isinstance(message, str) and message.startswith("health:"):
            b = message[7:]
            if self.cc.share_health and self.holders.get(b) not in (None, self.cc.node):
                self._read_health(b).addErrback(self._redis_failed, "health")
            return
        try:
            version = int(message)
        except (TypeError, ValueError):
            return
        if version != self.applied:
            self.kick()

    def _tick(self) -> None:
        if self.link.connected:
            self._heartbeat().addErrback(self._redis_failed, "heartbeat")
            self.kick()
            if self.cc.share_health:
                self._leases().addErrback(self._redis_failed, "lease")

    # -- the heartbeat and the nodes -----------------------------------------------------

    @defer.inlineCallbacks
    def _heartbeat(self):
        cmd = self.link.cmd
        beat = {"node": self.cc.node, "digest": self.digest, "version": self.applied,
                "pid": os.getpid(), "at": self.reactor.seconds()}
        yield cmd.set(f"{self.prefix}:node:{self.cc.node}", json.dumps(beat),
                      expire=HEARTBEAT_TTL)
        # the names in a set (no KEYS on a shared server); a name whose heartbeat
        # expired is taken out of it
        yield cmd.sadd(f"{self.prefix}:nodes", self.cc.node)
        names = sorted(n.decode() if isinstance(n, bytes) else n
                       for n in (yield cmd.smembers(f"{self.prefix}:nodes")))
        nodes, gone = {}, []
        values = (yield cmd.mget([f"{self.prefix}:node:{n}" for n in names])) if names \
            else []
        for name, v in zip(names, values):
            if v is None:
                gone.append(name)
                continue
            try:
                b = json.loads(v)
                nodes[b["node"]] = b
            except (TypeError, ValueError, KeyError):
                continue
        if gone:
            yield cmd.srem(f"{self.prefix}:nodes", gone)
        self.nodes = nodes

    # -- share_health: one checker per balancer ------------------------------------------

    def _lease_key(self, b: str) -> str:
        return f"{self.prefix}:lease:{b}"

    def _checked_balancers(self) -> list[str]:
        if self.ctx is None:
            return []
        return sorted({c.balancer_name for c in self.ctx.health_checks})

    def _run_checks(self, b: str, on: bool) -> None:
        if self._checking.get(b, True) == on:
            return
        self._checking[b] = on
        for c in self.ctx.health_checks:
            if c.balancer_name == b:
                if on:
                    c.start()
                else:
                    c.in_flight = False   # a probe cut short here is no failure
                    c.stop()

    @defer.inlineCallbacks
    def _leases(self):
        from .store import LEASE
        cmd = self.link.cmd
        for b in self._checked_balancers():
            holder = yield cmd.eval(LEASE, keys=[self._lease_key(b)],
                                    args=[self.cc.node, LEASE_TTL])
            if isinstance(holder, bytes):
                holder = holder.decode()
            before = self.holders.get(b)
            self.holders[b] = holder
            mine = holder == self.cc.node
            if holder != before:
                log.info("cluster: balancer://{b}: health checks by {who}", b=b,
                         who="this node" if mine else f"node {holder}")
            self._run_checks(b, mine)
            if mine:
                yield self._write_health(b, publish=holder != before)
            else:
                yield self._read_health(b)

    @defer.inlineCallbacks
    def _write_health(self, b: str, publish: bool = True):
        balancer = self.ctx.runtime.balancers.get(b)
        if balancer is None or not self.link.connected:
            return
        down = sorted(m.name for m in balancer.members if "C" in m.flags)
        doc = json.dumps({"node": self.cc.node, "down": down})
        cmd = self.link.cmd
        yield cmd.set(f"{self.prefix}:health:{b}", doc, expire=LEASE_TTL * 2)
        if publish or self._health_seen.get(b) != doc:
            self._health_seen[b] = doc
            yield cmd.publish(self.channel, f"health:{b}")

    @defer.inlineCallbacks
    def _read_health(self, b: str):
        raw = yield self.link.cmd.get(f"{self.prefix}:health:{b}")
        balancer = self.ctx.runtime.balancers.get(b) if self.ctx is not None else None
        if not raw or balancer is None or self.holders.get(b) == self.cc.node:
            return
        doc = json.loads(raw)
        down = set(doc.get("down") or [])
        rows = [[b, m.name, "status.C", m.name in down] for m in balancer.members
                if ("C" in m.flags) != (m.name in down)]
        if rows:
            changes = self.ctx.runtime.apply(control.edits_from_rows(rows), "cluster",
                                             doc.get("node", ""), now=self.reactor.seconds())
            log.info("cluster: balancer://{b}: health from node {node}: {what}", b=b,
                     node=doc.get("node", "?"), what=changes_text(changes)())

    def summary(self) -> dict:
        """For the pages: this node, the nodes seen, the last change's origin."""
        now = self.reactor.seconds()
        nodes = []
        for name, b in sorted(self.nodes.items()):
            nodes.append({"node": name, "digest": b.get("digest"),
                          "same_config": b.get("digest") == self.digest,
                          "version": b.get("version"), "pid": b.get("pid"),
                          "seen": round(max(0.0, now - float(b.get("at") or now)), 1),
                          "self": name == self.cc.node})
        return {"name": self.cc.name, "node": self.cc.node, "redis": self.cc.shown_url,
                "connected": self.link.connected, "error": self.link.failed,
                "version": self.applied, "digest": self.digest,
                "pending": len(self.pending), "dropped": self.dropped,
                "nodes": nodes, "last_change": self.origin,
                "changes": list(reversed(self.history)),
                "share_health": self.cc.share_health,
                "health_checkers": dict(sorted(self.holders.items()))}

    # -- reading and writing the document ----------------------------------------------

    def kick(self) -> None:
        """Bring this node and the document in step (one pass at a time)."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        d = self._sync()
        d.addErrback(self._redis_failed, "sync")
        d.addBoth(self._done)

    def _done(self, _):
        self._busy = False
        if self._again and self.link.connected:
            self._again = False
            self.kick()

    def _redis_failed(self, failure, what: str) -> None:
        text = failure.getErrorMessage()
        if "NOAUTH" in text or "WRONGPASS" in text:
            self.link.refused(f"authentication failed ({text.strip()})")
            self.link.stop()
            return
        log.debug("cluster: {what}: {why}", what=what, why=text)

    @defer.inlineCallbacks
    def _sync(self):
        for _ in range(5):
            self._again = False
            cmd = self.link.cmd
            if not self.link.connected or cmd is None or self.runtime is None:
                return
            raw = yield cmd.get(self.key)
            doc = json.loads(raw) if raw else None
            cluster = int(doc["version"]) if doc else 0
            apply, kept, dropped, write, expect = plan(cluster, self.applied, self.pending)
            if apply:
                self._apply(doc)
                for p in dropped:
                    self.dropped += 1
                    log.warn("cluster: a {source} change made while Redis was unreachable "
                             "is replaced by the cluster's version {v} (from {node}): "
                             "{rows}", source=p.source, v=cluster,
                             node=(doc.get("origin") or {}).get("node", "?"),
                             rows=_rows_text(p.rows))
                for p in kept:
                    self._reapply(p)
                self.applied = cluster
                self.pending = kept
            if write is not None:
                ok = yield self._write(cmd, expect, write)
                if not ok:
                    continue              # another node wrote in between: read again
            if not self._again:
                return

    @defer.inlineCallbacks
    def _write(self, cmd, expect: int, version: int):
        from .store import WRITE
        taken = list(self.pending)
        last = taken[-1] if taken else None
        if last is None and self.origin:  # writing back what Redis lost: as it was
            origin = {k: v for k, v in self.origin.items() if k != "version"}
        else:
            origin = {"node": self.cc.node, "source": last.source if last else "seed",
                      "who": last.who if last else "", "at": self.reactor.seconds()}
        body = json.dumps({"state": persist.state_of(self.runtime), "origin": origin},
                          separators=(",", ":"), sort_keys=True)
        result = yield cmd.eval(WRITE, keys=[self.key, self.channel],
                                args=[expect, version, body])
        if int(result) < 0:
            return False
        self.applied = version
        self.pending = [p for p in self.pending if p not in taken]
        self.origin = dict(origin, version=version)
        if taken:
            self.history.append(dict(self.origin, what=_rows_text(
                [r for p in taken for r in p.rows])))
            log.info("cluster: version {v} written ({n} change(s) from {source})",
                     v=version, n=sum(len(p.rows) for p in taken), source=origin["source"])
        return True

    def _apply(self, doc: dict) -> None:
        origin = doc.get("origin") or {}
        who = origin.get("node", "")
        edits, problems = edits_to(doc.get("state") or {}, self.runtime)
        for p in problems:
            if p not in self._problems_logged:
                self._problems_logged.add(p)
                log.warn("cluster: version {v} from {node}: {p} (is the configuration the "
                         "same on every node? compare the digests on the manager page)",
                         v=doc.get("version"), node=who or "?", p=p)
        rows = control.edits_of_edits(edits)
        applied = []
        for batch in control.batches(rows):
            try:
                applied += self.runtime.apply(control.edits_from_rows(batch), "cluster", who,
                                              now=self.reactor.seconds())
            except Exception as e:
                log.warn("cluster: version {v} from {node} could not all be applied: {e}",
                         v=doc.get("version"), node=who or "?", e=e)
        self.origin = dict(origin, version=doc.get("version"))
        if applied:
            self.history.append(dict(self.origin, what=changes_text(applied)()))
            log.info("cluster: version {v} from {node} ({source} {who}): {what}",
                     v=doc.get("version"), node=who or "?", source=origin.get("source", "?"),
                     who=origin.get("who") or "-", what=changes_text(applied)())

    def _reapply(self, p: Pending) -> None:
        try:
            for batch in control.batches(p.rows):
                self.runtime.apply(control.edits_from_rows(batch), "cluster", self.cc.node,
                                   now=self.reactor.seconds())
        except Exception as e:
            log.warn("cluster: a {source} change could not be made again on the cluster's "
                     "state: {e}", source=p.source, e=e)


def _rows_text(rows) -> str:
    return ", ".join(f"balancer://{b}{' member ' + m if m else ''} {f} = {v!r}"
                     for b, m, f, v in rows)

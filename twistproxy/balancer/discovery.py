"""Balancer members found by DNS (`[balancer.NAME] members_from`).

Owns, per balancer with `members_from`, the periodic asynchronous DNS lookup (SRV, or
A and AAAA of a host, with twisted.names: the reactor is never blocked) and turning
each good answer into the set of members the balancer should have, applied as a
difference through runtime.Runtime (source "dns"): a new address joins
(`discover_member`; with health checks on, it starts with C and takes traffic only
after its first passing check), a vanished one is drained (N: only its sticky
requests) and removed (`remove_member`) at a later lookup once it has no request in
flight in this process, and one that comes back before removal is undrained. A
failed lookup (timeout, NXDOMAIN, SERVFAIL, an answer without a usable record) keeps
the last good set and is logged once per outage. Runs only in the process that owns
admin state (the master, or the single process); workers get the changes through
the master's broadcast like any other runtime change.

The lookup interval is `resolve_every`, shortened by the records' smallest TTL, but
a TTL never brings it under one second.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns

from ..config import member_url
from ..runtime.state import Edit, Invalid

log = Logger(namespace="twistproxy.discovery")

MIN_TTL_INTERVAL = 1.0          # a record's TTL shortens resolve_every, to no less
QUERY_TIMEOUT = (1, 2)          # seconds per try (twisted.names retries with each)


@dataclass(frozen=True)
class Wanted:
    """One member DNS names: its URL and what its record says of it."""
    url: str
    lbset: int | None = None             # None: members_from.member's
    loadfactor: float | None = None


class _QuietResolver(client.Resolver):
    """Its per-query UDP protocols say nothing (twisted.names' are noisy)."""

    def _connectedProtocol(self, interface=""):
        proto = super()._connectedProtocol(interface)
        proto.noisy = False
        return proto


def make_resolver(servers: tuple[tuple[str, int], ...], reactor):
    """[server] resolver's servers, else the system's (/etc/resolv.conf, hosts)."""
    if servers:
        return _QuietResolver(servers=list(servers), reactor=reactor)
    return client.createResolver()


def address_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def srv_wanted(scheme: str, records: list[tuple[int, int, int, str]],
               addresses: dict[str, list[str]]) -> dict[str, Wanted]:
    """SRV records (priority, weight, port, target) and each target's addresses: the
    members. Lower priorities are lower lbsets (tried first), in order; a weight is
    a loadfactor (1-100; weight 0 is 1)."""
    ranks = {p: i for i, p in enumerate(sorted({r[0] for r in records}))}
    out: dict[str, Wanted] = {}
    for priority, weight, port, target in records:
        for address in addresses.get(target, ()):
            url = address_url(scheme, address, port)
            if url not in out:
                out[url] = Wanted(url, min(ranks[priority], 99),
                                  float(min(max(weight, 1), 100)))
    return out


def plan(balancer: str, members, wanted: dict[str, Wanted],
         drained: dict[str, tuple[float, bool]], now: float, grace: float,
         previous: dict[str, Wanted] | None = None) -> tuple[list[Edit], list[Edit]]:
    """The edits that bring the balancer's discovered members to `wanted`: (adds,
    then the rest, which may name the added members). `drained`: URL -> (since when
    it is gone from DNS, whether this module set its N), updated here. A member gone
    is drained, and removed once `grace` has passed and it has nothing in flight
    here; one wanted again before that is undrained (unless its N was an
    operator's). `previous`: the last answer applied; a record whose priority or
    weight changed since changes its member's lbset or loadfactor. An address that
    is also a configured member is left to that member."""
    adds, rest = [], []
    have = {m.config.url.raw: m for m in members if m.discovered}
    fixed = {m.name for m in members if not m.discovered}
    previous = previous or {}
    for url, w in wanted.items():
        if url not in have and member_url(url, "discover_member").origin in fixed:
            continue                  # also a configured member: that one it stays
        m = have.get(url)
        before = previous.get(url)
        if m is None:
            adds.append(Edit(balancer, "discover_member", url))
        if w.lbset is not None and (m is None or (before is not None
                                                  and before.lbset != w.lbset)):
            rest.append(Edit(balancer, "lbset", w.lbset, member=url))
        if w.loadfactor is not None and (m is None or (before is not None
                                                       and before.loadfactor != w.loadfactor)):
            rest.append(Edit(balancer, "loadfactor", w.loadfactor, member=url))
        if m is not None and url in drained:
            _, ours = drained.pop(url)
            if ours:
                rest.append(Edit(balancer, "status.N", False, member=url))
    for url, m in have.items():
        if url in wanted:
            continue
        if url not in drained:
            ours = "N" not in m.flags
            drained[url] = (now, ours)
            if ours:
                rest.append(Edit(balancer, "status.N", True, member=url))
        elif now - drained[url][0] >= grace and m.busy <= 0:
            del drained[url]
            rest.append(Edit(balancer, "remove_member", True, member=url))
    for url in list(drained):
        if url not in have:
            del drained[url]          # removed by someone else
    return adds, rest


class Discovery:
    """The lookups of one balancer's members_from, applied to `runtime`."""

    def __init__(self, reactor, runtime, balancer: str, config, resolver):
        self.reactor = reactor
        self.runtime = runtime
        self.balancer = balancer
        self.config = config                 # config.DiscoveryConfig
        self.resolver = resolver
        self.drained: dict[str, tuple[float, bool]] = {}
        self.failing = False                 # in an outage (logged once)
        self.lookups = 0
        self.failures = 0
        self.last_good: dict[str, Wanted] | None = None
        self._timer = None
        self._running = False
        self._in_flight = None

    def snapshot(self) -> dict:
        """For the manager's JSON."""
        c = self.config
        return {"kind": c.kind, "name": c.name, "scheme": c.scheme,
                "port": c.port or None, "resolve_every": c.resolve_every,
                "lookups": self.lookups, "failures": self.failures,
                "failing": self.failing,
                "last_good": sorted(self.last_good or ()), "draining": sorted(self.drained)}

    # -- schedule ------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._resolve()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight is not None:
            d, self._in_flight = self._in_flight, None
            d.addErrback(lambda f: None)

    def _next(self, ttl: float | None) -> None:
        if not self._running:
            return
        every = self.config.resolve_every
        if ttl is not None:
            every = min(every, max(float(ttl), MIN_TTL_INTERVAL))
        self._timer = self.reactor.callLater(every, self._resolve)

    def _resolve(self) -> None:
        self._timer = None
        if not self._running or self._in_flight is not None:
            return
        self.lookups += 1
        d = self.lookup()
        self._in_flight = d
        d.addCallbacks(self._answered, self._failed, errbackArgs=())
        d.addErrback(self._bug)

    # -- lookups -------------------------------------------------------------------

    @defer.inlineCallbacks
    def lookup(self):
        """(wanted members, smallest TTL) from DNS, or a failure."""
        c = self.config
        if c.srv:
            answers, _auth, additional = yield self.resolver.lookupService(
                c.srv, timeout=QUERY_TIMEOUT)
            records, ttls = [], []
            for rr in answers:
                if rr.type == dns.SRV:
                    p = rr.payload
                    target = p.target.name.decode("ascii").rstrip(".").lower()
                    if target:               # "." is "not offered here" (RFC 2782)
                        records.append((p.priority, p.weight, p.port, target))
                    ttls.append(rr.ttl)
            if not records:
                raise LookupError(f"no SRV record for {c.srv}")
            addresses: dict[str, list[str]] = {}
            for rr in additional:
                name = rr.name.name.decode("ascii").rstrip(".").lower()
                if rr.type in (dns.A, dns.AAAA):
                    addresses.setdefault(name, []).append(_address(rr))
                    ttls.append(rr.ttl)
            for target in {r[3] for r in records} - set(addresses):
                found, ttl = yield self._addresses(target)
                addresses[target] = found
                if ttl is not None:
                    ttls.append(ttl)
            wanted = srv_wanted(c.scheme, records, addresses)
        else:
            found, ttl = yield self._addresses(c.host, strict=True)
            wanted = {u: Wanted(u) for u in (address_url(c.scheme, a, c.port) for a in found)}
            ttls = [ttl] if ttl is not None else []
        if not wanted:
            raise LookupError(f"no address for {c.name}")
        return wanted, (min(ttls) if ttls else None)

    @defer.inlineCallbacks
    def _addresses(self, name: str, strict: bool = False):
        """A and AAAA addresses of a name, and their smallest TTL. Either lookup may
        fail alone. Both failing: with `strict` the lookup fails; else (an SRV
        target) a name that does not exist has no address, but a timeout or SERVFAIL
        fails the whole lookup (the last good set stays, no member is drained for a
        passing failure)."""
        results = yield defer.DeferredList(
            [self.resolver.lookupAddress(name, timeout=QUERY_TIMEOUT),
             self.resolver.lookupIPV6Address(name, timeout=QUERY_TIMEOUT)],
            consumeErrors=True)
        found, ttls, errors = [], [], []
        for ok, result in results:
            if not ok:
                errors.append(result)
                continue
            for rr in result[0]:
                if rr.type in (dns.A, dns.AAAA):
                    found.append(_address(rr))
                    ttls.append(rr.ttl)
        if not found and len(errors) == 2:
            from twisted.names.error import DNSNameError
            passing = [e for e in errors if not e.check(DNSNameError)]
            if strict or passing:
                (passing or errors)[0].raiseException()
        return found, (min(ttls) if ttls else None)

    # -- results -------------------------------------------------------------------

    def _answered(self, result) -> None:
        self._in_flight = None
        if not self._running:
            return
        wanted, ttl = result
        if self.failing:
            self.failing = False
            log.info("balancer://{b}: DNS answers again for {name} ({n} member(s))",
                     b=self.balancer, name=self.config.name, n=len(wanted))
        previous, self.last_good = self.last_good, wanted
        self.apply(wanted, previous)
        self._next(ttl)

    def _failed(self, failure) -> None:
        self._in_flight = None
        if not self._running:
            return
        self.failures += 1
        if not self.failing:
            self.failing = True
            log.warn("balancer://{b}: DNS lookup of {kind} {name} failed ({why}): keeping "
                     "the last good member set ({n} member(s)) until it answers",
                     b=self.balancer, kind=self.config.kind, name=self.config.name,
                     why=_why(failure), n=len(self.last_good or ()))
        self._next(None)

    def _bug(self, failure) -> None:
        log.failure("balancer://{b}: applying the DNS answer failed", failure,
                    b=self.balancer)
        self._in_flight = None
        self._next(None)

    def apply(self, wanted: dict[str, Wanted], previous=None) -> None:
        b = self.runtime.balancer(self.balancer)
        now = self.reactor.seconds()
        adds, rest = plan(self.balancer, b.members, wanted, self.drained, now,
                          self.config.resolve_every, previous)
        for batch in (adds, rest):
            if not batch:
                continue
            try:
                changes = self.runtime.apply(batch, source="dns", who=self.config.name,
                                             now=now)
            except Invalid as e:              # e.g. an address also configured
                log.warn("balancer://{b}: DNS change not applied: {e}", b=self.balancer,
                         e=e)
                continue
            for c in changes:
                if c.field == "discover_member":
                    log.info("balancer://{b}: member {m} found in DNS ({name}): joins{hc}",
                             b=self.balancer, m=c.member, name=self.config.name,
                             hc=" after a passing health check"
                             if self.config.member.hcmethod != "NONE" else "")
                elif c.field == "status.N" and c.new:
                    log.info("balancer://{b}: member {m} is gone from DNS: draining",
                             b=self.balancer, m=c.member)
                elif c.field == "status.N":
                    log.info("balancer://{b}: member {m} is back in DNS", b=self.balancer,
                             m=c.member)
                elif c.field == "remove_member":
                    log.info("balancer://{b}: member {m} removed (gone from DNS)",
                             b=self.balancer, m=c.member)


def _address(rr) -> str:
    if rr.type == dns.A:
        return rr.payload.dottedQuad()
    return socket.inet_ntop(socket.AF_INET6, rr.payload.address)


def _why(failure) -> str:
    from twisted.names import error
    e = failure.value
    if isinstance(e, error.DNSNameError):
        return "NXDOMAIN"
    if isinstance(e, error.DNSServerError):
        return "SERVFAIL"
    if isinstance(e, (error.DNSQueryTimeoutError, defer.TimeoutError)):
        return "timeout"
    return failure.getErrorMessage() or type(e).__name__

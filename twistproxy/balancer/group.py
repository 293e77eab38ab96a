"""A balancer group: its members, their status flags, and choosing one per request.

Pure and synchronous (time comes in as an argument): the request path calls
`Balancer.choose` once per attempt, which is O(members) with no I/O. Follows
mod_proxy_balancer's candidate rules (reference §3.2-3.5, §3.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import BalancerConfig, MemberConfig
from .sticky import route_from_cookie, route_from_url, split_route


_UNUSABLE = frozenset("DSEC")      # disabled, stopped, in error, hcheck failed


@dataclass(eq=False, slots=True)     # slots: read on every choice, and 30+ fields
class Member:
    """A member's live state: admin settings (copied from its config, then changed
    only through runtime.Runtime), health and error state, and counters kept with
    plain integer adds on the request path."""
    config: MemberConfig
    name: str                        # the member URL as Apache names a worker
    lbfactor: int                    # loadfactor x 100
    flags: set = field(default_factory=set)
    lbstatus: int = 0
    busy: int = 0
    transferred: int = 0             # request bytes sent to it ("To")
    read: int = 0                    # response bytes read from it ("From")
    elected: int = 0
    error_time: float = 0.0
    log_name: str = ""               # balancer://NAME|MEMBER|ROUTE, for the access log
    base: bytes = b""                # the member URL's path, before the request's
    route: str = ""
    redirect: str = ""
    lbset: int = 0
    balancer: str = ""               # its balancer's name
    owner: "Balancer | None" = None
    pool: object = None              # its worker's connection pool (pool.Pool)
    # counters
    responses: list = field(default_factory=lambda: [0] * 6)   # by status class
    errors: dict = field(default_factory=dict)                 # cause kind -> count
    retries: int = 0
    failovers: int = 0
    hc_passed: int = 0
    hc_failed: int = 0
    error_seconds: float = 0.0       # time spent in error state, ended periods
    discovered: bool = False         # found by DNS (members_from), not configured

    def __post_init__(self):
        if not self.route:
            self.route = self.config.route
        self.redirect = self.redirect or self.config.redirect
        self.lbset = self.lbset or self.config.lbset

    def count_error(self, kind: str) -> None:
        errors = self.errors
        errors[kind] = errors.get(kind, 0) + 1

    @property
    def standby(self) -> bool:
        return "H" in self.flags

    @property
    def spare(self) -> bool:
        return "R" in self.flags

    @property
    def draining(self) -> bool:
        return "N" in self.flags

    def usable(self) -> bool:
        return self.flags.isdisjoint(_UNUSABLE)

    def try_retry(self, now: float) -> None:
        """An errored member becomes a candidate again once `retry` has passed."""
        if "E" in self.flags and "S" not in self.flags \
                and now >= self.error_time + self.config.worker.retry:
            self.leave_error(now)
            if self.owner is not None and self.owner.on_retry is not None:
                self.owner.on_retry(self.owner, [self])

    def leave_error(self, now: float) -> None:
        self.flags.discard("E")
        if self.error_time:
            self.error_seconds += max(0.0, now - self.error_time)
        self.error_time = 0.0


def parse_status(status: str) -> set:
    flags, adding = set(), True
    for ch in status:
        if ch in "+-":
            adding = ch == "+"
        elif adding:
            flags.add(ch)
        else:
            flags.discard(ch)
    return flags


@dataclass
class Choice:
    member: Member | None
    route_changed: bool = False
    sticky_route: str | None = None     # the route the request asked for, if any


class Balancer:
    """Its settings start as configured and change only through runtime.Runtime
    (the manager, the state file): lbmethod, timeout, maxattempts, nofailover,
    stickysession; the rest of `config` (failonstatus, forcerecovery, ...) is fixed."""

    def __init__(self, config: BalancerConfig):
        self.config = config
        self.name = config.name
        self.members: list[Member] = []
        for m in config.members:
            self.add_member(m)
        self.lbsets_changed()          # none configured: members_from adds them later
        self.lbmethod = config.lbmethod
        self.timeout = config.timeout
        self.maxattempts = config.maxattempts
        self.nofailover = config.nofailover
        self.stickysession = config.stickysession
        self._settings_changed()
        self._total = 0
        self.outage = None      # outages.Outage, given by the proxy (it has the clock)
        self.on_retry = None    # runtime.Runtime's hook: members left error state

    def add_member(self, mc: MemberConfig) -> Member:
        m = Member(mc, mc.url.origin + mc.url.path.rstrip("/"),
                   int(round(mc.loadfactor * 100)), parse_status(mc.status))
        m.balancer = self.name
        m.owner = self
        m.log_name = f"balancer://{self.name}|{m.name}|{m.route or '-'}"
        m.base = mc.url.path.rstrip("/").encode("latin-1")
        self.members.append(m)
        self.lbsets_changed()
        return m

    def lbsets_changed(self) -> None:
        self.max_lbset = max((m.lbset for m in self.members), default=0)

    def remove_member(self, member: Member) -> None:
        """A member taken out at runtime (runtime.Runtime: a discovered member gone from
        DNS). Requests in flight keep their Member object and finish as usual."""
        self.members.remove(member)
        self.lbsets_changed()

    def set(self, field: str, value) -> None:
        """A setting changed by runtime.Runtime.apply (validated there)."""
        setattr(self, field, value)
        self._settings_changed()

    def _settings_changed(self) -> None:
        cookie, _, param = self.stickysession.partition("|")
        self.sticky_cookie = cookie
        self.sticky_param = param or cookie
        self._better = {"byrequests": self._by_requests, "bytraffic": self._by_traffic,
                        "bybusyness": self._by_busyness}[self.lbmethod]
        self._counts_lbstatus = self.lbmethod in ("byrequests", "bybusyness")

    # -- per request ----------------------------------------------------------------

    def choose(self, url: str, cookie_header: str | None, now: float,
               exclude: tuple = ()) -> Choice:
        if self.config.forcerecovery and self._all_in_error():
            for m in self.members:
                m.leave_error(now)
            if self.on_retry is not None:
                self.on_retry(self, list(self.members))
        route = None
        if self.sticky_cookie:
            route = split_route(route_from_url(url, self.sticky_param,
                                               self.config.scolonpathdelim)
                                or route_from_cookie(cookie_header, self.sticky_cookie),
                                self.config.stickysessionsep)
        if route is not None:
            member = self._by_route(route, now, exclude)
            if member is not None:
                self._sticky_bookkeeping(member)
                return self._elect(Choice(member, member.route != route, route))
            if self.nofailover and any(m.route == route for m in self.members):
                return Choice(None, False, route)
        member = self._best(now, exclude)
        return self._elect(Choice(member, bool(self.sticky_cookie), route))

    def _all_in_error(self) -> bool:
        for m in self.members:
            if "E" not in m.flags:
                return False
        return True

    def elect(self, member: Member) -> Choice:
        """This member, whatever the lbmethod says (a pinned connection)."""
        return self._elect(Choice(member))

    def done(self, member: Member, sent: int, received: int) -> None:
        member.busy -= 1
        member.transferred += sent
        member.read += received

    # -- selection -----------------------------------------------------------------

    def _elect(self, choice: Choice) -> Choice:
        if choice.member is not None:
            choice.member.elected += 1
            choice.member.busy += 1
        return choice

    def _by_route(self, route: str, now: float, exclude, depth: int = 0) -> Member | None:
        for standby in (False, True):
            for m in self.members:
                if m.route != route or m.standby != standby or m in exclude:
                    continue
                if not m.usable():
                    m.try_retry(now)
                if m.usable():
                    return m
                if m.redirect and depth < len(self.members):
                    target = self._by_route(m.redirect, now, exclude, depth + 1)
                    if target is not None:
                        return target
        return None

    def _sticky_bookkeeping(self, chosen: Member) -> None:
        total = 0
        for m in self.members:
            if m.usable():
                m.lbstatus += m.lbfactor
                total += m.lbfactor
        chosen.lbstatus -= total

    def _best(self, now: float, exclude) -> Member | None:
        self._total = 0
        better = self._better
        for lbset in range(self.max_lbset + 1):
            best, spares, standbys, unusable = None, [], [], 0
            for m in self.members:
                if m.lbset != lbset or m in exclude:
                    continue
                if m.draining:               # N: only its own sticky requests
                    if not (m.spare or m.standby):
                        unusable += 1
                    continue
                usable = m.usable()
                if not usable:
                    m.try_retry(now)
                    usable = m.usable()
                if m.spare:
                    if usable:
                        spares.append(m)
                elif m.standby:
                    if usable:
                        standbys.append(m)
                elif usable:
                    if better(m, best):
                        best = m
                else:
                    unusable += 1
            for m in spares[:unusable]:      # one spare per unusable regular member
                if better(m, best):
                    best = m
            if best is None:
                for m in standbys:
                    if better(m, best):
                        best = m
            if best is not None:
                if self._counts_lbstatus:
                    best.lbstatus -= self._total
                return best
        return None

    def _by_requests(self, m: Member, best: Member | None) -> bool:
        m.lbstatus += m.lbfactor
        self._total += m.lbfactor
        return best is None or m.lbstatus > best.lbstatus

    def _by_traffic(self, m: Member, best: Member | None) -> bool:
        if best is None:
            return True
        score = lambda x: x.transferred // x.lbfactor + x.read // x.lbfactor
        return score(m) < score(best)

    def _by_busyness(self, m: Member, best: Member | None) -> bool:
        m.lbstatus += m.lbfactor
        self._total += m.lbfactor
        if best is None or m.busy < best.busy:
            return True
        return m.busy == best.busy and m.lbstatus > best.lbstatus

"""One request's dealings with a balancer: first choice, failover, accounting.

Owns the per-request work the reverse and WebSocket handlers need from a balancer:
the first choice (a connection pinned by NTLM/Negotiate stays on its member; else
sticky route, else lbmethod), the balancer `timeout` polling for a usable member
(the timer comes in from the caller),
failing over to another member within `maxattempts`, and, when the request is done
with a member, its accounting (busy, bytes, responses, errors) and putting it in
error state through the runtime. The choice itself is group.Balancer's (pure).
"""

from __future__ import annotations

from twisted.logger import Logger

from .group import Balancer, Choice, Member

log = Logger(namespace="twistproxy.reverse")


class Attempt:
    """The members one request tried, and how to address the next one."""

    __slots__ = ("balancer", "runtime", "target", "url", "cookie", "tried",
                 "max_attempts", "member", "choice", "where")

    def __init__(self, runtime, balancer: Balancer, target: bytes, cookie: str | None,
                 where: str):
        self.runtime = runtime
        self.balancer = balancer
        self.target = target                 # relative to the balancer URL
        self.url = target.decode("latin-1")   # where a sticky URL parameter is looked for
        self.cookie = cookie
        self.where = where
        self.tried: list[Member] = []
        configured = balancer.maxattempts
        n = len(balancer.members)
        self.max_attempts = configured if configured is not None else \
            (n - 1 if n >= 2 else 0)
        self.member: Member | None = None
        self.choice: Choice | None = None

    def first(self, pinned: dict | None, now: float) -> Choice:
        """The member for the first try: the one a pinned connection belongs to,
        else the balancer's choice (which may be no member)."""
        bal = self.balancer
        choice = None
        if pinned:
            for m in bal.members:
                if m.pool in pinned:
                    choice = bal.elect(m)
                    break
        if choice is None:
            choice = bal.choose(self.url, self.cookie, now)
        self._took(choice)
        return choice

    def poll(self, choice: Choice, now: float, until: float | None, call_later,
             again) -> bool:
        """No usable member: with a balancer `timeout`, look again every timeout/100
        until it has passed (`again(until)` runs the dispatch anew). True when a poll
        was scheduled; never for a sticky request with nofailover."""
        wait = self.balancer.timeout
        if not wait or self.refused_sticky(choice):
            return False
        until = until if until is not None else now + wait
        if now >= until:
            return False
        call_later(max(wait / 100, 0.01), again, until)
        return True

    def refused_sticky(self, choice: Choice) -> bool:
        """No member because the request's sticky route is down and nofailover is on
        (not merely a request that carried a route)."""
        route = choice.sticky_route
        bal = self.balancer
        return bool(route) and bal.nofailover and any(m.route == route for m in bal.members)

    def next(self, now: float, why: str) -> Member | None:
        """Another member after a failure, while maxattempts allows."""
        failed = self.tried[-1] if self.tried else None
        if len(self.tried) > self.max_attempts:
            return None
        choice = self.balancer.choose(self.url, self.cookie, now, exclude=tuple(self.tried))
        if choice.member is None:
            return None
        if failed is not None:
            failed.failovers += 1
            log.warn("{where}: balancer://{name}: member {failed}: {why}: failing over to "
                     "{nxt}", where=self.where, name=self.balancer.name, failed=failed.name,
                     why=why, nxt=choice.member.name)
        self._took(choice)
        return choice.member

    def _took(self, choice: Choice) -> None:
        self.choice = choice
        self.member = choice.member
        if choice.member is not None:
            self.tried.append(choice.member)

    def member_target(self, member: Member) -> bytes:
        return member.base + self.target if member.base else self.target

    # -- accounting --------------------------------------------------------------------

    def done(self, member: Member, sent: int, received: int, ok: bool, now: float,
             why: str = "", status: int = 0) -> None:
        """The request is done with this member (answered, failed or moved on)."""
        self.balancer.done(member, sent, received)
        if status:
            member.responses[status // 100] += 1
        if not ok and self.runtime.mark_error(member, now, why or "failed"):
            log.warn("{where}: balancer://{name}: member {m} in error state for {r:g}s: "
                     "{why}", where=self.where, name=self.balancer.name, m=member.name,
                     r=member.config.worker.retry, why=why or "failed")


def cause_kind(why: str) -> str:
    """A failure's cause as a metrics label: refused, timeout, reset, bad_response."""
    if "refused" in why:
        return "refused"
    if "timed out" in why or "no answer within" in why or "ping" in why:
        return "timeout"
    if "closed" in why or "reset" in why:
        return "reset"
    return "bad_response"

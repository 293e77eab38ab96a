"""Live admin and health state of balancers and members, and the one way to change it.

Owns what is true now about each balancer (lbmethod, timeout, failover attempts,
sticky session, nofailover) and member (status flags, loadfactor, lbset, route,
redirect), reached by name: a balancer by its name, a member by its URL as written
(Apache's worker name) or its route. Every change, whoever makes it (the manager,
a health check, a failover, the state file), goes through `Runtime.apply`: the
whole batch is validated first, then applied whole, recorded with its source and
who asked, and published to the subscribers (the log, the state file, metrics,
later other processes and hosts). Pure: no reactor, no I/O; time comes in as `now`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol

from ..balancer.group import Balancer, Member
from ..config import MemberConfig, member_url

LBMETHODS = ("byrequests", "bytraffic", "bybusyness")
# flags an operator may set or clear, as Apache's manager offers them (w_status_X)
ADMIN_FLAGS = "IDHRSN"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{0,63}$")


@dataclass(frozen=True)
class Edit:
    """One field to set: on a member when `member` is given, else on the balancer.
    Member fields: loadfactor, lbset, route, redirect, status.X (X in IDHRSN, and
    E and C for health and failover). Balancer fields: lbmethod, timeout,
    maxattempts, nofailover, stickysession, and add_member (value: the new member's
    URL; it starts disabled, within the balancer's `growth` slots), and for members
    found by DNS (balancer/discovery.py) discover_member (value: scheme://ADDR:PORT;
    it gets the balancer's members_from.member parameters, and C until its first
    passing health check when checks are on) and, on the member, remove_member."""
    balancer: str
    field: str
    value: Any
    member: str | None = None


@dataclass(frozen=True)
class Change:
    """An edit as applied: what it was before, who made it and how."""
    balancer: str
    member: str | None
    field: str
    old: Any
    new: Any
    source: str          # "manager", "health", "failover", "retry", "state-file", "api",
                         # "dns"
    who: str = ""        # client address and user, for the manager and the API


class Invalid(ValueError):
    """An edit that cannot be applied; nothing of its batch was."""

    def __init__(self, field: str, value: Any, why: str):
        super().__init__(f"{field}: {value!r} {why}")
        self.field = field
        self.value = value
        self.why = why


class Subscriber(Protocol):
    def __call__(self, changes: list[Change]) -> None: ...


class Runtime:
    """The balancers and their members as they are now."""

    def __init__(self, balancers: Iterable[Balancer]):
        self.balancers: dict[str, Balancer] = {b.name: b for b in balancers}
        self._subscribers: list[Subscriber] = []
        for b in self.balancers.values():
            b.on_retry = self._retried

    # -- finding ---------------------------------------------------------------------

    def balancer(self, name: str) -> Balancer:
        try:
            return self.balancers[name]
        except KeyError:
            raise Invalid("balancer", name, "is not a balancer here") from None

    def member(self, balancer: str, key: str) -> Member:
        """A member by its URL as written (trailing slash optional) or its route."""
        b = self.balancer(balancer)
        found = find_member(b, key)
        if found is None:
            raise Invalid("member", key, f"is not a member of balancer://{balancer}")
        return found

    # -- changing --------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def apply(self, edits: Iterable[Edit], source: str, who: str = "",
              now: float = 0.0) -> list[Change]:
        """Validate every edit, then apply them all (or raise Invalid, changing
        nothing). Edits that set what is already there are not changes."""
        plan = []
        adding: dict[str, list[str]] = {}       # balancer -> members added by this batch
        for e in edits:
            target = self.member(e.balancer, e.member) if e.member is not None \
                else self.balancer(e.balancer)
            if e.field == "add_member" and e.member is None:
                value = _check_add(target, e.value, adding.setdefault(target.name, []))
                plan.append((e, target, None, value))
                continue
            if e.field == "discover_member" and e.member is None:
                value = _check_discover(target, e.value, adding.setdefault(target.name, []))
                if value is not None:        # None: found already (not a change)
                    plan.append((e, target, None, value))
                continue
            if e.field == "remove_member" and e.member is not None:
                if not target.discovered:
                    raise Invalid(e.field, e.member, "was configured: only members found "
                                  "by DNS (members_from) are removed at runtime")
                plan.append((e, target, False, True))
                continue
            value = _check(target, e.field, e.value)
            old = _get(target, e.field)
            if old != value:
                plan.append((e, target, old, value))
        changes = []
        for e, target, old, value in plan:
            if e.field == "add_member" and e.member is None:
                member = target.add_member(value)
                changes.append(Change(e.balancer, member.name, "add_member", None,
                                      value.url.raw, source, who))
                continue
            if e.field == "discover_member" and e.member is None:
                member = target.add_member(value)
                member.discovered = True
                changes.append(Change(e.balancer, member.name, "discover_member", None,
                                      value.url.raw, source, who))
                continue
            if e.field == "remove_member" and e.member is not None:
                target.owner.remove_member(target)
                changes.append(Change(e.balancer, target.name, "remove_member", False, True,
                                      source, who))
                continue
            _set(target, e.field, value, now)
            changes.append(Change(e.balancer, target.name if e.member is not None else None,
                                  e.field, old, value, source, who))
        self._publish(changes)
        return changes

    def mark_error(self, member: Member, now: float, why: str) -> bool:
        """A failed connect, ping or failonstatus: E for `retry` seconds (not with I).
        True when the member went into error state now."""
        if "I" in member.flags or "E" in member.flags:
            return False
        member.flags.add("E")
        member.error_time = now
        self._publish([Change(member.balancer, member.name, "status.E", False, True,
                              "failover", why)])
        return True

    def _retried(self, balancer: Balancer, members: list[Member]) -> None:
        """The balancer's choice took members out of error state (retry passed, or
        forcerecovery): recorded like any other change."""
        self._publish([Change(balancer.name, m.name, "status.E", True, False, "retry")
                       for m in members])

    def _publish(self, changes: list[Change]) -> None:
        if changes:
            for s in list(self._subscribers):
                s(changes)


def find_member(b: Balancer, key: str) -> Member | None:
    bare = key.rstrip("/")
    for m in b.members:
        if m.name == bare or m.config.url.raw == key:
            return m
    for m in b.members:
        if m.route and m.route == key:
            return m
    return None


# -- fields ----------------------------------------------------------------------------

def _check(target, field: str, value: Any) -> Any:
    """The value to store, or Invalid. Ranges are Apache's manager's."""
    if isinstance(target, Member):
        if field == "loadfactor":
            return _number(field, value, 1, 100)
        if field == "lbset":
            return int(_number(field, value, 0, 99, integer=True))
        if field in ("route", "redirect"):
            value = _text(field, value)
            if not _TOKEN.match(value):
                raise Invalid(field, value, "must be a token of at most 63 characters")
            return value
        if field.startswith("status.") and len(field) == 8 and field[7] in ADMIN_FLAGS + "EC":
            return _flag(field, value)
        raise Invalid(field, value, "is not a member field")
    if field == "lbmethod":
        value = _text(field, value)
        if value not in LBMETHODS:
            raise Invalid(field, value, f"must be one of {', '.join(LBMETHODS)}")
        return value
    if field == "timeout":
        return _number(field, value, 0, 7200)
    if field == "maxattempts":
        return int(_number(field, value, 0, 1000, integer=True))
    if field == "nofailover":
        return _flag(field, value)
    if field == "stickysession":
        value = _text(field, value)
        if value and not re.fullmatch(r"[!#$%&'*+\-.^_`~0-9A-Za-z]+(\|[!#$%&'*+\-.^_`~0-9A-Za-z]+)?", value):
            raise Invalid(field, value, "must be NAME or COOKIE|PARAM")
        return value
    raise Invalid(field, value, "is not a balancer field")


def _check_add(b: Balancer, value: Any, batch: list[str]) -> MemberConfig:
    """A member to add: a new http(s)/ws(s) URL, within the balancer's growth slots
    (those this batch takes included). It starts disabled, as in Apache."""
    field = "add_member"
    try:
        url = member_url(_text(field, value), field)
    except ValueError as e:
        raise Invalid(field, value, str(e)) from None
    name = url.origin + url.path.rstrip("/")
    if find_member(b, url.raw) is not None or name in batch:
        raise Invalid(field, value, f"is already a member of balancer://{b.name}")
    added = sum(1 for m in b.members if not m.discovered) - len(b.config.members) \
        + len(batch)
    if added >= b.config.growth:
        raise Invalid(field, value, f"needs a free slot: balancer://{b.name} has growth "
                      f"{b.config.growth} and {added} member(s) added already")
    batch.append(name)
    return MemberConfig(url, status="D")


def _check_discover(b: Balancer, value: Any, batch: list[str]) -> MemberConfig | None:
    """A member found by DNS: scheme://ADDRESS:PORT, not a member yet, made from the
    balancer's members_from.member parameters (no growth slot: DNS decides)."""
    field = "discover_member"
    found = b.config.members_from
    if found is None:
        raise Invalid(field, value, f"balancer://{b.name} has no members_from")
    try:
        url = member_url(_text(field, value), field)
    except ValueError as e:
        raise Invalid(field, value, str(e)) from None
    name = url.origin + url.path.rstrip("/")
    there = find_member(b, url.raw)
    if there is not None and there.discovered and there.config.url.raw == url.raw:
        return None
    if there is not None or name in batch:
        raise Invalid(field, value, f"is already a member of balancer://{b.name}")
    batch.append(name)
    template = found.member
    status = template.status + ("+C" if template.hcmethod != "NONE" else "")
    return replace(template, url=url, status=status)


def _number(field: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    try:
        n = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n != n or (integer and n != int(n)):
        raise Invalid(field, value, "is not a " + ("whole " if integer else "") + "number")
    if not low <= n <= high:
        raise Invalid(field, value, f"must be from {low:g} to {high:g}")
    return n


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(field, value, "is not text")
    return value.strip()


def _flag(field: str, value: Any) -> bool:
    if value in (True, 1, "1", "on", "true"):
        return True
    if value in (False, 0, "0", "off", "false"):
        return False
    raise Invalid(field, value, "must be 0 or 1")


def _get(target, field: str) -> Any:
    if isinstance(target, Member):
        if field == "loadfactor":
            return target.lbfactor / 100
        if field.startswith("status."):
            return field[7] in target.flags
        return getattr(target, field)
    return getattr(target, field)


def _set(target, field: str, value: Any, now: float) -> None:
    if isinstance(target, Member):
        if field == "loadfactor":
            target.lbfactor = int(round(value * 100))
        elif field.startswith("status."):
            flag = field[7]
            if value:
                target.flags.add(flag)
                if flag == "E":
                    target.error_time = now
            elif flag == "E":
                target.leave_error(now)
            else:
                target.flags.discard(flag)
        else:
            setattr(target, field, value)
        if field == "lbset":
            target.owner.lbsets_changed()
        return
    target.set(field, value)


def changes_text(changes: list[Change]) -> Callable[[], str]:
    """One line's worth for the log: `member URL field old -> new, ...`."""
    def text() -> str:
        return ", ".join(f"{'member ' + c.member + ' ' if c.member else ''}{c.field} "
                         f"{c.old!r} -> {c.new!r}" for c in changes)
    return text

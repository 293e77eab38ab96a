"""The state file: manager changes kept across restarts (Apache's BalancerPersist).

Owns what is written (per balancer, the settings and members the manager changed or
added, as differences from the configuration), writing it atomically (a temporary
file in the same folder, then rename), and applying it again at start-up as one
runtime batch (source "state-file") when the configuration still names every
balancer and member in it; a file that no longer matches is reported and ignored.
"""

from __future__ import annotations

import json
import os
import tempfile

from ..balancer.group import Balancer, parse_status
from ..runtime.state import ADMIN_FLAGS, Edit, Invalid, Runtime

VERSION = 1
_MEMBER = ("loadfactor", "lbset", "route", "redirect")
_BALANCER = ("lbmethod", "timeout", "maxattempts", "nofailover", "stickysession")


def state_of(runtime) -> dict:
    """What the manager changed: every balancer and member field that differs from
    the configuration, and the members added at runtime (with their fields)."""
    balancers = {}
    for name, b in runtime.balancers.items():
        settings = {k: getattr(b, k) for k in _BALANCER if getattr(b, k) != getattr(b.config, k)}
        configured = {m.url.raw for m in b.config.members}
        members, added = {}, []
        for m in b.members:
            if m.discovered:
                continue             # DNS names them again at the next start
            if m.config.url.raw not in configured:
                added.append(m.config.url.raw)
            fields = {"loadfactor": m.lbfactor / 100, "lbset": m.lbset, "route": m.route,
                      "redirect": m.redirect}
            initial = {"loadfactor": m.config.loadfactor, "lbset": m.config.lbset,
                       "route": m.config.route, "redirect": m.config.redirect}
            changed = {k: v for k, v in fields.items()
                       if v != initial[k] or m.config.url.raw not in configured}
            flags = "".join(f for f in ADMIN_FLAGS if f in m.flags)
            if flags != "".join(f for f in ADMIN_FLAGS if f in parse_status(m.config.status)) \
                    or m.config.url.raw not in configured:
                changed["flags"] = flags
            if changed:
                members[m.config.url.raw] = changed
        if settings or members or added:
            balancers[name] = {"settings": settings, "added": added, "members": members}
    return {"version": VERSION, "balancers": balancers}


def save(path: str, runtime) -> None:
    """Write the state atomically: readers see the old file or the new one."""
    text = json.dumps(state_of(runtime), indent=1, sort_keys=True) + "\n"
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".twistproxy-state-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def edits_from(state: dict, runtime) -> list[Edit]:
    """The state as one batch of edits; ValueError saying why it no longer matches."""
    if not isinstance(state, dict) or state.get("version") != VERSION or \
            not isinstance(state.get("balancers"), dict):
        raise ValueError(f"is not a version {VERSION} state file")
    edits: list[Edit] = []
    for name, entry in state["balancers"].items():
        b = runtime.balancers.get(name)
        if b is None:
            raise ValueError(f"names balancer://{name}, which the configuration no longer has")
        if not isinstance(entry, dict):
            raise ValueError(f"balancer://{name}: not a table")
        for key, value in (entry.get("settings") or {}).items():
            if key not in _BALANCER:
                raise ValueError(f"balancer://{name}: unknown setting {key!r}")
            edits.append(Edit(name, key, value))
        added = entry.get("added") or []
        for url in added:
            edits.append(Edit(name, "add_member", url))
        for url, fields in (entry.get("members") or {}).items():
            if url not in added and not any(m.url.raw == url for m in b.config.members):
                raise ValueError(f"balancer://{name}: member {url} is no longer in the "
                                 "configuration")
            for key, value in fields.items():
                if key == "flags":
                    for f in ADMIN_FLAGS:
                        edits.append(Edit(name, f"status.{f}", f in value, member=url))
                elif key in _MEMBER:
                    edits.append(Edit(name, key, value, member=url))
                else:
                    raise ValueError(f"balancer://{name}: member {url}: unknown field {key!r}")
    return edits


def still_existing(state: dict, runtime) -> dict:
    """The state without what `runtime`'s configuration no longer has (a reload):
    balancers gone, and configured members gone (added ones are added again)."""
    out = {}
    for name, entry in state["balancers"].items():
        b = runtime.balancers.get(name)
        if b is None:
            continue
        added = list(entry.get("added") or [])
        urls = {m.url.raw for m in b.config.members}
        added = [u for u in added if u not in urls]
        members = {u: f for u, f in (entry.get("members") or {}).items()
                   if u in urls or u in added}
        settings = entry.get("settings") or {}
        out[name] = {"settings": settings, "added": added, "members": members}
    return {"version": VERSION, "balancers": out}


def restore(path: str, runtime) -> tuple[int, str | None]:
    """Apply the state file at start-up: (changes applied, None), or (0, why it was
    ignored). A missing file is no state yet."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return 0, None
    except (OSError, ValueError) as e:
        return 0, f"cannot be read ({getattr(e, 'strerror', None) or e})"
    try:
        edits = edits_from(state, runtime)
        return len(_apply(runtime, edits)), None
    except (ValueError, Invalid) as e:
        return 0, str(e)


def _apply(runtime, edits: list[Edit]) -> list:
    """Added members first, then the edits (some name the added members), so two
    batches; both are tried first on a scratch runtime built from the same
    configuration (start-up state), so a bad file changes nothing here."""
    adds = [e for e in edits if e.field == "add_member"]
    rest = [e for e in edits if e.field != "add_member"]
    scratch = Runtime(Balancer(b.config) for b in runtime.balancers.values())
    scratch.apply(adds, source="state-file")
    scratch.apply(rest, source="state-file")
    return runtime.apply(adds, source="state-file") + runtime.apply(rest, source="state-file")

"""Counters across worker processes: what a worker reports, and how the master sums it.

A worker's counters stay where the request path adds to them (members, routes,
listeners, pools, its connections); `snapshot` reads them into JSON when the master
asks (a page is being read). The master proxies nothing, so its own objects of the
same names hold no traffic: `merge` writes the sums over every worker into them (and
a summed connection census and pool figures), and the pages then read the master's
context exactly as they read a single process's. Health-check counters and error
times are the master's own (its health checks, its runtime) and are left alone.
"""

from __future__ import annotations

from ..runtime.counters import Census

_MEMBER = ("busy", "transferred", "read", "elected", "retries", "failovers")
_ROUTE = ("requests", "bytes_in", "bytes_out", "retries", "failovers")
_LISTENER = ("accepted", "open", "requests", "tls_handshakes", "tls_failures", "bytes_out")
_CENSUS = ("reading", "answering", "closing", "waiting", "writing")


def _route_runtimes(ctx):
    """(name, RouteRuntime): the routes, and each listener's forward proxy gate."""
    for where, rt in ctx.routes.items():
        yield where, rt
    for key, gate in ctx.forward_gates.items():
        yield f"forward:{key}", gate.runtime


def snapshot(ctx) -> dict:
    members = {}
    for b in ctx.runtime.balancers.values():
        for m in b.members:
            row = {k: getattr(m, k) for k in _MEMBER}
            row["responses"] = list(m.responses)
            row["errors"] = dict(m.errors)
            members[f"{b.name} {m.name}"] = row
    routes = {}
    for where, rt in _route_runtimes(ctx):
        c = rt.counters
        row = {k: getattr(c, k) for k in _ROUTE}
        row["responses"] = list(c.responses)
        row["errors"] = dict(c.errors)
        routes[where] = row
    listeners = {}
    for key, lc in ctx.listeners.items():
        row = {k: getattr(lc, k) for k in _LISTENER}
        row["responses"] = list(lc.responses)
        listeners[key] = row
    census = Census(ctx.connections)
    names = {rt: where for where, rt in _route_runtimes(ctx)}
    return {
        "members": members, "routes": routes, "listeners": listeners,
        "census": {**{k: getattr(census, k) for k in _CENSUS},
                   "scoreboard": census.scoreboard,
                   "by_route": {names[rt]: n for rt, n in census.by_route.items()
                                if rt in names}},
        "connections": len(ctx.connections),
        "pools": {pool.name: pool.stats() for pool in ctx.workers.pools()},
    }


def _add_list(into: list, values: list) -> None:
    for i, n in enumerate(values[:len(into)]):
        into[i] += n


def _add_dict(into: dict, values: dict) -> None:
    for k, n in values.items():
        into[k] = into.get(k, 0) + n


class Totals:
    """The sums over every worker, last read; what a master's context shows."""

    def __init__(self, workers: int = 0):
        self.workers = workers
        self.census = Census(())
        self.connections = 0
        self.pools: dict[str, dict] = {}

    def pool_stats(self, pool) -> dict:
        return self.pools.get(pool.name) or {k: 0 for k in pool.stats()}


def merge(ctx, snapshots: list[dict]) -> Totals:
    """Write the sums of the workers' snapshots into the master's context `ctx`."""
    totals = Totals(len(snapshots))
    for b in ctx.runtime.balancers.values():
        for m in b.members:
            for k in _MEMBER:
                setattr(m, k, 0)
            m.responses = [0] * 6
            m.errors = {}
    runtimes = dict(_route_runtimes(ctx))
    for rt in runtimes.values():
        c = rt.counters
        for k in _ROUTE:
            setattr(c, k, 0)
        c.responses = [0] * 6
        c.errors = {}
    for lc in ctx.listeners.values():
        for k in _LISTENER:
            setattr(lc, k, 0)
        lc.responses = [0] * 6
    census = totals.census
    board = []
    for snap in snapshots:
        for key, row in snap["members"].items():
            name, _, member = key.partition(" ")
            b = ctx.runtime.balancers.get(name)
            m = next((m for m in b.members if m.name == member), None) if b else None
            if m is None:
                continue            # added in that worker only: not ours (yet)
            for k in _MEMBER:
                setattr(m, k, getattr(m, k) + row[k])
            _add_list(m.responses, row["responses"])
            _add_dict(m.errors, row["errors"])
        for where, row in snap["routes"].items():
            rt = runtimes.get(where)
            if rt is None:
                continue
            c = rt.counters
            for k in _ROUTE:
                setattr(c, k, getattr(c, k) + row[k])
            _add_list(c.responses, row["responses"])
            _add_dict(c.errors, row["errors"])
        for key, row in snap["listeners"].items():
            lc = ctx.listeners.get(key)
            if lc is None:
                continue
            for k in _LISTENER:
                setattr(lc, k, getattr(lc, k) + row[k])
            _add_list(lc.responses, row["responses"])
        s = snap["census"]
        for k in _CENSUS:
            setattr(census, k, getattr(census, k) + s[k])
        board.append(s["scoreboard"])
        for where, n in s["by_route"].items():
            rt = runtimes.get(where)
            if rt is not None:
                census.by_route[rt] = census.by_route.get(rt, 0) + n
        totals.connections += snap["connections"]
        for name, stats in snap["pools"].items():
            _add_dict(totals.pools.setdefault(name, {}), stats)
    census.scoreboard = "".join(board)
    return totals

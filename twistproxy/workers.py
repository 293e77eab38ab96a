"""Workers: backend URLs with their parameters, each with one connection pool.

Owns mod_proxy's worker sharing (reference §1.5): a URL whose name starts with an
already defined worker's name shares that worker, and its own parameters are ignored
(with a warning, as Apache warns); at request time the worker is the longest one
whose name prefixes the target URL. Members of balancers are defined first, then
routes in file order.
"""

from __future__ import annotations

from twisted.logger import Logger

from .config import BackendURL, ServerConfig, WorkerParams
from .balancer.group import parse_status
from .pool import Pool

log = Logger(namespace="twistproxy")

# Workers a forward proxy makes for the origins its clients ask for: their idle
# connections are closed after this many seconds (Apache's ttl), and a worker with no
# connection left is forgotten, so a forward proxy does not grow with every origin.
FORWARD_TTL = 60.0


def worker_name(url: BackendURL) -> str:
    """scheme://host[:port]/path (default port dropped; a regex template up to its
    first substitution; no query)."""
    path = url.path.split("$", 1)[0].split("?", 1)[0]
    return url.origin + path


class Workers:
    def __init__(self, reactor, server: ServerConfig, tls_options_for=None,
                 config_path: str = ""):
        self.config_path = config_path
        self.reactor = reactor
        self.server = server
        self.tls_options_for = tls_options_for
        self.by_origin: dict[str, list[tuple[str, Pool]]] = {}
        self.forward: dict[str, Pool] = {}      # origin -> a forward proxy's own worker

    def define(self, url: BackendURL, params: WorkerParams, where: str,
               member: bool = False) -> Pool:
        """`member`: a balancer member's worker, whose error state is its member's."""
        name = worker_name(url)
        same_origin = self.by_origin.setdefault(url.origin, [])
        for wname, pool in same_origin:
            if name.startswith(wname):
                if params != pool.params:
                    log.warn("{where}: {name} shares worker {wname}: its parameters are "
                             "ignored (define longer URLs first)", where=where, name=name,
                             wname=wname)
                return pool
        timeout = params.timeout or self.server.timeout
        pool = Pool(self.reactor, url.host, url.port, tls=url.tls,
                    connect_timeout=params.connectiontimeout or timeout,
                    reuse=not params.disablereuse,
                    tls_options=self.tls_options_for(params, self.config_path, where)
                    if url.tls else None,
                    max=params.max, smax=params.smax, ttl=params.ttl,
                    acquire=params.acquire, keepalive=params.keepalive, name=name,
                    timeout=timeout, ping=params.ping, params=params,
                    upgrades=upgrades_for(url.scheme, params.upgrade),
                    retry=params.retry,
                    ignore_errors=member or ignores_errors(params.status))
        same_origin.append((name, pool))
        # longest names first, so the request-time search stops at the first prefix
        same_origin.sort(key=lambda item: len(item[0]), reverse=True)
        return pool

    def forward_pool(self, url: BackendURL, full_url: str, where: str) -> Pool:
        """The worker for a forward-proxy request: one already defined for its origin
        (the longest prefixing `full_url`, §1.5), else one made now, which
        sweep_forward() forgets once it is idle."""
        known = self.by_origin.get(url.origin)
        if known:
            return longest(known, full_url)
        pool = self.define(url, WorkerParams(ttl=FORWARD_TTL), where)
        self.forward[url.origin] = pool
        return pool

    def sweep_forward(self) -> None:
        """Forget forward-proxy workers left without connections, waiters or connects."""
        for origin, pool in list(self.forward.items()):
            if pool.open == 0 and pool.opening == 0 and not pool.waiters:
                del self.forward[origin]
                entries = [e for e in self.by_origin.get(origin, ()) if e[1] is not pool]
                if entries:
                    self.by_origin[origin] = entries
                else:
                    self.by_origin.pop(origin, None)

    def candidates(self, url: BackendURL) -> list[tuple[str, Pool]]:
        return self.by_origin[url.origin]

    def pools(self):
        for entries in self.by_origin.values():
            for _, pool in entries:
                yield pool


def upgrades_for(scheme: str, upgrade: str) -> frozenset:
    """Protocols a client may Upgrade to on this worker (lower-case; "*" for any):
    WebSocket on ws:// and wss:// URLs, plus what `upgrade` lists (Apache's upgrade=)."""
    tokens = {t.lower() for t in upgrade.replace(",", " ").split()}
    if tokens & {"any", "*"}:
        return frozenset({"*"})
    if scheme in ("ws", "wss"):
        tokens.add("websocket")
    tokens.discard("none")
    return frozenset(tokens)


def ignores_errors(status: str) -> bool:
    """A standalone worker has Apache's implicit status I unless "-I" takes it away."""
    return "I" in parse_status("I" + status)


def longest(candidates: list[tuple[str, Pool]], full_url: str) -> Pool:
    """The worker whose name is the longest prefix of the target URL."""
    for name, pool in candidates:
        if full_url.startswith(name):
            return pool
    return candidates[-1][1]

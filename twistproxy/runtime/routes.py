"""A route with everything the request path needs, resolved at start-up.

Owns, per ProxyPass, what does not change per request (header actions, rewrite
maps, its worker or balancer, the sticky cookie it sets) and its counters. Reached
by name: the route's key path in the configuration (`vhost[0].route[2]`).
"""

from __future__ import annotations

from .. import headers as H
from ..balancer import Balancer
from ..config import RouteConfig, VhostConfig
from ..pool import Pool
from ..workers import longest
from .counters import RouteCounters


class RouteRuntime:
    """A route with everything the request path needs, resolved at start-up."""

    def __init__(self, ctx, vhost: VhostConfig, route: RouteConfig,
                 reverse_entries: list):
        self.vhost = vhost
        self.route = route
        self.where = route.where           # its name: the key path in the config
        self.counters = RouteCounters()
        w = route.worker
        self.disablereuse = w.disablereuse
        self.server_name = vhost.server_name.encode("idna")
        self.via_name = self.server_name
        self.request_actions = vhost.request_headers + route.request_headers
        self.response_actions = vhost.response_headers + route.response_headers
        self.error_actions = tuple(a for a in self.response_actions if a.always)
        rmap = H.ReverseMap(reverse_entries, route.cookie_domain, route.cookie_path)
        self.reverse_map = rmap if rmap else None
        url = route.url
        self.balancer: Balancer | None = None
        self.pool: Pool | None = None
        self.candidates = None            # same-origin workers, when more than one
        self.origin = ""
        self.backend_name = ""
        if url is not None and url.is_balancer:
            self.balancer = ctx.runtime.balancer(url.host)
            cookie = dict(ctx.config.balancers[url.host].sticky_cookie)
            self._sticky_cookie = cookie or None
        elif url is not None:
            self.pool = ctx.workers.define(url, w, route.where)
            self.candidates = ctx.workers.candidates(url)
            self.origin = url.origin
            self.backend_name = url.origin

    def pool_for(self, target: bytes) -> Pool:
        """Request time: the longest worker prefixing the target URL (§1.5)."""
        candidates = self.candidates
        if len(candidates) == 1:
            return self.pool
        return longest(candidates, self.origin + target.decode("latin-1"))

    def sticky_cookie_header(self, member) -> tuple[bytes, bytes] | None:
        c = self._sticky_cookie if self.balancer is not None else None
        if c is None or member is None or not member.route:
            return None
        return (b"Set-Cookie", f"{c['name']}=.{member.route}; Path={c['path']}".encode())

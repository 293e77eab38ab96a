"""Request routing: path normalisation, name-based vhost choice, ProxyPass matching.

Pure logic on the hot path (imports nothing from twisted); everything that depends only
on the config is compiled once in Router.__init__.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

from .config import Config, RouteConfig, VhostConfig

__all__ = ["normalize_path", "has_encoded_slash", "RouteMatch", "Router"]

# ---------------------------------------------------------------------------
# path normalisation

_BAD_CHAR = re.compile(r"[\x00-\x20\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"//+")
_ENCODED_SLASH = re.compile(r"%2[Ff]")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _escape_table() -> dict[str, str]:
    table = {}
    for n in range(256):
        hi, lo = f"{n:02X}"
        canon = chr(n) if chr(n) in _UNRESERVED else f"%{hi}{lo}"
        for a in {hi, hi.lower()}:
            for b in {lo, lo.lower()}:
                table[f"%{a}{b}"] = canon
    return table


_ESCAPES = _escape_table()   # every "%xx" spelling -> its canonical form


def has_encoded_slash(path: str) -> bool:
    """Whether a raw path has a %2F (what allow_encoded_slashes decides about)."""
    return "%" in path and _ENCODED_SLASH.search(path) is not None


def normalize_path(raw: str, decode_slashes: bool = False) -> str | None:
    """The normalised, still percent-encoded path, or None if `raw` is not a valid one.
    With `decode_slashes` (allow_encoded_slashes = "on") %2F is "/" before the rest."""
    if not raw.startswith("/") or _BAD_CHAR.search(raw):
        return None
    if "%" not in raw and "//" not in raw and "/." not in raw:
        return raw
    path = raw
    if "%" in path:
        if _BAD_ESCAPE.search(path):
            return None
        if decode_slashes:
            path = _ENCODED_SLASH.sub("/", path)
        # Only unreserved characters are decoded: %2F and %25 must stay opaque, or a
        # backend would see a different path (and different segments) than we matched.
        path = _ESCAPE.sub(lambda m: _ESCAPES[m.group()], path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path that has no empty segments but a final one."""
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    # A final "." or ".." names a directory: keep the slash ("/a/b/.." -> "/a/").
    if out and segments[-1] in (".", ".."):
        result += "/"
    return result


# ---------------------------------------------------------------------------
# routes


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteConfig
    target: str        # path + ("?" + query if any) to put after the backend origin


HeaderLookup = Callable[[str], "str | None"]

_REQUEST_SAFE = "/:@!$&'()*+,;=-._~%"
_GROUP_REF = re.compile(r"\$(\d)")


class _Route:
    """One RouteConfig with everything a request needs precomputed."""
    __slots__ = ("config", "prefix", "plen", "any_next", "regex", "headers", "exclude",
                 "base", "base_query", "parts")

    def __init__(self, route: RouteConfig):
        self.config = route
        self.exclude = route.exclude
        self.headers = tuple((name.lower(), re.compile(rx)) for name, rx in route.match_headers)
        self.prefix = self.regex = self.parts = None
        if route.path is not None:
            # Compared against normalised request paths, so the rule gets the same treatment.
            encoded = quote(route.path, safe=_REQUEST_SAFE)
            self.prefix = normalize_path(encoded) or encoded
            self.plen = len(self.prefix)
            self.any_next = self.prefix.endswith("/")
        else:
            self.regex = re.compile(route.regex)
        template = route.url.path if route.url is not None else ""
        if self.regex is not None and _GROUP_REF.search(template):
            # [literal, group, literal, group, ..., literal]
            self.parts = _GROUP_REF.split(template)
            self.parts[1::2] = [int(n) for n in self.parts[1::2]]
        self.base, _, query = template.partition("?")
        self.base_query = query or None

    def target(self, path: str, query: str | None) -> str:
        """`path` is the part of the request path that follows the template's path."""
        return _join(self.base + path, self.base_query, query)

    def substituted(self, m: re.Match, query: str | None) -> str:
        parts = self.parts
        text = "".join([p if i % 2 == 0 else m.group(p) or "" for i, p in enumerate(parts)])
        base, _, base_query = text.partition("?")
        return _join(base, base_query or None, query)


def _join(path: str, base_query: str | None, query: str | None) -> str:
    if not path.startswith("/"):
        # An empty URL path, or "/foo/" -> "http://b": a request target needs its slash.
        path = "/" + path
    if base_query is not None:
        query = base_query if query is None else f"{base_query}&{query}"
    return path if query is None else f"{path}?{query}"


def _headers_match(headers, header: HeaderLookup) -> bool:
    for name, rx in headers:
        value = header(name)
        if value is None or rx.search(value) is None:
            return False
    return True


# ---------------------------------------------------------------------------
# the router


def split_host(value: str) -> tuple[str, str]:
    """A Host value or URL authority as (host, port): an IPv6 literal keeps its
    brackets, and port is "" when there is none."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        rest = value[end + 1:]
        return value[:end + 1], rest[1:] if rest.startswith(":") else ""
    host, sep, port = value.rpartition(":")
    return (host, port) if sep else (value, "")


class _Listener:
    __slots__ = ("vhosts", "names", "cache")

    def __init__(self, vhosts: list[VhostConfig]):
        self.vhosts = vhosts
        # (exact names, wildcard suffixes) per vhost, in file order
        self.names = [
            (frozenset([v.server_name, *(a for a in v.server_alias if not a.startswith("*."))]),
             tuple(a[1:] for a in v.server_alias if a.startswith("*.")))
            for v in vhosts
        ]
        self.cache: dict[str, VhostConfig] = {}

    def lookup(self, host: str) -> VhostConfig:
        return self.match(host) or self.vhosts[0]

    def match(self, host: str) -> VhostConfig | None:
        """The vhost that names this host, or None (no fallback)."""
        name = split_host(host)[0].strip().lower()
        if name.endswith("."):
            name = name[:-1]
        for vhost, (exact, suffixes) in zip(self.vhosts, self.names):
            if name in exact:
                return vhost
            for suffix in suffixes:
                if name.endswith(suffix) and len(name) > len(suffix):
                    return vhost
        return None


_CACHE_MAX = 1024


class Router:
    def __init__(self, config: Config):
        self.config = config
        self._listeners = {
            l.key: _Listener([v for v in config.vhosts if not v.listen or l.key in v.listen])
            for l in config.listeners
        }
        # Keyed by id(): hashing a frozen VhostConfig would walk all its fields per request.
        self._routes = {id(v): (v, tuple(_Route(r) for r in v.routes)) for v in config.vhosts}

    def vhost_for(self, listener_key: str, host: str | None) -> VhostConfig:
        listener = self._listeners[listener_key]
        if host is None:
            return listener.vhosts[0]
        cache = listener.cache
        vhost = cache.get(host)
        if vhost is None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()   # Host is client-chosen: never let it grow without bound
            vhost = cache[host] = listener.lookup(host)
        return vhost

    def names_host(self, listener_key: str, host: str) -> bool:
        """Whether a vhost of this listener answers to this host (no fallback): an
        absolute-form request for any other host is a forward-proxy request."""
        return self._listeners[listener_key].match(host) is not None

    def reads_headers(self, vhost: VhostConfig) -> bool:
        """Whether this vhost's routing looks at request headers (match_headers), so
        that the same host and target may route differently."""
        return any(r.headers for r in self._routes[id(vhost)][1])

    def route_for(self, vhost: VhostConfig, path: str, query: str | None,
                  header: HeaderLookup) -> RouteMatch | None:
        entry = self._routes.get(id(vhost))
        routes = entry[1] if entry is not None and entry[0] is vhost \
            else tuple(_Route(r) for r in vhost.routes)
        for r in routes:
            prefix = r.prefix
            if prefix is not None:
                if not path.startswith(prefix):
                    continue
                n = r.plen
                if len(path) > n and not r.any_next and path[n] != "/":
                    continue          # "/foo" must not match "/foobar"
                if r.headers and not _headers_match(r.headers, header):
                    continue
                if r.exclude:
                    return None
                return RouteMatch(r.config, r.target(path[n:], query))
            m = r.regex.search(path)
            if m is None or (r.headers and not _headers_match(r.headers, header)):
                continue
            if r.exclude:
                return None
            if r.parts is not None:
                return RouteMatch(r.config, r.substituted(m, query))
            return RouteMatch(r.config, r.target(path, query))   # no $N: append whole path
        return None

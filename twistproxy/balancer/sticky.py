"""Finding the sticky route a request asks for (mod_proxy_balancer's rules, reference §3.3).

Pure: a cookie header and a URL in, a route (or None) out.
"""

from __future__ import annotations


def route_from_url(url: str, param: str, scolon: bool) -> str | None:
    """`PARAM=value` anywhere in path or query; the value ends at ?, & (and ; if scolon)."""
    key = param + "="
    start = url.find(key)
    while start > 0 and url[start - 1] not in ";?&/":
        start = url.find(key, start + 1)        # "xPARAM=" is a different parameter
    if start < 0:
        return None
    value = url[start + len(key):]
    for stop in ("?&;" if scolon else "?&"):
        cut = value.find(stop)
        if cut >= 0:
            value = value[:cut]
    return value or None


def route_from_cookie(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie `name`: it starts the header or follows ';', ',' or space."""
    if not cookie_header:
        return None
    pos = 0
    while True:
        pos = cookie_header.find(name, pos)
        if pos < 0:
            return None
        before = cookie_header[pos - 1] if pos else ";"
        after = pos + len(name)
        rest = cookie_header[after:].lstrip(" ")
        if before in ";, \t" and rest.startswith("="):
            value = rest[1:]
            for stop in ";,":
                cut = value.find(stop)
                if cut >= 0:
                    value = value[:cut]
            return value.strip() or None
        pos = after


def split_route(value: str | None, sep: str) -> str | None:
    """The route is what follows the first separator ('' sep: the whole value)."""
    if not value:
        return None
    if not sep:
        return value
    _, found, route = value.partition(sep)
    return route if found and route else None

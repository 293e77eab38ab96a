"""Header rules: what crosses the proxy in each direction (hop-by-hop removal, Host,
X-Forwarded-*, Via), Header/RequestHeader actions, ProxyPassReverse and cookie rewriting,
Max-Forwards and the Server header. Pure: bytes in, bytes out; imports nothing from twisted.
"""

from __future__ import annotations

import functools
import platform

from twistproxy import __version__

__all__ = [
    "HOP_BY_HOP", "REWRITTEN_RESPONSE_HEADERS", "connection_tokens", "request_to_backend",
    "response_to_client", "apply_actions", "ReverseMap", "max_forwards",
    "decrement_max_forwards", "server_header", "transfer_codings",
]

# Headers are list[tuple[bytes, bytes]]: (name as received, value), order and repetition
# kept. Names are compared through name.lower() against these lower-case frozensets.

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})

REWRITTEN_RESPONSE_HEADERS = frozenset({b"location", b"content-location", b"uri", b"destination"})

_VIA_MODES = ("off", "on", "full", "block")
_VIA_FULL_SUFFIX = b" (twistproxy)"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# Framing headers the caller recomputes, plus the hop-by-hop set. Expect is dropped
# because the caller re-adds "Expect: 100-continue" itself when it forwards one.
_REQUEST_DROP = HOP_BY_HOP - {b"proxy-authenticate"} | {b"content-length", b"expect", b"host"}
_RESPONSE_DROP = HOP_BY_HOP - {b"proxy-authorization"} | {b"content-length"}

# Connection tokens that are options, not header names: never worth a filtering pass.
# "upgrade" is here because when keep_upgrade is set the Upgrade header must survive the
# "Connection: Upgrade" that always accompanies it (and otherwise it is dropped anyway).
_NOT_LISTED = frozenset({b"close", b"keep-alive", b"upgrade"})

_XFF, _XFH, _XFS, _VIA = b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-server", b"via"
_PROTO_PORT = frozenset((b"x-forwarded-proto", b"x-forwarded-port"))
_CANONICAL = {_XFF: b"X-Forwarded-For", _XFH: b"X-Forwarded-Host",
              _XFS: b"X-Forwarded-Server", _VIA: b"Via"}


def connection_tokens(headers) -> frozenset[bytes]:
    """Lower-cased tokens listed by every Connection header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            _add_tokens(tokens, value)
    return frozenset(tokens)


def transfer_codings(headers) -> list[bytes]:
    """Every Transfer-Encoding coding, lower-cased, in order (e.g. [b"gzip", b"chunked"])."""
    codings: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
    return codings


def _add_tokens(into: set, value: bytes) -> None:
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            into.add(token)


@functools.lru_cache(maxsize=64)
def _request_plan(keep_upgrade: bool, chain_auth: bool, add_headers: bool, via: str,
                  proto_port: bool = False):
    """(names to drop, names whose existing values are merged) for one combination of
    settings; cached so the hot path does no set arithmetic."""
    if via not in _VIA_MODES:
        raise ValueError(f"unknown proxy_via mode {via!r}")
    drop = set(_REQUEST_DROP)
    if keep_upgrade:
        drop.discard(b"upgrade")
    if chain_auth:
        drop.discard(b"proxy-authorization")
    if via == "block":
        drop.add(_VIA)
    if proto_port:
        drop |= _PROTO_PORT            # replaced, never appended: they cannot be forged
    merge = {_XFF, _XFH, _XFS} if add_headers else set()
    if via in ("on", "full"):
        merge.add(_VIA)
    return frozenset(drop), frozenset(merge)


@functools.lru_cache(maxsize=16)
def _response_plan(keep_upgrade: bool, via: str):
    if via not in _VIA_MODES:
        raise ValueError(f"unknown proxy_via mode {via!r}")
    drop = _RESPONSE_DROP - {b"upgrade"} if keep_upgrade else _RESPONSE_DROP
    return drop, frozenset({_VIA}) if via in ("on", "full") else frozenset()


def _without_listed(out: list, tokens: set, drop: frozenset, merged: dict) -> list:
    """Remove the headers a Connection header named (the rare second pass: only when it
    names something that is not already dropped, e.g. "Connection: close, X-Foo")."""
    listed = tokens - drop - _NOT_LISTED
    if not listed:
        return out
    for low in listed:
        merged.pop(low, None)        # a listed X-Forwarded-For etc.: forget the old values
    return [h for h in out if h[0].lower() not in listed]


def _append_merged(out: list, merged: dict, low: bytes, addition: bytes) -> None:
    """Add one header: the existing values of that name (collected in `merged`, first
    name bytes kept) comma-joined, then `addition`. Merged headers go last."""
    name, values = merged.pop(low, (_CANONICAL[low], None))
    out.append((name, b", ".join(values + [addition]) if values else addition))


def _collect(merged: dict, low: bytes, name: bytes, value: bytes) -> None:
    entry = merged.get(low)
    if entry is None:
        merged[low] = entry = (name, [])
    value = value.strip()
    if value:                        # an empty field would leave a stray ", " behind
        entry[1].append(value)


def request_to_backend(headers, *, client_ip: str, backend_hostport: bytes,
                       preserve_host: bool, add_headers: bool, server_name: bytes, via: str,
                       via_name: bytes, client_version: bytes, proxy_chain_auth: bool = False,
                       keep_upgrade: bool = False, forwarded_proto: bytes = b"",
                       forwarded_port: int = 0) -> tuple[list, bytes | None]:
    """The headers the backend receives, minus framing (the caller adds Content-Length or
    Transfer-Encoding, Connection, and Expect when it forwards 100-continue).

    Returns (headers, the client's first Host value or None). Host comes first; merged
    X-Forwarded-* and Via headers come last; everything else keeps order and name bytes.
    With add_headers and a `forwarded_proto`, X-Forwarded-Proto and X-Forwarded-Port
    say how the client reached us (any the client sent are dropped).
    """
    proto_port = add_headers and bool(forwarded_proto)
    drop, merge = _request_plan(keep_upgrade, proxy_chain_auth, add_headers, via, proto_port)
    out: list = [None]               # slot 0 is Host, known only after the loop
    host = None
    tokens: set = set()
    merged: dict = {}                # lower name -> (first name bytes, [values])
    for name, value in headers:
        low = name.lower()
        if low in drop:
            if low == b"host":
                if host is None:
                    host = value
            elif low == b"connection" and value.lower() not in _NOT_LISTED:
                _add_tokens(tokens, value)     # it names more than close/keep-alive
            continue
        if low in merge:
            _collect(merged, low, name, value)
            continue
        out.append((name, value))
    out[0] = (b"Host", host if preserve_host and host is not None else backend_hostport)
    if tokens:
        out = _without_listed(out, tokens, drop, merged)
    if add_headers:
        _append_merged(out, merged, _XFF, client_ip.encode("latin-1"))
        if host is not None:
            _append_merged(out, merged, _XFH, host)
        elif _XFH in merged:          # nothing to add: pass the client's values on
            name, values = merged.pop(_XFH)
            if values:
                out.append((name, b", ".join(values)))
        _append_merged(out, merged, _XFS, server_name)
        if proto_port:
            out.append((b"X-Forwarded-Proto", forwarded_proto))
            out.append((b"X-Forwarded-Port", b"%d" % forwarded_port))
    if _VIA in merge:
        _append_merged(out, merged, _VIA, _via_entry(via, client_version, via_name))
    return out, host


def _via_entry(via: str, version: bytes, via_name: bytes) -> bytes:
    entry = version + b" " + via_name
    return entry + _VIA_FULL_SUFFIX if via == "full" else entry


def response_to_client(headers, *, via: str, via_name: bytes, backend_version: bytes,
                       keep_upgrade: bool = False) -> list:
    """The backend's response headers as the client gets them, minus framing."""
    drop, merge = _response_plan(keep_upgrade, via)
    out: list = []
    tokens: set = set()
    merged: dict = {}
    for name, value in headers:
        low = name.lower()
        if low in drop:
            if low == b"connection" and value.lower() not in _NOT_LISTED:
                _add_tokens(tokens, value)     # it names more than close/keep-alive
            continue
        if low in merge:
            _collect(merged, low, name, value)
            continue
        out.append((name, value))
    if tokens:
        out = _without_listed(out, tokens, drop, merged)
    if merge:
        _append_merged(out, merged, _VIA, _via_entry(via, backend_version, via_name))
    return out


# ---------------------------------------------------------------------------
# Header / RequestHeader actions


@functools.lru_cache(maxsize=1024)
def _encoded(action) -> tuple[bytes, bytes, bytes]:
    """(name, lower name, value) as bytes, once per configured action."""
    if action.action not in ("set", "add", "unset"):
        raise ValueError(f"unknown header action {action.action!r}")
    name = action.name.encode("latin-1")
    return name, name.lower(), action.value.encode("latin-1")


def apply_actions(headers, actions, *, error_response: bool = False) -> list:
    """Apply HeaderAction items in order, as Apache's Header/RequestHeader do. On the
    proxy's own error responses only `always` actions apply. Returns a new list."""
    out = list(headers)
    for action in actions:
        if error_response and not action.always:
            continue
        name, low, value = _encoded(action)
        if action.action == "add":
            out.append((name, value))
            continue
        kept = [h for h in out if h[0].lower() != low]
        if action.action == "set":
            # like apr_table_set: the one header takes the first old one's place
            at = next((i for i, h in enumerate(out) if h[0].lower() == low), len(out))
            kept.insert(at, (name, value))
        out = kept
    return out


# ---------------------------------------------------------------------------
# ProxyPassReverse, ProxyPassReverseCookieDomain/Path


def _port_variants(url: str) -> list[str]:
    """The URL as written, plus the same URL with its default port added or removed,
    since a backend may write either form in its Location."""
    scheme, sep, rest = url.partition("://")
    default = _DEFAULT_PORTS.get(scheme.lower())
    if not sep or default is None:
        return [url]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, tail = rest[:end], rest[end:]
    suffix = f":{default}"
    if authority.endswith(suffix):
        other = authority[:-len(suffix)]
    elif (authority.rpartition("]")[2] if authority.startswith("[") else authority).count(":"):
        return [url]                 # some other explicit port: nothing to add
    else:
        other = authority + suffix
    return [url, f"{scheme}://{other}{tail}"]


class ReverseMap:
    """ProxyPassReverse entries (backend URL prefix, public path) and the cookie
    Domain/Path maps, pre-encoded once per route at configuration time."""

    __slots__ = ("_urls", "_paths", "_domains")

    def __init__(self, entries, cookie_domain=(), cookie_path=()):
        # utf-8, not latin-1: identical for ASCII, and cannot fail at start-up
        self._urls = tuple((variant.lower().encode(), public.encode())
                           for backend, public in entries
                           for variant in _port_variants(backend))
        self._paths = tuple((i.encode(), p.encode()) for i, p in cookie_path if i)
        self._domains = tuple((i.lower().encode(), p.encode()) for i, p in cookie_domain if i)

    def __bool__(self) -> bool:
        return bool(self._urls or self._paths or self._domains)

    def location(self, value: bytes, public_base: bytes) -> bytes:
        """Location/Content-Location/URI/Destination: first entry whose backend URL is a
        case-insensitive prefix (no boundary check, as in Apache) becomes the public path;
        a relative result is made absolute with public_base (b"https://host:port")."""
        low = value.lower()
        for prefix, public in self._urls:
            if low.startswith(prefix):
                result = public + value[len(prefix):]
                if _has_scheme(result):
                    return result
                return public_base + (result if result.startswith(b"/") else b"/" + result)
        return value

    def set_cookie(self, value: bytes) -> bytes:
        """One Set-Cookie value with its Path and Domain attribute values mapped; every
        other byte (name=value, other attributes, spacing) is left as it was."""
        if not (self._paths or self._domains):
            return value
        parts = value.split(b";")
        changed = False
        for i in range(1, len(parts)):           # parts[0] is name=value: never touched
            part = parts[i]
            eq = part.find(b"=")
            if eq < 0:
                continue
            attr = part[:eq].strip().lower()
            raw = part[eq + 1:]
            current = raw.strip()
            if attr == b"path":
                table, key = self._paths, current               # paths: case-sensitive
            elif attr == b"domain":
                table, key = self._domains, current.lower()     # domains: case-insensitive
            else:
                continue
            for internal, public in table:
                if key.startswith(internal):
                    lead = len(raw) - len(raw.lstrip())
                    parts[i] = part[:eq + 1] + raw[:lead] + public + raw[len(raw.rstrip()):]
                    changed = True
                    break
        return b";".join(parts) if changed else value

    def rewrite(self, headers, public_base: bytes) -> list:
        """Both rewrites over a whole response header list, in one pass."""
        if not self:
            return headers
        out = []
        for name, value in headers:
            low = name.lower()
            if low in REWRITTEN_RESPONSE_HEADERS:
                value = self.location(value, public_base)
            elif low == b"set-cookie":
                value = self.set_cookie(value)
            out.append((name, value))
        return out


def _has_scheme(url: bytes) -> bool:
    colon = url.find(b":")
    return colon > 0 and url[:1].isalpha() and b"/" not in url[:colon]


# ---------------------------------------------------------------------------
# Max-Forwards, Server

_MAX_FORWARDS_METHODS = frozenset({b"TRACE", b"OPTIONS"})


def max_forwards(headers, method: bytes) -> int | None:
    """Max-Forwards of a TRACE/OPTIONS request, or None (absent, or another method: the
    header is then forwarded untouched). ValueError when it is not one non-negative
    integer (the caller answers 400). At 0 the caller answers the request itself."""
    if method not in _MAX_FORWARDS_METHODS:
        return None
    found = None
    for name, value in headers:
        if name.lower() == b"max-forwards":
            if found is not None:
                raise ValueError("more than one Max-Forwards header")
            found = value.strip()
    if found is None:
        return None
    if not found.isdigit():                  # bytes.isdigit: ASCII digits only, no sign
        raise ValueError(f"Max-Forwards {found!r} is not a non-negative integer")
    return int(found)


def decrement_max_forwards(headers) -> list:
    """A new list with Max-Forwards one lower (in place, name bytes kept)."""
    out = []
    for name, value in headers:
        if name.lower() == b"max-forwards" and value.strip().isdigit():
            value = str(max(int(value.strip()) - 1, 0)).encode()
        out.append((name, value))
    return out


@functools.lru_cache(maxsize=4)
def server_header(tokens: str) -> bytes | None:
    """The Server header value for server_tokens = prod | full | off."""
    if tokens == "off":
        return None
    if tokens == "prod":
        return b"twistproxy"
    if tokens == "full":
        # the installed distribution's version: importing twisted is not allowed here
        from importlib.metadata import PackageNotFoundError, version
        try:
            twisted = f" Twisted/{version('twisted')}"
        except PackageNotFoundError:
            twisted = ""
        return f"twistproxy/{__version__} Python/{platform.python_version()}{twisted}".encode()
    raise ValueError(f"unknown server_tokens {tokens!r}")

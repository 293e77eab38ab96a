"""Who a request is for: the one check of a `Host` value, an absolute-form target's
authority and a CONNECT target, with the rules of Apache's `HttpProtocolOptions Strict`,
and the split of an absolute-form target. Pure (bytes in, bytes out); no twisted.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["split_authority", "host_port", "absolute_form"]

# reg-name: dot-separated labels of letters, digits, "-" and "_", one trailing dot allowed
_REG_NAME = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?").fullmatch
# A name whose last label is a number (decimal, or 0x hex) is an IPv4 address to URL
# parsers and resolvers ("0x7f.1", "127.1", "2130706433"): only the dotted quad is taken.
_ENDS_IN_NUMBER = re.compile(rb"(?:^|\.)(?:[0-9]+|0[xX][0-9A-Fa-f]*)\.?$").search
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"%s(?:\.%s){3}" % (_OCTET, _OCTET)).fullmatch
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]+").fullmatch


def _valid_ipv6(literal: bytes) -> bool:
    if not _IPV6_CHARS(literal):          # no zone ("%eth0"), no IPvFuture
        return False
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:
        return False
    return True


def split_authority(value: bytes) -> tuple[bytes, int | None] | None:
    """(host, port) of `host [":" port]`, or None when it is not one: host a reg-name, a
    dotted-quad IPv4 address or a bracketed IPv6 literal (kept with its brackets); port
    all digits within 1-65535, None when absent."""
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0 or not _valid_ipv6(value[1:end]):
            return None
        host, rest = value[:end + 1], value[end + 1:]
    else:
        host, sep, port = value.partition(b":")
        rest = sep + port
        if _ENDS_IN_NUMBER(host):
            if not _IPV4(host):
                return None
        elif not _REG_NAME(host):
            return None
    if not rest:
        return host, None
    port = rest[1:]
    # b"".isdigit() is False; bytes.isdigit is ASCII-only; the length bounds int()
    if rest[:1] != b":" or not port.isdigit() or len(port) > 10 or \
            not 0 < int(port) < 65536:
        return None
    return host, int(port)


def host_port(value: bytes, default: int | None = None) -> tuple[str, int] | None:
    """A CONNECT target or URL authority as (host without brackets, port), the port
    `default` when absent (None: a port is required); None when not valid."""
    parts = split_authority(value)
    if parts is None:
        return None
    host, port = parts
    if port is None:
        if default is None:
            return None
        port = default
    name = host.decode("ascii")
    return (name[1:-1] if name[:1] == "[" else name), port


def absolute_form(target: bytes) -> tuple[bytes, bytes, bytes] | None:
    """`http://authority/path?query` as (lower-case scheme, authority, path and query,
    "/" when empty); None unless the scheme is http or https and the authority valid
    (no userinfo: RFC 9110 §4.2.4)."""
    scheme, sep, rest = target.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"https"):
        return None
    cut = len(rest)
    for stop in (b"/", b"?"):
        i = rest.find(stop, 0, cut)
        if i >= 0:
            cut = i
    authority, tail = rest[:cut], rest[cut:]
    if split_authority(authority) is None:
        return None
    return scheme, authority, (tail if tail[:1] == b"/" else b"/" + tail)

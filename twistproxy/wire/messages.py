"""Bytes of HTTP/1.1 message heads and of the proxy's own small error pages.

Owns status reasons, head serialisation and the HTML error bodies. Error pages name
the status only: never a backend address, a path on disk or an exception text.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
REASONS[431] = b"Request Header Fields Too Large"

_EXPLANATIONS = {
    400: "Your browser sent a request that this server could not understand.",
    403: "You don't have permission to access this resource.",
    404: "The requested URL was not found on this server.",
    405: "The method is not allowed for this URL.",
    408: "The server timed out waiting for the request.",
    413: "The request body is larger than this server accepts.",
    414: "The requested URL's length exceeds the capacity limit for this server.",
    431: "A request header field, or the number of them, exceeds the server's limit.",
    501: "The server does not support the action requested.",
    502: "The proxy server received an invalid response from an upstream server.",
    503: "The server is temporarily unable to service your request. Please try again later.",
    504: "The proxy server did not receive a timely response from the upstream server.",
    505: "The server does not support the HTTP version of the request.",
}


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Unknown")


def error_body(status: int) -> bytes:
    phrase = reason(status).decode("ascii")
    text = _EXPLANATIONS.get(status, phrase + ".")
    return (f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head>"
            f"<body><h1>{phrase}</h1><p>{text}</p></body></html>\n").encode("ascii")


def serialize_headers(headers) -> bytes:
    """`Name: value\\r\\n` for each pair, in order."""
    if not headers:
        return b""
    return b"\r\n".join([b": ".join(pair) for pair in headers]) + b"\r\n"


class HttpDate:
    """The Date header value, formatted at most once a second."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value

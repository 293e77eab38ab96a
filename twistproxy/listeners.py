"""Binding the configured addresses and ports, before anything starts.

Owns turning [[listen]] entries into bound, listening sockets, and turning the
operating system's refusal into one sentence an operator can act on. Binding happens
here, apart from the reactor, so that a taken port stops start-up before any service
runs (nothing half-started) and so that twistd binds privileged ports before it drops
privileges.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from .config import ListenConfig

BACKLOG = 1024


class BindError(Exception):
    """One line: which address could not be bound and why."""


@dataclass
class BoundSocket:
    listen: ListenConfig
    sock: socket.socket

    @property
    def family(self) -> int:
        return self.sock.family

    @property
    def port(self) -> int:
        """The port actually bound (differs from the configured one only for port 0)."""
        return self.sock.getsockname()[1]


_REASONS = {
    errno.EADDRINUSE: "address already in use (another process owns it)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available (no interface on this machine has it)",
}


def bind_one(listen: ListenConfig, address: str | None = None) -> BoundSocket:
    address = address or listen.bind_address
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    shown = f"[{address}]:{listen.port}" if family == socket.AF_INET6 else \
        f"{address}:{listen.port}"
    if listen.address == "*":
        shown = f"*:{listen.port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.address == "*":
            try:   # "*" means every address of both families
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        sock.bind((address, listen.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if listen.address == "*" and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return bind_one(listen, "0.0.0.0")     # a host without IPv6
        reason = _REASONS.get(e.errno, e.strerror or str(e))
        raise BindError(f"cannot listen on {shown}: {reason}") from None
    return BoundSocket(listen, sock)


def bind_all(listeners, inherited: dict[str, socket.socket] | None = None
             ) -> list[BoundSocket]:
    """Bind every listener or none: on the first failure, close what was bound. A
    listener whose key is in `inherited` (sockets received from the process taken over,
    or from systemd) takes that socket out of it instead of binding."""
    bound: list[BoundSocket] = []
    try:
        for listen in listeners:
            sock = inherited.pop(listen.key, None) if inherited else None
            bound.append(BoundSocket(listen, sock) if sock is not None else bind_one(listen))
    except BindError:
        for b in bound:
            b.sock.close()
        raise
    return bound


def close_unused(inherited: dict[str, socket.socket], why: str, level: str = "warn") -> None:
    """Close the inherited sockets no listener took, with one line each."""
    from twisted.logger import Logger, LogLevel
    for key, sock in inherited.items():
        Logger(namespace="twistproxy").emit(LogLevel.levelWithName(level),
                                            "inherited socket {key}: {why}; closed",
                                            key=key, why=why)
        sock.close()
    inherited.clear()

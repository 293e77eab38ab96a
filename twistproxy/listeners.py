"""Binding the configured addresses and ports, before anything starts.

Owns turning [[listen]] entries into bound, listening sockets, turning the operating
system's refusal into one sentence an operator can act on (windows/binding.py words
it), and handing each socket to the reactor (`listen_on`). Binding happens here, apart
from the reactor, so that a taken port stops start-up before any service runs (nothing
half-started) and so that twistd binds privileged ports before it drops privileges.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorSocket

from .config import ListenConfig
from .windows import WINDOWS
from .windows.binding import apply, bind_reason, listen_options

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


def _shown(listen: ListenConfig, address: str) -> str:
    if listen.address == "*":
        return f"*:{listen.port}"
    return f"[{address}]:{listen.port}" if ":" in address else f"{address}:{listen.port}"


def bind_one(listen: ListenConfig, address: str | None = None,
             windows: bool = WINDOWS, accept: bool = True) -> BoundSocket:
    """`accept = False`: bound but not listening, for a reactor that binds the address
    again itself (listen_on): a connection that came meanwhile would sit in this
    socket's queue and be reset when it closes; unbound, it is refused and retried."""
    address = address or listen.bind_address
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # "*" means every address of both families
        apply(sock, listen_options(windows, dual_stack=family == socket.AF_INET6
                                   and listen.address == "*"))
        sock.bind((address, listen.port))
        if accept:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if listen.address == "*" and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return bind_one(listen, "0.0.0.0", windows, accept)     # a host without IPv6
        raise BindError(f"cannot listen on {_shown(listen, address)}: "
                        f"{bind_reason(e, listen.port, windows)}") from None
    return BoundSocket(listen, sock)


def bind_all(listeners, inherited: dict[str, socket.socket] | None = None,
             accept: bool = True) -> list[BoundSocket]:
    """Bind every listener or none: on the first failure, close what was bound. A
    listener whose key is in `inherited` (sockets received from the process taken over,
    or from systemd) takes that socket out of it instead of binding."""
    bound: list[BoundSocket] = []
    try:
        for listen in listeners:
            sock = inherited.pop(listen.key, None) if inherited else None
            bound.append(BoundSocket(listen, sock) if sock is not None else
                         bind_one(listen, accept=accept))
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


def adopts(reactor) -> bool:
    """Whether the reactor serves an already bound socket (epoll, poll and select do;
    IOCP does not)."""
    return IReactorSocket.providedBy(reactor)


def listen_on(reactor, bound: BoundSocket, factory, adopt: bool | None = None,
              windows: bool = WINDOWS):
    """The reactor's listening port for `factory` on the socket bind_one made, which
    is closed here (the reactor holds its own). A reactor that cannot adopt a socket
    gets the address instead and binds it again at once, with the same options; the
    first bind was the check, so a failure now is a race with another process, told
    in the same words (BindError)."""
    if adopt is None:
        adopt = adopts(reactor)
    if adopt:
        port = reactor.adoptStreamPort(bound.sock.fileno(), bound.family, factory)
        bound.sock.close()
        return port
    name = bound.sock.getsockname()
    address, number = name[:2]
    if bound.family == socket.AF_INET6 and name[3]:      # a link-local address's scope
        address = f"{address}%{name[3]}"
    dual_stack = bound.family == socket.AF_INET6 and bound.listen.address == "*"
    bound.sock.close()
    port = _port_class(reactor)(number, factory, BACKLOG, address, reactor)
    port.options = listen_options(windows, dual_stack)
    try:
        port.startListening()
    except CannotListenError as e:
        raise BindError(f"cannot listen on {_shown(bound.listen, address)}: "
                        f"{bind_reason(e.socketError, number, windows)}") from None
    return port


class ListenPort(tcp.Port):
    """Twisted's TCP port (the one listenTCP makes) with our listening options: on
    Windows, Twisted's own sets none, so SO_EXCLUSIVEADDRUSE would be missing."""

    options: list = []

    def createInternetSocket(self):
        sock = tcp.Port.createInternetSocket(self)   # SO_REUSEADDR on POSIX, as ours
        apply(sock, self.options)
        return sock


def _port_class(reactor):
    if type(reactor).__module__.startswith("twisted.internet.iocpreactor"):
        from .windows.iocp import ListenPort as IOCPListenPort
        return IOCPListenPort
    return ListenPort

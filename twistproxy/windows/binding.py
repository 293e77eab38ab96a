"""Listening sockets as Windows needs them, and its refusals in words an admin can act on.

Owns the socket options a listener gets (`listen_options`) and the sentence for a bind
error (`bind_reason`) on either system. Both take `windows` so the Windows choices are
tested on Linux by selecting them.

Why Windows differs: there SO_REUSEADDR lets a second socket bind a port that is
already listening and steal part of its connections, so a listener takes
SO_EXCLUSIVEADDRUSE instead (on POSIX, SO_REUSEADDR only allows rebinding past
TIME_WAIT, which a restart needs). And on a Windows server the usual holder of port
80/443 is not a process but the kernel's HTTP listener, http.sys, which IIS uses and
which by default listens on every address: the words say how to see and narrow that.
"""

from __future__ import annotations

import errno
import socket

# Winsock's numbers (winerror.h); Python on Windows reports them as OSError.errno
WSAEACCES = 10013
WSAEADDRINUSE = 10048
WSAEADDRNOTAVAIL = 10049
SO_EXCLUSIVEADDRUSE = getattr(socket, "SO_EXCLUSIVEADDRUSE", -5)    # ~SO_REUSEADDR (4)

# the ports IIS (http.sys) takes on every address unless its iplisten list is narrowed
IIS_PORTS = (80, 443)

Option = tuple[int, int, int]


def listen_options(windows: bool, dual_stack: bool = False) -> list[Option]:
    """(level, option, value) for a listening socket, in the order to set them;
    `dual_stack`: an IPv6 socket that takes IPv4 too ("*")."""
    options = [(socket.SOL_SOCKET, SO_EXCLUSIVEADDRUSE, 1) if windows else
               (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]
    if dual_stack:     # Windows's default is IPv6 only, Linux's follows a sysctl
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0))
    return options


def apply(sock: socket.socket, options: list[Option]) -> None:
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            if option != socket.IPV6_V6ONLY:     # a host without IPv6: "*" is IPv4 then
                raise


_POSIX = {
    errno.EADDRINUSE: "address already in use (another process owns it)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available (no interface on this machine has it)",
}


def bind_reason(err: OSError, port: int, windows: bool) -> str:
    """Why binding `port` failed, as one clause."""
    if not windows:
        return _POSIX.get(err.errno or 0, err.strerror or str(err))
    code = getattr(err, "winerror", None) or err.errno
    who = f"`netstat -ano -p tcp | findstr \":{port} \"` shows which process (PID 4 is " \
          "the kernel's HTTP listener, http.sys)"
    if code == WSAEADDRINUSE:
        reason = "address already in use (WSAEADDRINUSE 10048): another process holds it"
    elif code == WSAEACCES:
        reason = ("access denied (WSAEACCES 10013): another process holds the port for "
                  "its exclusive use, or Windows reserves it (`netsh int ipv4 show "
                  "excludedportrange protocol=tcp`)")
    elif code == WSAEADDRNOTAVAIL:
        return ("address not available (WSAEADDRNOTAVAIL 10049): no interface of this "
                "machine has it (`ipconfig` lists them)")
    else:
        return err.strerror or str(err)
    if port in IIS_PORTS:
        reason += (", often the kernel's HTTP listener (http.sys, used by IIS), which "
                   "takes every address unless told otherwise: `netsh http show iplisten` "
                   "lists the addresses it takes (an empty list: all of them); to leave "
                   "this one to twistproxy, list IIS's own with `netsh http add iplisten "
                   "ipaddress=<the IIS address>` and restart it (`net stop http /y`, then "
                   "`net start w3svc`); " + who)
    else:
        reason += "; " + who
    return reason


def iis_warnings(listeners, windows: bool) -> list[str]:
    """For `twistproxy check` on Windows: a wildcard listener on a port IIS usually
    holds either fails to bind or, bound first, keeps IIS's sites from starting."""
    if not windows:
        return []
    out = []
    for i, listen in enumerate(listeners):
        if listen.port in IIS_PORTS and listen.address in ("*", "0.0.0.0", "::"):
            out.append(f"warning: listen[{i}] ({listen.key}) binds every address on port "
                       f"{listen.port}, which IIS (http.sys) shares unless `netsh http add "
                       "iplisten` narrows it: bind the address meant for twistproxy "
                       "instead, and leave IIS its own")
    return out


__all__ = ["IIS_PORTS", "SO_EXCLUSIVEADDRUSE", "WSAEACCES", "WSAEADDRINUSE",
           "WSAEADDRNOTAVAIL", "apply", "bind_reason", "iis_warnings", "listen_options"]

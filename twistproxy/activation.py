"""systemd socket activation: listening sockets systemd bound for this process.

Owns reading LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES (Twisted's ListenFDs) and
matching each inherited socket to a listener, by its LISTEN_FDNAMES name equal to the
listener's key (systemd's FileDescriptorName= cannot hold ":", so "127.0.0.1_8080" names
127.0.0.1:8080; "admin" names the admin listener) or else by the address it is bound to; service.py then uses it instead of binding
(listeners.bind_all). A socket matching no listener is warned about and closed.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from twisted.logger import Logger
from twisted.python.systemd import ListenFDs

log = Logger(namespace="twistproxy")

_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _bound_to(sock: socket.socket):
    """(address, port) a TCP socket is bound to, or None for any other socket."""
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                sock.type != socket.SOCK_STREAM:
            return None
        host, port = sock.getsockname()[:2]
        return ipaddress.ip_address(host.split("%")[0]), port
    except (OSError, ValueError):
        return None


def _listen_address(listen):
    return ipaddress.ip_address(listen.bind_address), listen.port


def inherited(listens, admin=None) -> dict[str, socket.socket]:
    """Listener key -> the socket systemd passed for it; {} when not socket-activated.
    `listens`: the proxy's ListenConfigs; `admin`: the admin listener's, if any."""
    fds = ListenFDs.fromEnvironment()
    for name in _ENV:            # ours alone: not the workers', not a child's
        os.environ.pop(name, None)
    listens = tuple(listens) + ((admin,) if admin is not None else ())
    by_address = {_listen_address(l): l.key for l in listens}
    keys = {l.key.replace(":", "_"): l.key for l in listens}
    keys.update({l.key: l.key for l in listens})
    if admin is not None:
        keys["admin"] = admin.key
    out: dict[str, socket.socket] = {}
    named = {fd: name for name, fd in fds.inheritedNamedDescriptors().items()}
    for fd in fds.inheritedDescriptors():
        sock = socket.socket(fileno=fd)
        name = named.get(fd, "")
        where = _bound_to(sock)
        key = keys.get(name) or by_address.get(where)
        shown = f"fd {fd}" + (f" ({name})" if name else "") + \
            (f" bound to {where[0]}:{where[1]}" if where else "")
        if key is None or key in out:
            log.warn("systemd passed {shown}, which matches no [[listen]] or [admin] "
                     "listener (by LISTEN_FDNAMES or address); closed", shown=shown)
            sock.close()
            continue
        sock.setblocking(False)
        out[key] = sock
        log.info("using the socket systemd passed ({shown}) for {key}", shown=shown, key=key)
    return out

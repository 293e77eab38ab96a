"""Handing the listening sockets from a running master to its successor (HAProxy's
`-x`, nginx's binary upgrade), so that a restart or an upgrade never closes a port.

Owns `[server] handover_socket`: the UNIX socket (mode 0600) the master listens on,
the conversation on it, and both of its ends:

- the old master (HandoverServer, hooked into MasterService) answers `takeover` with
  every listening socket it holds, passed by SCM_RIGHTS (Twisted's
  `sendFileDescriptor`), and a line naming their listener keys; it keeps serving until
  the new process says `serving`, then closes its handover socket (which removes the
  file), answers `bye` and stops exactly as on SIGTERM;
- the new process (`twistproxy run --takeover FILE`, Takeover) receives them with a
  blocking `recv_fds` before the reactor runs, binds with them (listeners.bind_all),
  says `serving` once its workers serve, and after `bye` listens on the handover socket
  itself.

Both processes hold the same kernel sockets meanwhile: no connection is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

log = Logger(namespace="twistproxy")

RECEIVE_TIMEOUT = 10.0       # the old master answers at once; this is for a stuck one


class HandoverError(Exception):
    """One line: why the handover socket cannot be served or used."""


def listen(path: str, factory, reactor):
    """The handover socket, listening (mode 0600): a listening port of `reactor`. A
    socket file nobody answers on (left by a dead process) is replaced; one a live
    process answers on is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise HandoverError(f"cannot listen on the handover socket {path}: the file "
                                "exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)                      # stale: its process is gone
        except OSError as e:
            raise HandoverError(f"cannot listen on the handover socket {path}: "
                                f"{e.strerror or e}") from None
        else:
            raise HandoverError(f"cannot listen on the handover socket {path}: a running "
                                "process answers there (take its sockets over with "
                                "`twistproxy run --takeover FILE`)")
        finally:
            probe.close()
    umask = os.umask(0o177)                  # 0600 from the start, not after a chmod
    try:
        return reactor.listenUNIX(path, factory, mode=0o600)
    except error.CannotListenError as e:
        raise HandoverError(f"cannot listen on the handover socket {path}: "
                            f"{getattr(e.socketError, 'strerror', None) or e.socketError}"
                            ) from None
    finally:
        os.umask(umask)


def _peer_pid(transport) -> int:
    cred = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
    return struct.unpack("3i", cred)[0]


# -- the old master's end ---------------------------------------------------------


class _Giving(LineReceiver):
    delimiter = b"\n"
    given = False

    def lineReceived(self, line):
        server: HandoverServer = self.factory.server
        if line.startswith(b"takeover") and not self.given and not server.stopping():
            self.given = True
            pid = _peer_pid(self.transport)
            sockets = server.sockets()
            log.info("pid {pid} is taking the listening sockets over", pid=pid)
            for _, sock in sockets:
                self.transport.sendFileDescriptor(sock.fileno())
            # at least one byte per descriptor (each travels with one): the line is
            # longer than that
            self.sendLine(json.dumps({"pid": os.getpid(),
                                      "keys": [k for k, _ in sockets]}).encode())
        elif line == b"serving" and self.given and not server.done:
            server.handed_over(self, _peer_pid(self.transport))
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.given and not self.factory.server.done:
            log.warn("the takeover was abandoned (the new process went away before it "
                     "served); still serving")


class HandoverServer:
    """The master's hook (MasterService.handover): serves the handover socket (bound
    at start-up), or, after --takeover, once the old master has let it go."""

    def __init__(self, path: str, reactor, takeover: "Takeover | None"):
        self.path = path
        self.reactor = reactor
        self.takeover = takeover
        self.factory = protocol.Factory.forProtocol(_Giving)
        self.factory.server = self
        self.factory.noisy = False
        self.master = None
        self.done = False
        self.port = None if takeover else listen(path, self.factory, reactor)

    def start(self, master) -> None:
        self.master = master
        if self.port is not None:
            log.info("handover socket {path}", path=self.path)

    def worker_ready(self, master) -> None:
        """Every worker serves: tell the old process, then listen after its `bye`."""
        if self.takeover is None or len(master.workers) < master.count \
                or not all(w.ready for w in master.workers.values()):
            return
        takeover, self.takeover = self.takeover, None
        takeover.serving(self.reactor, self._after_takeover)

    def _after_takeover(self) -> None:
        if self.master.stopping:
            return
        try:
            self.port = listen(self.path, self.factory, self.reactor)
        except HandoverError as e:
            log.warn("{e}", e=e)
            return
        log.info("handover socket {path}", path=self.path)

    def sockets(self) -> list[tuple[str, socket.socket]]:
        held = [(b.listen.key, b.sock) for b in self.master.bound]
        admin = getattr(self.master, "admin_bound", None)
        if admin is not None:
            held.append((admin.listen.key, admin.sock))
        return held

    def stopping(self) -> bool:
        return self.master.stopping or self.done

    def handed_over(self, proto: _Giving, pid: int) -> None:
        self.done = True
        log.info("handed the listening sockets to pid {pid}; stopping", pid=pid)

        def bye(_):  # after the socket file is gone: the new process then binds it
            proto.sendLine(b"bye")
            proto.transport.loseConnection()
            os.kill(os.getpid(), signal.SIGTERM)    # the very path of a SIGTERM
        self.stop().addCallback(bye)

    def stop(self):
        """Stop listening (the socket file goes with it); a Deferred."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def for_master(config, reactor, takeover: "Takeover | None") -> HandoverServer | None:
    """The master's HandoverServer when [server] handover_socket is set: listening
    now (or HandoverError), or once the takeover under way is done."""
    path = config.server.handover_socket
    if not path:
        return None
    if reactor is None:
        from twisted.internet import reactor
    return HandoverServer(path, reactor, takeover)


# -- the new process's end --------------------------------------------------------


class Takeover:
    """The sockets received from the old master (`sockets`: listener key -> socket)
    and the connection on which to say `serving`."""

    def __init__(self, sock: socket.socket, old_pid: int, sockets: dict[str, socket.socket]):
        self.sock = sock
        self.old_pid = old_pid
        self.sockets = sockets

    @classmethod
    def connect(cls, config) -> "Takeover":
        """Ask the process on the new config's handover socket for its listening
        sockets (blocking, before the reactor runs), or HandoverError."""
        path = config.server.handover_socket
        if not path:
            raise HandoverError(f"{config.path}: --takeover needs [server] handover_socket "
                                "(the running process's handover socket)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(RECEIVE_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise HandoverError(f"--takeover: nothing answers on the handover socket "
                                f"{path} ({e.strerror or e})") from None
        data, fds = b"", []
        try:
            sock.sendall(f"takeover {os.getpid()}\n".encode())
            while b"\n" not in data:
                chunk, got, _, _ = socket.recv_fds(sock, 65536, 64)
                fds += got
                if not chunk:
                    raise OSError("it closed the connection")
                data += chunk
            head = json.loads(data.split(b"\n", 1)[0])
            keys, old_pid = head["keys"], int(head["pid"])
            if len(keys) != len(fds):
                raise OSError(f"{len(fds)} sockets for {len(keys)} keys")
        except (OSError, ValueError, KeyError, TypeError) as e:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise HandoverError(f"--takeover: the process on {path} did not hand its "
                                f"sockets over ({getattr(e, 'strerror', None) or e})") from None
        sockets = {}
        for key, fd in zip(keys, fds):
            s = socket.socket(fileno=fd)
            s.setblocking(False)
            sockets[key] = s
        log.info("took {n} listening socket(s) over from pid {pid}: {keys}", n=len(keys),
                 pid=old_pid, keys=", ".join(keys) or "none")
        return cls(sock, old_pid, sockets)

    def serving(self, reactor, then=None) -> None:
        """Say `serving`; `then()` once the old process has let the handover socket go."""
        factory = protocol.Factory.forProtocol(_Served)
        factory.takeover, factory.then = self, then
        factory.noisy = False
        reactor.adoptStreamConnection(self.sock.fileno(), socket.AF_UNIX, factory)
        self.sock.close()


class _Served(LineReceiver):
    delimiter = b"\n"
    confirmed = False

    def connectionMade(self):
        self.sendLine(b"serving")

    def lineReceived(self, line):
        if line == b"bye" and not self.confirmed:
            self.confirmed = True
            log.info("pid {pid} handed over and stops", pid=self.factory.takeover.old_pid)
            if self.factory.then is not None:
                self.factory.then()

    def connectionLost(self, reason):
        if not self.confirmed:
            log.warn("pid {pid} closed the handover connection without confirming; it "
                     "may still be running", pid=self.factory.takeover.old_pid)

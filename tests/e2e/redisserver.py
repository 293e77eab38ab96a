"""A real redis-server for the cluster tests, on a loopback port of their own: no
persistence, so a restart comes back empty (the case the reconciliation rule must
survive). stop/kill/start again on the same port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, port: int, password: str | None = None, tls: tuple | None = None):
        self.port = port
        self.password = password
        self.tls = tls                   # (cert file, key file): TLS only, on `port`
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                         str(self.tls[0]), "--tls-key-file", str(self.tls[1]),
                         "--tls-auth-clients", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    stop = kill

    def command(self, *args: str) -> bytes:
        """One command, RESP by hand (the tests need no client library)."""
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        with socket.create_connection(("127.0.0.1", self.port), 2) as s:
            if self.password:
                pw = self.password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                s.recv(100)
            s.sendall(out)
            time.sleep(0.05)
            return s.recv(1 << 20)

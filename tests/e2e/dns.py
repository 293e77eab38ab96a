"""A small DNS server for the tests, on a loopback UDP port: twisted.names serving
records from a JSON file that it reads again at every query, so a test changes the
answers by rewriting the file (`TestDNS.set`).

    {"ttl": 1, "fail": null,             # or "servfail", "nxdomain", "drop" (no answer)
     "srv": {"_http._tcp.app.test": [[priority, weight, port, "target.test"], ...]},
     "a": {"target.test": ["127.0.0.1"]}, "aaaa": {"target.test": ["::1"]}}

SRV answers carry their targets' A/AAAA records in the additional section when the
file has them (as Consul does); a name not in the file is NXDOMAIN.

`python dns.py RECORDS.json [PORT]` prints its port, then serves until killed. `AddressEcho`
is twistproxy's echo backend on a given loopback address (127.0.0.2, ::1...), for
A/AAAA farms whose members share one port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class TestDNS:
    """The DNS server subprocess and its records file; `port` given: a server that
    was stopped comes back where it was."""

    __test__ = False

    def __init__(self, tmp: Path, records: dict | None = None, port: int = 0):
        self.path = tmp / "dns-records.json"
        self.set(records or {})
        self.proc = subprocess.Popen([sys.executable, str(HERE / "dns.py"), str(self.path),
                                      str(port)],
                                     stdout=subprocess.PIPE, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the test DNS server could not start (exit "
                               f"{self.proc.returncode})")
        self.port = int(line)
        self.address = f"127.0.0.1:{self.port}"

    def set(self, records: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self.path)           # the server never reads half a file

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    kill = stop


class AddressEcho:
    """`twistproxy.echo` listening on `address` (any loopback address) and `port`."""

    def __init__(self, name: str, address: str, port: int):
        code = ("import sys; from twisted.internet import reactor; "
                "from twistproxy.echo import EchoFactory; "
                "p = reactor.listenTCP(int(sys.argv[3]), EchoFactory(sys.argv[1]), "
                "interface=sys.argv[2]); print(p.getHost().port, flush=True); reactor.run()")
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", code, name, address, str(port)],
                                     stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"echo on {address}:{port} could not start")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    kill = stop


# -- the server --------------------------------------------------------------------------

def _serve(path: str, port: int = 0) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    class FileResolver(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout=None):
            try:
                records = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                return defer.fail(error.DNSServerError())
            fail = records.get("fail")
            if fail == "drop":
                return defer.Deferred()          # never answered: the client times out
            if fail == "servfail":             # not a DomainError: SERVFAIL
                return defer.fail(RuntimeError("servfail asked for"))
            if fail == "nxdomain":
                return defer.fail(error.DomainError())
            key = (name.decode() if isinstance(name, bytes) else str(name)).rstrip(".").lower()
            ttl = records.get("ttl", 1)
            known = any(key in records.get(k, {}) for k in ("srv", "a", "aaaa"))
            if not known:
                return defer.fail(error.DomainError())

            def addresses(target):
                out = []
                for a in records.get("a", {}).get(target, []):
                    out.append(dns.RRHeader(target, dns.A, dns.IN, ttl,
                                            dns.Record_A(a, ttl), auth=True))
                for a in records.get("aaaa", {}).get(target, []):
                    out.append(dns.RRHeader(target, dns.AAAA, dns.IN, ttl,
                                            dns.Record_AAAA(a, ttl), auth=True))
                return out

            answers, additional = [], []
            if type == dns.SRV:
                for prio, weight, port, target in records.get("srv", {}).get(key, []):
                    answers.append(dns.RRHeader(key, dns.SRV, dns.IN, ttl,
                                                dns.Record_SRV(prio, weight, port, target, ttl),
                                                auth=True))
                    additional += addresses(target)
            elif type in (dns.A, dns.AAAA):
                answers = [rr for rr in addresses(key) if rr.type == type]
            return defer.succeed((answers, [], additional))

    factory = server.DNSServerFactory(authorities=[FileResolver()])
    factory.noisy = False
    proto = dns.DNSDatagramProtocol(factory)
    proto.noisy = False
    port = reactor.listenUDP(port, proto, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)

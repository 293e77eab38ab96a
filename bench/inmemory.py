"""The proxy's own Python cost per request, without sockets: `python -m bench.inmemory`.

Drives N keep-alive GETs through the real ClientConnection, ProxyContext and
BackendConnection over in-memory transports (one backend connection, answered at
once), for a single backend and for a balancer of two. Prints CPU microseconds per
request (best of --repeat runs). Under `valgrind --tool=callgrind` the instruction
count is exact whatever else the machine does, which is how a change's cost is
compared with its parent's (see the README's benchmark section).
"""

from __future__ import annotations

import argparse
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistproxy.config import loads
from twistproxy.proxy import ProxyContext
from twistproxy.wire.client import ClientFactory

_HEAD = """
[server]
access_log = ""
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
"""
SINGLE = _HEAD + '  url = "http://10.9.9.9:8081/"\n'
BALANCER = _HEAD + '''  url = "balancer://farm/"
[balancer.farm]
  [[balancer.farm.member]]
  url = "http://10.9.9.1:8081/"
  [[balancer.farm.member]]
  url = "http://10.9.9.2:8081/"
'''
REQUEST = (b"GET /index.html HTTP/1.1\r\nHost: proxy.test\r\nUser-Agent: bench\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 128\r\n\r\n" + b"x" * 128)


def run(config: str, n: int) -> float:
    """CPU seconds for n proxied requests (after one that opens the connections)."""
    reactor = MemoryReactorClock()
    ctx = ProxyContext(loads(config), reactor, access_log=None)
    factory = ClientFactory(ctx, "127.0.0.1:8080")
    client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    ct = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                         hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    client.makeConnection(ct)
    backends: dict = {}

    def one():
        client.dataReceived(REQUEST)
        while len(reactor.tcpClients) > len(backends):     # a connect to complete
            host, port, f, _, _ = reactor.tcpClients[len(backends)]
            proto = f.buildProtocol(IPv4Address("TCP", host, port))
            t = StringTransport()
            proto.makeConnection(t)
            backends[len(backends)] = (proto, t)
        for proto, t in backends.values():
            if t.value():
                t.clear()
                proto.dataReceived(RESPONSE)
        ct.clear()

    for _ in range(4):                                     # every member connected
        one()
    start = time.process_time()
    for _ in range(n):
        one()
    return time.process_time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inmemory")
    p.add_argument("-n", type=int, default=20000, help="requests per run")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is shown")
    p.add_argument("--which", default="single,balancer")
    a = p.parse_args(argv)
    for name in a.which.split(","):
        config = {"single": SINGLE, "balancer": BALANCER}[name]
        best = min(run(config, a.n) for _ in range(a.repeat))
        print(f"{name:9} {best / a.n * 1e6:6.2f} us/request (best of {a.repeat} x {a.n})")


if __name__ == "__main__":
    main()

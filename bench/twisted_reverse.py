"""The Twisted baseline: twisted.web.proxy.ReverseProxyResource as documented.

`python -m bench.twisted_reverse PORT BACKEND_PORT ACCESS_LOG` serves 127.0.0.1:PORT,
relaying every path to 127.0.0.1:BACKEND_PORT, with twisted.web's combined access log.
"""

import sys

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


def main() -> None:
    port, backend, log_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    site = Site(ReverseProxyResource("127.0.0.1", backend, b""), logPath=log_path)
    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()

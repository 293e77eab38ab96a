"""proxy.py's reverse proxy, relaying every path to 127.0.0.1:$BENCH_BACKEND_PORT.

Loaded by `proxy --enable-reverse-proxy --plugins bench.proxypy_plugin.Reverse`. A
dynamic route keeps the request's path (a static route would replace it).
"""

import os

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

UPSTREAM = f"http://127.0.0.1:{os.environ.get('BENCH_BACKEND_PORT', '8081')}".encode()


class Reverse(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/.*$"]

    def handle_route(self, request, pattern):
        url = Url.from_bytes(UPSTREAM)
        url.remainder = request.path
        return url

"""twistd plugins: the service, `twistd -n twistproxy --config FILE` (it lives in
twistproxy.tap), and the proxy's epoll reactor, `twistd --reactor=twistproxy ...`."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

twistproxy = ServiceMaker(
    "twistproxy",
    "twistproxy.tap",
    "An edge proxy: per-IP listeners, virtual hosts, mod_proxy-style reverse proxying",
    "twistproxy",
)

twistproxy_reactor = Reactor(
    "twistproxy",
    "twistproxy.reactor",
    "epoll, dispatching events without a log context each (Linux; twistproxy's default)",
)

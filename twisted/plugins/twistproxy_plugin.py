"""twistd plugin: `twistd -n twistproxy --config FILE` (the service lives in twistproxy.tap)."""

from twisted.application.service import ServiceMaker

twistproxy = ServiceMaker(
    "twistproxy",
    "twistproxy.tap",
    "An edge proxy: per-IP listeners, virtual hosts, mod_proxy-style reverse proxying",
    "twistproxy",
)

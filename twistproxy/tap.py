"""twistd entry point: `twistd -n twistproxy --config FILE` builds the same service as
`twistproxy run FILE`. Errors are one line on stderr and an exit status, no traceback.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from .config import ConfigError, load
from .service import StartupError, build_service


class Options(usage.Options):
    synopsis = "--config FILE [--takeover]"
    longdesc = "Run twistproxy, an edge proxy, with the given TOML configuration."
    optParameters = [["config", "c", None, "The TOML configuration file (required)."]]
    optFlags = [["takeover", None, "Take the listening sockets over from the process on "
                 "[server] handover_socket, which then stops."]]

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def makeService(options):
    try:
        config = load(options["config"])
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2)
    try:
        return build_service(config, takeover=bool(options["takeover"]))
    except ConfigError as e:            # a certificate, key or CA file
        print(e, file=sys.stderr)
        raise SystemExit(2)
    except StartupError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1)

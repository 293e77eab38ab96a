"""`twistproxy import-apache` and `twistproxy run --apache`: read, map, write, report.

Owns the command's contract: the TOML on standard output (or -o), one report line per
directive not carried over on standard error, then a summary line; exit status 0 when
the result serves the same proxied traffic, 1 when something proxied could not be
carried over, 2 when the input is not a valid Apache configuration (file:line: why).
The result is loaded with twistproxy's own loader before it is written, so what is
written is always a configuration `twistproxy check` accepts (its files aside).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from .. import __version__
from ..config import Config, ConfigError, loads
from .mapping import Imported, ImportError_, InvalidAt, import_parsed
from .parser import ApacheConfigError, parse
from .tomlout import dumps


class Failed(Exception):
    def __init__(self, line: str, status: int):
        super().__init__(line)
        self.status = status


def convert(path: str, server_root: str | None = None, defines=(),
            shown_as: str = "<import>") -> tuple[str, Imported, Config]:
    """(TOML text, the import with its report, the loaded Config) or Failed."""
    try:
        parsed = parse(path, server_root=server_root, defines=list(defines))
    except ApacheConfigError as e:
        raise Failed(str(e), 2) from None
    try:
        imported = import_parsed(parsed)
    except ImportError_ as e:
        raise Failed(f"{path}: {e}", 1) from None
    except InvalidAt as e:              # a value Apache itself refuses
        raise Failed(str(e), 2) from None
    header = (f"Imported from {parsed.files[0]} (ServerRoot {parsed.server_root}) by "
              f"twistproxy {__version__} import-apache, "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n"
              "Each section names the Apache lines it came from; what was not carried "
              "over\nwas reported when this was written (twistproxy import-apache "
              "prints it again).")
    text = dumps(imported.doc, header)
    try:
        config = loads(text, shown_as)
    except ConfigError as e:
        raise Failed(f"{path}: the imported configuration does not load ({e}); please "
                     "report this with the Apache lines it names", 1) from None
    return text, imported, config


def summary(config: Config, imported: Imported) -> str:
    routes = sum(len(v.routes) for v in config.vhosts)
    proxied = sum(1 for r in imported.reports if r.proxied)
    return (f"imported {len(config.listeners)} listener(s), {len(config.vhosts)} vhost(s), "
            f"{routes} route(s), {len(config.balancers)} balancer(s); "
            f"{len(imported.reports)} directive(s) not carried over as they are, "
            f"{proxied} of them changing proxied traffic")


def cmd_import_apache(args) -> int:
    try:
        text, imported, config = convert(args.file, args.server_root, args.define or (),
                                         args.output or "<import>")
    except Failed as e:
        print(e, file=sys.stderr)
        return e.status
    for report in imported.reports:
        print(report.line(), file=sys.stderr)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            print(f"-o {args.output}: cannot be written: {e.strerror or e}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    print(summary(config, imported), file=sys.stderr)
    return imported.status


def add_parser(sub) -> None:
    p = sub.add_parser("import-apache", help="turn an Apache httpd configuration "
                       "(and everything it includes) into a twistproxy one")
    p.add_argument("file", help="the main Apache file (httpd.conf, apache2.conf)")
    p.add_argument("-d", dest="server_root", metavar="SERVERROOT",
                   help="Apache's ServerRoot, as apache2 -d (default: the file's folder)")
    p.add_argument("-D", dest="define", action="append", metavar="NAME",
                   help="define NAME for <IfDefine>, as apache2 -D (repeatable)")
    p.add_argument("-o", dest="output", metavar="OUT.toml",
                   help="write the configuration there (default: standard output)")
    p.set_defaults(func=cmd_import_apache, reactor=False)

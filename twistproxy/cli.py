"""The `twistproxy` command: run, reload, check, demo, dev-certs, service,
import-apache, --version.

`run` builds the same service as the twistd plugin; `reload` signals a running master
(SIGHUP) to read its file again; `check` validates a file and
prints a one-line summary; `demo` starts built-in backends and a proxy in front;
`dev-certs` writes throwaway certificates for trying TLS (twistproxy/devcerts.py);
`service` installs and controls the Windows service (twistproxy/windows/servicecli.py).
Errors are one line on stderr: exit status 2 for configuration, 1 for start-up.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import ConfigError, load


def _start_logging(level: str = "info", to=None) -> None:
    """Log to `to` (an open text file, server.error_log's) or standard error."""
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)
    from .balancer.dnsnoise import quiet_dns_ports
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(textFileLogObserver(to or sys.stderr),
                                    [quiet_dns_ports, predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def open_error_log(config):
    """server.error_log opened for appending (line-buffered), or None for standard
    error; StartupError when it cannot be opened."""
    from .service import StartupError
    path = config.server.error_log
    if not path:
        return None
    try:
        return open(path, "a", encoding="utf-8", buffering=1)
    except OSError as e:
        raise StartupError(f"{config.path}: server.error_log: {path!r} cannot be opened: "
                           f"{e.strerror or e}") from None


def _run_service(service, reactor) -> None:
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def cmd_check(args) -> int:
    from .tls import check_files
    from .windows import WINDOWS
    from .windows.binding import iis_warnings
    try:
        config = load(args.file)
        check_files(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(config.summary())
    for line in iis_warnings(config.listeners, WINDOWS):
        print(f"{config.path}: {line}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from .listeners import BindError
    from .service import StartupError, build_service
    config = _run_config(args)
    if isinstance(config, int):
        return config
    error_log = None
    try:
        error_log = open_error_log(config)
        service = build_service(config, takeover=args.takeover)
    except (ConfigError, StartupError) as e:   # a certificate, key or CA file; a bind
        print(e, file=sys.stderr)
        if error_log is not None:
            error_log.close()
        return 2 if isinstance(e, ConfigError) else 1
    if hasattr(service, "log_level"):      # a master: its workers log at this level
        service.log_level = args.log_level
        service.reactor_name = args.reactor   # ... and run this reactor
    if args.pidfile:
        try:
            _write_pidfile(args.pidfile)
        except OSError as e:
            print(f"--pidfile: {args.pidfile!r} cannot be written: {e.strerror or e}",
                  file=sys.stderr)
            return 1
    _start_logging(args.log_level, error_log)
    try:
        _run_service(service, service.reactor)
    except BindError as e:       # a reactor that binds again lost a race for a port
        print(e, file=sys.stderr)
        return 1
    finally:
        if args.pidfile:
            _remove_pidfile(args.pidfile)
    return 0


def _run_config(args):
    """The Config `run` serves: the file's, or one imported from Apache's (--apache,
    its report on stderr first); an exit status when there is none."""
    if bool(args.file) == bool(args.apache):
        print("twistproxy run: give a TOML file or --apache FILE (one of them)",
              file=sys.stderr)
        return 2
    if args.apache:
        from .apache.command import Failed, convert
        try:
            _, imported, config = convert(args.apache, args.server_root, args.define or (),
                                          f"{args.apache} (imported)")
        except Failed as e:
            print(e, file=sys.stderr)
            return 2
        for report in imported.reports:
            print(report.line(), file=sys.stderr)
        return config
    try:
        return load(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2


def _write_pidfile(path: str) -> None:
    import os
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def _remove_pidfile(path: str) -> None:
    import os
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return                    # a newer process's (a take-over)
        os.unlink(path)
    except OSError:
        pass


def cmd_reload(args) -> int:
    """Send SIGHUP to the master named by the pid file: it reads its file again."""
    import os
    import signal
    if not hasattr(signal, "SIGHUP"):        # Windows: one process, no reload signal
        print("twistproxy reload: there is no reload on Windows (no SIGHUP, one "
              "process): restart it (`twistproxy service stop` then `service start`, "
              "or Restart-Service twistproxy)", file=sys.stderr)
        return 2
    try:
        with open(args.pidfile) as f:
            text = f.read().strip()
    except OSError as e:
        print(f"{args.pidfile}: cannot be read: {e.strerror or e}", file=sys.stderr)
        return 1
    if not text.isdigit():
        print(f"{args.pidfile}: {text[:40]!r} is not a process id", file=sys.stderr)
        return 1
    try:
        os.kill(int(text), signal.SIGHUP)
    except ProcessLookupError:
        print(f"{args.pidfile}: no process {text} (twistproxy is not running)",
              file=sys.stderr)
        return 1
    except PermissionError:
        print(f"{args.pidfile}: process {text} may not be signalled by this user",
              file=sys.stderr)
        return 1
    print(f"sent SIGHUP to twistproxy (pid {text}): it reloads its configuration; "
          "its log says whether the new one serves")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.listen, args.log_level, _start_logging, _run_service)


def cmd_dev_certs(args) -> int:
    from .devcerts import run_dev_certs
    return run_dev_certs(args.dir, args.names, args.force)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="twistproxy",
        description="An edge proxy on Twisted: per-IP listeners, virtual hosts, "
                    "mod_proxy-style reverse proxying.")
    parser.add_argument("--version", action="version", version=f"twistproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run the proxy in the foreground")
    p.add_argument("file", nargs="?", help="the TOML configuration file")
    p.add_argument("--apache", metavar="HTTPD_CONF",
                   help="instead of a TOML file: import this Apache configuration in "
                        "memory and run it (twistproxy import-apache writes it out)")
    p.add_argument("-d", dest="server_root", metavar="SERVERROOT",
                   help="with --apache: Apache's ServerRoot (as apache2 -d)")
    p.add_argument("-D", dest="define", action="append", metavar="NAME",
                   help="with --apache: define NAME for <IfDefine> (as apache2 -D)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    p.add_argument("--pidfile", help="write the master's process id here (for reload)")
    p.add_argument("--takeover", action="store_true",
                   help="take the listening sockets over from the process on the file's "
                        "[server] handover_socket, which then stops (no port is closed)")
    p.add_argument("--reactor", default="auto", metavar="NAME",
                   help="the Twisted reactor: auto (twistproxy's epoll reactor on Linux, "
                        "Twisted's default elsewhere, select on Windows), or a name from "
                        "`twistd --help-reactors` (select, poll, epoll, iocp, twistproxy)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("reload", help="make a running twistproxy read its configuration "
                       "again (SIGHUP to the master): new workers start with it, the old "
                       "ones finish what they have in flight")
    p.add_argument("--pidfile", required=True, help="the pid file of the running master "
                   "(twistproxy run --pidfile, or twistd's)")
    p.set_defaults(func=cmd_reload, reactor=False)
    p = sub.add_parser("check", help="validate a configuration file and summarise it")
    p.add_argument("file", help="the TOML configuration file")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("demo", help="start built-in backends and a proxy in front of them")
    p.add_argument("--listen", default="127.0.0.1:8080",
                   help="address:port of the demo proxy (default 127.0.0.1:8080)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("dev-certs", help="write a throwaway CA and certificates for "
                       "trying TLS locally (etc/examples/tls-edge.toml: etc/examples/tls)")
    p.add_argument("dir", help="the folder to write them to (created)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="a certificate for each (NAME, *.NAME, localhost, 127.0.0.1, ::1); "
                        "default: example.com example.org")
    p.add_argument("--force", action="store_true", help="replace files that exist")
    p.set_defaults(func=cmd_dev_certs, reactor=False)
    from .apache.command import add_parser as add_import_parser
    add_import_parser(sub)
    from .windows.servicecli import add_parser as add_service_parser
    add_service_parser(sub)                # Windows only, documented everywhere
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    reactor = getattr(args, "reactor", True)
    if reactor:
        try:
            _install_reactor(reactor if isinstance(reactor, str) else "auto")
        except ValueError as e:
            print(f"--reactor: {e}", file=sys.stderr)
            return 2
    return args.func(args)


def _install_reactor(name: str = "auto") -> None:
    """`auto`: the proxy's epoll reactor where there is epoll and no reactor is
    installed yet (twistproxy/reactor.py), otherwise Twisted's default for the platform
    (select on Windows: README, Windows). Another name: that reactor, or ValueError."""
    if "twisted.internet.reactor" in sys.modules:
        return
    if name != "auto":
        from twisted.application import reactors
        names = sorted(r.shortName for r in reactors.getReactorTypes())
        try:
            reactors.installReactor(name)
        except reactors.NoSuchReactor:
            raise ValueError(f"{name!r} is not a reactor here (known: "
                             f"{', '.join(['auto', *names])})") from None
        except ImportError as e:
            raise ValueError(f"{name!r} cannot be used on this system ({e})") from None
        return
    try:
        from .reactor import install
    except ImportError:          # no epoll (Windows, macOS): Twisted's default
        return
    install()


if __name__ == "__main__":
    sys.exit(main())

"""`twistproxy service install|remove|start|stop|debug`: the Windows service's commands.

Each command is one call (or two) into pywin32's win32serviceutil; what goes wrong is
said in one line on standard error: exit 2 for the configuration (or a system without
Windows services), 1 for the service manager's refusals. `install` checks the
configuration as `twistproxy check` does and stores its absolute path under the
service's name, so one installed service is one configuration (twistproxy/windows/
service.py reads it back when the service manager starts it).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from . import WINDOWS

# Windows error codes the commands put in words (winerror.h)
ERROR_ACCESS_DENIED = 5
ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_CANNOT_ACCEPT_CTRL = 1061
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_MARKED_FOR_DELETE = 1072
ERROR_SERVICE_EXISTS = 1073

ELEVATE = "run it from an elevated prompt (Run as administrator)"


def not_windows_line(platform: str = sys.platform) -> str:
    return (f"twistproxy service: Windows services exist only on Windows (this is "
            f"{platform}): run `twistproxy run FILE`, or under systemd "
            f"etc/systemd/twistproxy.service")


def main(args) -> int:
    try:
        import win32service
        import win32serviceutil
    except ImportError as e:
        if not WINDOWS:
            print(not_windows_line(), file=sys.stderr)
        else:
            print(f"twistproxy service: needs pywin32, which cannot be imported ({e}): "
                  "pip install pywin32", file=sys.stderr)
        return 2
    action = getattr(args, "action", None)
    if action is None:
        args.service_parser.print_help()
        return 2
    commands = {"install": install, "remove": remove, "start": start, "stop": stop,
                "debug": debug}
    try:
        return commands[action](args, win32serviceutil, win32service)
    except win32service.error as e:
        print(f"twistproxy service {action}: {describe(e, args.name, action)}",
              file=sys.stderr)
        return 1
    except win32serviceutil.error as e:    # RuntimeError: pythonservice.exe not found...
        print(f"twistproxy service {action}: {e} (pywin32's service host; reinstalling "
              "pywin32 in this environment puts it back)", file=sys.stderr)
        return 1


def describe(e: Any, name: str, action: str) -> str:
    """A pywin32 error (pywintypes.error: winerror, funcname, strerror) as words."""
    code = getattr(e, "winerror", None)
    if code == ERROR_ACCESS_DENIED:
        return f"access denied to the service manager: {ELEVATE}"
    if code == ERROR_SERVICE_EXISTS:
        return (f"a service named {name!r} exists already: `twistproxy service remove "
                f"--name {name}` comes first (or install under another --name)")
    if code == ERROR_SERVICE_DOES_NOT_EXIST:
        return (f"no service named {name!r} is installed (`twistproxy service install "
                f"--config FILE --name {name}`)")
    if code == ERROR_SERVICE_ALREADY_RUNNING:
        return f"service {name!r} is running already"
    if code == ERROR_SERVICE_NOT_ACTIVE:
        return f"service {name!r} is not running"
    if code == ERROR_SERVICE_CANNOT_ACCEPT_CTRL:
        return f"service {name!r} cannot take a stop now (it is starting or stopping)"
    if code == ERROR_SERVICE_MARKED_FOR_DELETE:
        return (f"service {name!r} is marked for deletion: it goes once it has stopped "
                "and no program (services.msc) holds it open")
    strerror = getattr(e, "strerror", None) or str(e)
    funcname = getattr(e, "funcname", None)
    return f"{strerror.rstrip('.')} ({funcname}, error {code})" if funcname else strerror


def _check_config(path: str) -> tuple[str, str] | None:
    """(absolute path, summary), or None after one line on standard error: what
    `twistproxy check` says, and refusing what a service cannot do."""
    from ..config import ConfigError, load
    from ..tls import check_files
    path = os.path.abspath(path)
    try:
        config = load(path)
        check_files(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None
    if config.server.access_log == "-":
        print(f"{config.path}: server.access_log: '-' (standard output) cannot be used by "
              f"a Windows service, which has no console: name a file, or \"\" for no "
              f"access log", file=sys.stderr)
        return None
    return path, config.summary()


def install(args, win32serviceutil, win32service) -> int:
    from .service import CLASS_STRING, CONFIG_OPTION, TwistproxyService, display_name
    checked = _check_config(args.config)
    if checked is None:
        return 2
    path, summary = checked
    start_type = win32service.SERVICE_AUTO_START if args.startup == "auto" else \
        win32service.SERVICE_DEMAND_START
    win32serviceutil.InstallService(
        CLASS_STRING, args.name, display_name(args.name), startType=start_type,
        description=TwistproxyService._svc_description_)
    try:
        win32serviceutil.SetServiceCustomOption(args.name, CONFIG_OPTION, path)
    except win32service.error:
        try:
            win32serviceutil.RemoveService(args.name)    # no service without its file
        except win32service.error:
            pass
        raise
    print(f"installed service {args.name!r} ({args.startup} start): config {path} "
          f"({summary}); `twistproxy service start --name {args.name}` starts it")
    return 0


def remove(args, win32serviceutil, win32service) -> int:
    win32serviceutil.RemoveService(args.name)
    print(f"removed service {args.name!r}")
    return 0


def _wait_for(win32serviceutil, win32service, name: str, seconds: float,
              goal: int) -> int:
    """The state once it is `goal` or STOPPED, or the last one seen after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        state = win32serviceutil.QueryServiceStatus(name)[1]
        if state in (goal, win32service.SERVICE_STOPPED) or time.monotonic() >= deadline:
            return state
        time.sleep(0.25)


def start(args, win32serviceutil, win32service) -> int:
    win32serviceutil.StartService(args.name)
    state = _wait_for(win32serviceutil, win32service, args.name, args.wait,
                      win32service.SERVICE_RUNNING)
    if state == win32service.SERVICE_RUNNING:
        print(f"service {args.name!r} is running")
        return 0
    if state == win32service.SERVICE_STOPPED:
        print(f"twistproxy service start: service {args.name!r} stopped while starting: "
              f"the Windows Event Log (Application, source {args.name}) says why",
              file=sys.stderr)
    else:
        print(f"twistproxy service start: service {args.name!r} is still starting after "
              f"{args.wait:g}s", file=sys.stderr)
    return 1


def stop(args, win32serviceutil, win32service) -> int:
    win32serviceutil.StopService(args.name)
    state = _wait_for(win32serviceutil, win32service, args.name, args.wait,
                      win32service.SERVICE_STOPPED)
    if state == win32service.SERVICE_STOPPED:
        print(f"service {args.name!r} has stopped")
        return 0
    print(f"twistproxy service stop: service {args.name!r} is still stopping after "
          f"{args.wait:g}s (in-flight requests get server.graceful_timeout)",
          file=sys.stderr)
    return 1


def debug(args, win32serviceutil, win32service) -> int:
    """The service in this console, as the service manager would run it (pywin32's
    DebugService: no statuses, Ctrl+C is the stop)."""
    from .runner import ServiceStartFailed
    from .service import CONFIG_OPTION, TwistproxyService
    config = args.config
    if not config:
        # the service must exist first: reading its option creates its registry key
        win32serviceutil.QueryServiceStatus(args.name)      # or 1060, in words
        config = win32serviceutil.GetServiceCustomOption(args.name, CONFIG_OPTION)
        if not config:
            print(f"twistproxy service debug: no --config, and no service named "
                  f"{args.name!r} has one stored", file=sys.stderr)
            return 2
    try:
        win32serviceutil.DebugService(TwistproxyService, [args.name, os.path.abspath(config)])
    except ServiceStartFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    """`twistproxy service ...` in cli.py's argparse (documented on every system)."""
    p = sub.add_parser(
        "service", help="install and control twistproxy as a Windows service",
        description="twistproxy as a Windows service (pywin32). Windows only: elsewhere "
                    "run `twistproxy run FILE` (or under systemd).")
    p.set_defaults(func=main, reactor=False, action=None, name="twistproxy",
                   service_parser=p)
    acts = p.add_subparsers(dest="action", metavar="ACTION")

    def named(q) -> None:
        q.add_argument("--name", default="twistproxy",
                       help="the service's name (default twistproxy); several names "
                            "run several configurations")

    q = acts.add_parser("install", help="install the service for a configuration file "
                        "(checked first; its absolute path is stored)")
    q.add_argument("--config", required=True, help="the TOML configuration file")
    named(q)
    q.add_argument("--startup", default="auto", choices=("auto", "manual"),
                   help="start with Windows (auto, the default) or when asked (manual)")
    q = acts.add_parser("remove", help="remove the installed service")
    named(q)
    for verb, goal, default in (("start", "running", 30.0), ("stop", "stopped", 60.0)):
        q = acts.add_parser(verb, help=f"{verb} the installed service and wait until it "
                            f"is {goal}")
        named(q)
        q.add_argument("--wait", type=float, default=default, metavar="SECONDS",
                       help=f"how long to wait (default {default:g})")
    q = acts.add_parser("debug", help="run the service in this console as the service "
                        "manager would (Ctrl+C stops it)")
    q.add_argument("--config", help="the configuration file (default: the one the "
                   "installed service has)")
    named(q)

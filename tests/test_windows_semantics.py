"""What twistproxy does differently on Windows, run on Linux by selecting it.

Each Windows choice that is plain Python takes `windows=` (twistproxy/windows): the
socket options a listener gets, the words for a refused bind, `check`'s warning about
IIS, how a configuration's paths and process keys are read. The listener path without
socket adoption (IOCP's) runs for real here on Twisted's select reactor.
"""

from __future__ import annotations

import errno
import socket

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor

from twistproxy import config
from twistproxy.config import ConfigError, ListenConfig
from twistproxy.listeners import BindError, BoundSocket, bind_one, listen_on
from twistproxy.windows.binding import (SO_EXCLUSIVEADDRUSE, WSAEACCES, WSAEADDRINUSE,
                                        WSAEADDRNOTAVAIL, bind_reason, iis_warnings,
                                        listen_options)

from test_config import doc

WIN_CONF = r"C:\twistproxy\proxy.toml"


def winsock_error(code: int) -> OSError:
    """An OSError as Python on Windows raises it for a Winsock failure."""
    e = OSError(code, "(Windows's own text)")
    e.winerror = code
    return e


# -- the options a listening socket gets -------------------------------------

def test_windows_listener_is_exclusive_never_reuseaddr():
    # on Windows SO_REUSEADDR would let another socket bind the listening port and
    # take some of its connections: a listener is exclusive there instead
    options = listen_options(windows=True)
    assert options == [(socket.SOL_SOCKET, SO_EXCLUSIVEADDRUSE, 1)]
    assert SO_EXCLUSIVEADDRUSE == -5                      # ~SO_REUSEADDR in winsock2.h
    assert all(opt != socket.SO_REUSEADDR for _, opt, _ in options)


def test_posix_listener_reuses_the_address_past_time_wait():
    assert listen_options(windows=False) == [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]


def test_star_is_dual_stack_on_both_systems():
    # Windows's IPv6 sockets are IPv6-only unless told: "*" must say so
    for windows in (True, False):
        assert (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0) in \
            listen_options(windows, dual_stack=True)


# -- a refused bind, in Windows's words --------------------------------------

def test_port_80_in_use_names_http_sys_and_how_to_narrow_it():
    reason = bind_reason(winsock_error(WSAEADDRINUSE), 80, windows=True)
    assert reason.startswith("address already in use (WSAEADDRINUSE 10048)")
    assert "http.sys" in reason and "IIS" in reason
    assert "`netsh http show iplisten`" in reason
    assert "`netsh http add iplisten ipaddress=<the IIS address>`" in reason
    assert "netstat -ano" in reason and '":80 "' in reason
    assert "\n" not in reason


def test_port_443_access_denied_names_exclusive_use_reserved_ports_and_http_sys():
    reason = bind_reason(winsock_error(WSAEACCES), 443, windows=True)
    assert reason.startswith("access denied (WSAEACCES 10013)")
    assert "excludedportrange" in reason
    assert "`netsh http show iplisten`" in reason and '":443 "' in reason


def test_another_port_in_use_points_at_the_process_not_at_iis_setup():
    reason = bind_reason(winsock_error(WSAEADDRINUSE), 8080, windows=True)
    assert "netstat -ano" in reason and '":8080 "' in reason
    assert "netsh http add iplisten" not in reason


def test_address_not_on_this_machine_on_windows():
    reason = bind_reason(winsock_error(WSAEADDRNOTAVAIL), 80, windows=True)
    assert reason.startswith("address not available (WSAEADDRNOTAVAIL 10049)")
    assert "ipconfig" in reason


def test_windows_error_seen_only_as_errno_is_worded_too():
    # Python fills errno with the Winsock number; winerror may be absent
    assert "WSAEADDRINUSE" in bind_reason(OSError(WSAEADDRINUSE, "x"), 80, windows=True)


def test_posix_wording_is_unchanged():
    assert bind_reason(OSError(errno.EADDRINUSE, "x"), 80, windows=False) == \
        "address already in use (another process owns it)"
    assert bind_reason(OSError(errno.EACCES, "x"), 80, windows=False) == \
        "permission denied (ports below 1024 need privileges)"


# -- twistproxy check: a wildcard on IIS's ports ------------------------------

def test_check_warns_of_a_wildcard_on_iis_ports_on_windows_only():
    listeners = [ListenConfig("*", 80), ListenConfig("0.0.0.0", 443), ListenConfig("::", 80),
                 ListenConfig("10.0.0.5", 80), ListenConfig("*", 8080)]
    warnings = iis_warnings(listeners, windows=True)
    assert len(warnings) == 3
    assert warnings[0].startswith("warning: listen[0] (*:80) binds every address on port 80")
    assert "netsh http add iplisten" in warnings[0]
    assert "listen[1] (0.0.0.0:443)" in warnings[1] and "listen[2] ([::]:80)" in warnings[2]
    assert iis_warnings(listeners, windows=False) == []


# -- the listener path of a reactor without socket adoption -------------------

class _Quiet(Protocol):
    pass


def _listen(address: str, port: int = 0) -> BoundSocket:
    return bind_one(ListenConfig(address, port), windows=False)


def test_without_adoption_the_reactor_binds_the_same_address_again(monkeypatch):
    # a sentinel option stands for the platform's (SO_EXCLUSIVEADDRUSE on Windows,
    # which Linux lacks): the reactor's port must set what listen_options says
    import twistproxy.listeners as listeners
    sentinel = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    monkeypatch.setattr(listeners, "listen_options", lambda windows, dual_stack: sentinel)
    reactor = SelectReactor()
    bound = _listen("127.0.0.1")
    address = bound.sock.getsockname()
    port = listen_on(reactor, bound, Factory.forProtocol(_Quiet), adopt=False)
    try:
        assert bound.sock.fileno() == -1                   # ours is closed
        assert port.getHost().port == address[1]
        assert port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        socket.create_connection(address, timeout=2).close()   # it listens
    finally:
        port.stopListening()


class _V6OnlyByDefault(socket.socket):
    """An IPv6 socket as Windows makes it: IPv6 only until told otherwise."""

    def __init__(self, family=-1, *args, **kw):
        super().__init__(family, *args, **kw)
        if self.family == socket.AF_INET6:
            self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _ipv6_or_skip():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 here")


def test_star_is_made_dual_stack_where_ipv6_sockets_default_to_v6_only(monkeypatch):
    _ipv6_or_skip()
    monkeypatch.setattr(socket, "socket", _V6OnlyByDefault)
    bound = _listen("*")
    try:
        assert bound.family == socket.AF_INET6
        assert bound.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        bound.sock.close()


def test_without_adoption_star_stays_dual_stack(monkeypatch):
    _ipv6_or_skip()
    from twisted.internet import tcp
    bound = _listen("*")
    create = tcp.Port.createInternetSocket

    def v6_only_by_default(self):
        sock = create(self)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock
    monkeypatch.setattr(tcp.Port, "createInternetSocket", v6_only_by_default)
    port = listen_on(SelectReactor(), bound, Factory.forProtocol(_Quiet), adopt=False)
    try:
        assert port.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        socket.create_connection(("127.0.0.1", port.getHost().port), timeout=2).close()
    finally:
        port.stopListening()


# -- no POSIX-only name where Windows runs ------------------------------------

# names Windows's Python lacks, and where the code may use them: each such use is
# guarded (hasattr/getattr, or try/except AttributeError), or in code Windows never
# runs (the master and workers, the epoll reactor); a new use fails here until it is
POSIX_ONLY = {"MSG_DONTWAIT", "getloadavg", "sched_getaffinity", "sched_yield", "SIGHUP",
              "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGCHLD", "AF_UNIX", "fork", "getuid",
              "setsid", "getpgid", "SCM_RIGHTS", "sendmsg", "recvmsg"}
POSIX_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "posix"}
GUARDED = {("cli.py", "SIGHUP"), ("admin/status.py", "getloadavg"),
           ("config.py", "sched_getaffinity")}
NOT_ON_WINDOWS = ("process/", "reactor.py")


def test_no_unguarded_posix_only_name_where_windows_runs():
    import ast
    from pathlib import Path
    root = Path(__file__).parents[1] / "twistproxy"
    found = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(NOT_ON_WINDOWS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in POSIX_ONLY:
                found.add((rel, node.attr))
            elif isinstance(node, ast.Import):
                found.update((rel, a.name) for a in node.names if a.name in POSIX_MODULES)
            elif isinstance(node, ast.ImportFrom) and node.module in POSIX_MODULES:
                found.add((rel, node.module))
    assert found == GUARDED


def test_a_port_taken_between_the_check_and_the_listen_is_the_same_one_line():
    """The first bind is the check; if another process takes the port in the moment
    before the reactor binds it again, start-up stops with the bind error's words."""
    thief = socket.socket()

    class Racing(socket.socket):
        def close(self):
            address = self.getsockname()
            super().close()
            thief.bind(address)          # another process, just then
            thief.listen()

    sock = Racing(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port_number = sock.getsockname()[1]
    try:
        with pytest.raises(BindError) as info:
            listen_on(SelectReactor(), BoundSocket(ListenConfig("127.0.0.1", port_number),
                                                   sock),
                      Factory.forProtocol(_Quiet), adopt=False)
        assert str(info.value) == (f"cannot listen on 127.0.0.1:{port_number}: address "
                                   "already in use (another process owns it)")
    finally:
        thief.close()


# -- a configuration read as on Windows ---------------------------------------

TLS_LISTEN = ('[[listen]]\naddress = "127.0.0.1"\nport = 8443\n'
              '[listen.tls]\ncert = {cert}\nkey = {key}\n')


def win(text: str):
    return config.loads(text, WIN_CONF, windows=True)


def win_fails(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        win(text)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{WIN_CONF}: "), msg
    return msg


def test_windows_paths_absolute_relative_unc_and_forward_slashes():
    c = win(doc(top="[server]\naccess_log = 'D:\\logs\\access.log'\n"
                    "error_log = 'logs\\twistproxy.log'\n",
                listeners=TLS_LISTEN.format(cert="'certs\\site.pem'",
                                            key="'\\\\fileserver\\keys\\site.key'")))
    assert c.server.access_log == r"D:\logs\access.log"
    assert c.server.error_log == r"C:\twistproxy\logs\twistproxy.log"    # beside the file
    cert = c.listeners[0].tls.certificates[0]
    assert cert.cert == r"C:\twistproxy\certs\site.pem"
    assert cert.key == r"\\fileserver\keys\site.key"
    c = win(doc(top='[server]\naccess_log = "C:/logs/access.log"\n'))
    assert c.server.access_log == r"C:\logs\access.log"


def test_a_windows_path_in_double_quotes_says_how_to_write_it():
    msg = win_fails(doc(top='[server]\naccess_log = "C:\\logs\\access.log"\n'))
    assert "not valid TOML" in msg
    assert "write 'C:\\certs\\site.pem' in single quotes, or use forward slashes" in msg


def test_a_windows_path_whose_backslashes_became_escapes_is_refused_by_name():
    # "C:\new\table.log" is valid TOML: \n and \t are escapes, the path is not the one meant
    msg = win_fails(doc(top='[server]\naccess_log = "C:\\new\\table.log"\n'))
    assert msg.startswith(f"{WIN_CONF}: server.access_log: 'C:\\new\\table.log' has a "
                          "control character in it")
    assert "'single quotes'" in msg


def test_windows_runs_one_process_by_default():
    assert win(doc()).server.master_process is False
    assert config.loads(doc(), "x.toml", windows=False).server.master_process is True


@pytest.mark.parametrize("top, key", [
    ("[server]\nmaster_process = true\n", "server.master_process: true"),
    ("[server]\nworker_processes = 2\n", "server.worker_processes: 2"),
    ("[server]\nhandover_socket = 'handover.sock'\n", "server.handover_socket: 'handover.sock'"),
])
def test_posix_only_process_keys_are_refused_on_windows_with_the_reason(top, key):
    msg = win_fails(doc(top=top))
    assert msg.startswith(f"{WIN_CONF}: {key} is POSIX only")


def test_for_a_reactor_that_binds_again_the_check_socket_takes_no_connection():
    """Between the check bind and the reactor's own, a client must be refused (and
    retry), not queued on a socket about to close, which would reset it."""
    bound = bind_one(ListenConfig("127.0.0.1", 0), windows=False, accept=False)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", bound.port), timeout=2).close()
    finally:
        bound.sock.close()

"""Configuration: a TOML file turned into frozen dataclasses, validated whole.

Owns the schema (key names reuse mod_proxy's), defaults, and every check that can be
made before a socket is bound. Pure: imports nothing from twisted.internet and opens
no file but the one it is asked to read. Every problem is a ConfigError whose text is
one line: ``FILE: key.path: 'value' problem``.
"""

from __future__ import annotations

import difflib
import ipaddress
import ntpath
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from .windows import WINDOWS

__all__ = [
    "ConfigError", "Config", "ServerConfig", "ListenConfig", "VhostConfig",
    "RouteConfig", "HeaderAction", "WorkerParams", "BalancerConfig", "MemberConfig",
    "BackendURL", "AdminConfig", "ClusterConfig", "HANDLERS", "load", "loads", "member_url",
]


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the operator."""


# ---------------------------------------------------------------------------
# the dataclasses


@dataclass(frozen=True)
class BackendURL:
    scheme: str          # http, https, ws, wss or balancer
    host: str            # lower-cased; for balancer:// the balancer's name
    port: int            # explicit or the scheme's default (0 for balancer)
    path: str            # as written, may be "" ; may contain $1..$9 for regex routes
    raw: str

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "wss")

    @property
    def is_balancer(self) -> bool:
        return self.scheme == "balancer"

    @property
    def origin(self) -> str:
        """scheme://host[:port], default port dropped: the worker's name."""
        default = _DEFAULT_PORTS.get(self.scheme)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.is_balancer or self.port == default:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def hostport(self) -> str:
        """What a Host header naming this backend says (port only if not default)."""
        return self.origin.split("://", 1)[1]


@dataclass(frozen=True)
class HeaderAction:
    action: str          # set | add | unset
    name: str
    value: str = ""
    always: bool = False


@dataclass(frozen=True)
class WorkerParams:
    """mod_proxy worker parameters (§2 of the reference). Durations are seconds."""
    max: int | None = None
    smax: int | None = None
    ttl: float | None = None
    acquire: float | None = None
    connectiontimeout: float | None = None
    timeout: float | None = None
    disablereuse: bool = False
    keepalive: bool = False
    retry: float = 60.0
    ping: float = 0.0
    upgrade: str = ""
    verify: bool = True      # https/wss backends: check the certificate and host name
    ca_file: str = ""        # trust these CAs (PEM) instead of the system's
    status: str = ""         # a route's worker: "-I" puts it in error state (see pool.py)
    response_field_size: int = 8192     # longest response status/header line (-> 502)
    response_head_size: int = 65536     # largest whole response head (-> 502)


@dataclass(frozen=True)
class RouteConfig:
    path: str | None = None
    regex: str | None = None
    url: BackendURL | None = None
    exclude: bool = False
    reverse: bool = False
    match_headers: tuple[tuple[str, str], ...] = ()
    cookie_domain: tuple[tuple[str, str], ...] = ()
    cookie_path: tuple[tuple[str, str], ...] = ()
    request_headers: tuple[HeaderAction, ...] = ()
    response_headers: tuple[HeaderAction, ...] = ()
    worker: WorkerParams = WorkerParams()
    where: str = ""      # key path, for log lines ("vhost[0].route[2]")
    handler: str = ""    # served here, not proxied: one of HANDLERS (Apache's SetHandler)


@dataclass(frozen=True)
class VhostConfig:
    server_name: str
    server_alias: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()   # normalised "addr:port" keys; empty: every listener
    preserve_host: bool = False
    add_headers: bool = True
    proxy_via: str = "off"
    proxy_chain_auth: bool = False
    allow_encoded_slashes: str = "off"     # off: %2F in a path is 404; on: it is "/"; nodecode
    proxy_requests: bool = False           # forward proxy + CONNECT (ProxyRequests)
    allow_connect: tuple[tuple[int, int], ...] = ((443, 443), (563, 563))
    connect_allow: tuple[str, ...] = ()    # target host patterns; () = any
    connect_deny: tuple[str, ...] = ()
    proxy_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")   # client networks
    proxy_auth: tuple[tuple[str, str], ...] = ()                 # (("file", ..), ("realm", ..))
    request_headers: tuple[HeaderAction, ...] = ()
    response_headers: tuple[HeaderAction, ...] = ()
    routes: tuple[RouteConfig, ...] = ()


@dataclass(frozen=True)
class CertConfig:
    cert: str            # paths as resolved (relative to the config file's folder)
    key: str
    chain: str = ""
    server_names: tuple[str, ...] = ()     # SNI patterns ("*.example.org"); () = default
    where: str = ""


@dataclass(frozen=True)
class TLSConfig:
    certificates: tuple[CertConfig, ...]   # the first is the default
    min_version: str = "1.2"
    ciphers: str = ""


@dataclass(frozen=True)
class ListenConfig:
    address: str         # as written: one IP, "0.0.0.0", "::" or "*"
    port: int
    tls: TLSConfig | None = None
    redirect_to_https: bool = False

    @property
    def key(self) -> str:
        return listen_key(self.address, self.port)

    @property
    def bind_address(self) -> str:
        return "::" if self.address == "*" else self.address


@dataclass(frozen=True)
class MemberConfig:
    url: BackendURL
    route: str = ""
    loadfactor: float = 1.0
    lbset: int = 0
    status: str = ""     # flags as written, e.g. "+H"
    redirect: str = ""
    worker: WorkerParams = WorkerParams()
    hcmethod: str = "NONE"
    hcuri: str = ""
    hcinterval: float = 30.0
    hcpasses: int = 1
    hcfails: int = 1
    hcexpect: tuple[int, int] = (200, 399)


@dataclass(frozen=True)
class BalancerConfig:
    name: str
    lbmethod: str = "byrequests"
    stickysession: str = ""
    stickysessionsep: str = "."
    scolonpathdelim: bool = False
    nofailover: bool = False
    maxattempts: int | None = None
    timeout: float = 0.0
    failonstatus: tuple[int, ...] = ()
    failontimeout: bool = False
    forcerecovery: bool = True
    sticky_cookie: tuple[tuple[str, str], ...] = ()
    growth: int = 0      # members the manager may add at runtime (Apache's growth=)
    members: tuple[MemberConfig, ...] = ()
    members_from: "DiscoveryConfig | None" = None     # members found by DNS


@dataclass(frozen=True)
class DiscoveryConfig:
    """[balancer.NAME] members_from: where DNS names the members. `srv`: an SRV name
    (each record's target and port; priority -> lbset, weight -> loadfactor); or
    `host` + `port`: every A and AAAA address of the name. `member` is what every
    member found gets (its url replaced by scheme://ADDRESS:PORT)."""
    srv: str = ""
    host: str = ""
    port: int = 0
    scheme: str = "http"
    resolve_every: float = 30.0          # seconds; a shorter record TTL (>= 1 s) wins
    member: MemberConfig | None = None

    @property
    def name(self) -> str:
        return self.srv or self.host

    @property
    def kind(self) -> str:
        return "SRV" if self.srv else "A/AAAA"


@dataclass(frozen=True)
class ServerConfig:
    access_log: str = "-"               # a file, "-" for standard output, "" for none
    error_log: str = ""                 # the service log: a file; "": standard error
    server_tokens: str = "prod"
    timeout: float = 60.0
    keepalive_timeout: float = 5.0
    header_timeout: float = 20.0
    tunnel_timeout: float = 3600.0
    abort_on_close: bool = False        # a client's FIN abandons what awaits the backend
    lingering_time: float = 30.0        # reading after an early answer, at most (nginx)
    lingering_timeout: float = 5.0      # ... and between two reads of it
    limit_request_line: int = 8190
    limit_request_fieldsize: int = 8190
    limit_request_fields: int = 100
    busy_poll: int = 100                # microseconds at most; 0: off (reactor.py)
    worker_processes: int = 1           # "auto" is resolved to the usable CPUs at load
    master_process: bool = not WINDOWS  # false: one process, no reload (nginx's name)
    graceful_timeout: float = 10.0      # seconds in-flight requests get at a stop
    served_by_header: str = ""          # a response header naming the process; "": none
    handover_socket: str = ""           # UNIX socket handing the listeners over; "": off
    resolver: tuple[tuple[str, int], ...] = ()  # DNS servers (members_from); (): resolv.conf


# what a route's `handler` may name: Apache's SetHandler names of the admin pages
HANDLERS = ("balancer-manager", "server-status", "metrics")
LOOPBACK = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class AdminConfig:
    """[admin]: the admin listener (only when `port` is given) and the rules for every
    admin page, on that listener or on a vhost route with a `handler`."""
    address: str = "127.0.0.1"
    port: int | None = None
    allow: tuple[str, ...] = LOOPBACK       # client networks
    auth: tuple[tuple[str, str], ...] = ()  # (("file", PATH), ("realm", NAME))
    tls: TLSConfig | None = None
    server_name: tuple[str, ...] = ()       # DNS names the admin pages may be reached by
    state_file: str = ""                    # Apache's BalancerPersist

    @property
    def listen(self) -> ListenConfig | None:
        """The admin listener as a ListenConfig (bound like the proxy's), if any."""
        return None if self.port is None else ListenConfig(self.address, self.port, self.tls)


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: admin state shared with other hosts through Redis (twistproxy/cluster/).
    `password` comes from the URL or from `password_file` (read at load)."""
    redis_url: str = field(repr=False)
    name: str
    node: str
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str = ""
    share_health: bool = False
    tls: bool = False                       # rediss://
    ca_file: str = ""                       # rediss://: the CAs to trust (default: the system's)
    verify: bool = True                     # rediss://: check the certificate and host name

    @property
    def shown_url(self) -> str:
        """The URL without its password (for logs and pages)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    listeners: tuple[ListenConfig, ...]
    vhosts: tuple[VhostConfig, ...]
    balancers: dict[str, BalancerConfig] = field(default_factory=dict)
    admin: AdminConfig | None = None        # None: no [admin] table (no admin listener)
    cluster: ClusterConfig | None = None    # None: no [cluster] table (one host alone)

    def summary(self) -> str:
        routes = sum(len(v.routes) for v in self.vhosts)
        members = sum(len(b.members) for b in self.balancers.values())
        return (
            f"{self.path}: ok: {len(self.listeners)} listener(s) "
            f"({', '.join(l.key for l in self.listeners)}), {len(self.vhosts)} vhost(s), "
            f"{routes} route(s), {len(self.balancers)} balancer(s) with {members} member(s)"
        ) + (f"; cluster {self.cluster.name} as node {self.cluster.node} "
             f"({self.cluster.shown_url})" if self.cluster is not None else "")


# ---------------------------------------------------------------------------
# loading


def load(path: str, windows: bool = WINDOWS) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return loads(text.decode("utf-8-sig"), path, windows)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def loads(text: str, path: str = "<config>", windows: bool = WINDOWS) -> Config:
    """`windows`: read it as Windows would (its paths, one process); the default is
    the system's."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}{_backslash_hint(text, e)}") from None
    return _Loader(path, windows).config(data)


def _backslash_hint(text: str, e: tomllib.TOMLDecodeError) -> str:
    """A Windows path in a "double-quoted" TOML string is the usual cause of a bad
    escape: say how to write it."""
    at = re.search(r"at line (\d+)", str(e))
    lines = text.splitlines()
    line = lines[int(at.group(1)) - 1] if at and 0 < int(at.group(1)) <= len(lines) else ""
    if "\\" in line and re.search(r"Unescaped|escape|hex value", str(e)):
        return (" (a Windows path? in \"double quotes\" a backslash starts an escape: "
                "write 'C:\\certs\\site.pem' in single quotes, or use forward slashes)")
    return ""


def member_url(value: str, where: str = "b_nwrkr") -> BackendURL:
    """A member URL given at runtime (the manager's b_nwrkr), checked as in the file;
    otherwise ValueError saying what is wrong with it (without the value)."""
    try:
        return _Loader("").backend_url(where, value, {}, balancer_ok=False)
    except ConfigError as e:
        raise ValueError(str(e).removeprefix(f": {where}: {_show(value)} ")) from None


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_PROXY_VIA = ("off", "on", "full", "block")
_ENCODED_SLASHES = ("off", "on", "nodecode")
_SERVER_TOKENS = ("prod", "full", "off")
_LBMETHODS = ("byrequests", "bytraffic", "bybusyness")
_HCMETHODS = ("NONE", "TCP", "OPTIONS", "HEAD", "GET")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")

_WORKER_KEYS = tuple(WorkerParams.__dataclass_fields__)
_HC_KEYS = ("hcmethod", "hcuri", "hcinterval", "hcpasses", "hcfails", "hcexpect")


def listen_key(address: str, port: int) -> str:
    if address == "*":
        return f"*:{port}"
    ip = ipaddress.ip_address(address)
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class _Loader:
    def __init__(self, path: str, windows: bool = WINDOWS):
        self.path = path
        self.windows = windows
        self.paths = ntpath if windows else posixpath    # how file names are read

    # -- error helpers -----------------------------------------------------

    def fail(self, where: str, value: Any, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {_show(value)} {problem}")

    def table(self, where: str, value: Any, allowed: tuple[str, ...],
              required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, value, "must be a table")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else \
                    f" (known keys: {', '.join(allowed)})"
                raise ConfigError(f"{self.path}: {_join(where, key)}: unknown key{tip}")
        for key in required:
            if key not in value:
                raise ConfigError(f"{self.path}: {_join(where, key)}: missing (required)")
        return value

    def array_of_tables(self, where: str, value: Any) -> list:
        if isinstance(value, dict):          # a single [x] where [[x]] was meant
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(where, value, "must be an array of tables ([[...]])")
        return value

    def typed(self, where: str, value: Any, kind: type | tuple, what: str) -> Any:
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise self.fail(where, value, f"must be {what}")
        if not isinstance(value, kind):
            raise self.fail(where, value, f"must be {what}")
        return value

    def boolean(self, where: str, value: Any) -> bool:
        return self.typed(where, value, bool, "true or false")

    def string(self, where: str, value: Any) -> str:
        return self.typed(where, value, str, "a string")

    def integer(self, where: str, value: Any, lo: int, hi: int) -> int:
        self.typed(where, value, int, f"a whole number from {lo} to {hi}")
        if not lo <= value <= hi:
            raise self.fail(where, value, f"must be a whole number from {lo} to {hi}")
        return value

    def number(self, where: str, value: Any, lo: float, hi: float) -> float:
        self.typed(where, value, (int, float), f"a number from {lo:g} to {hi:g}")
        if not lo <= value <= hi:
            raise self.fail(where, value, f"must be a number from {lo:g} to {hi:g}")
        return float(value)

    def duration(self, where: str, value: Any, lo: float = 0.0) -> float:
        """Seconds: a number, or a string with an "s" or "ms" suffix."""
        if isinstance(value, str):
            m = _DURATION.match(value)
            if not m:
                raise self.fail(where, value, "must be seconds (a number, or '500ms', '2s')")
            seconds = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise self.fail(where, value, "must be seconds (a number, or '500ms', '2s')")
        if seconds != seconds:
            raise self.fail(where, value, "must be seconds (a number, or '500ms', '2s')")
        if seconds < lo or seconds > 86400 * 365:
            raise self.fail(where, value, f"must be at least {lo:g} seconds" if seconds < lo
                            else "is longer than a year")
        return seconds

    def choice(self, where: str, value: Any, choices: tuple[str, ...],
               fold: Callable[[str], str] = str.lower) -> str:
        self.string(where, value)
        if fold(value) not in choices:
            raise self.fail(where, value, f"must be one of: {', '.join(choices)}")
        return fold(value)

    def strings(self, where: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, value, "must be a string or a list of strings")
        return tuple(value)

    def networks(self, w: str, value: Any) -> tuple[str, ...]:
        """Client networks: addresses or CIDR networks."""
        nets = self.strings(w, value)
        for i, n in enumerate(nets):
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise self.fail(f"{w}[{i}]", n, "is not an address or network (CIDR)") from None
        return nets

    def regex(self, where: str, value: Any) -> str:
        self.string(where, value)
        try:
            re.compile(value)
        except re.error as e:
            raise self.fail(where, value, f"is not a valid regular expression ({e})") from None
        return value

    # -- the document --------------------------------------------------------

    def config(self, data: dict) -> Config:
        self.table("(top level)", data, ("server", "listen", "vhost", "balancer", "admin",
                                         "cluster"),
                   required=("listen", "vhost"))
        server = self.server(data.get("server", {}))
        listeners = tuple(self.listener(f"listen[{i}]", v)
                          for i, v in enumerate(self.array_of_tables("listen", data["listen"])))
        if not listeners:
            raise self.fail("listen", [], "must name at least one address and port")
        self.check_listeners(listeners)
        raw_bal = data.get("balancer", {})
        raw_bal = self.table("balancer", raw_bal, tuple(raw_bal) if isinstance(raw_bal, dict)
                             else ())
        balancers = {name: self.balancer(f"balancer.{_quote_key(name)}", name, v)
                     for name, v in raw_bal.items()}
        vhosts = tuple(self.vhost(f"vhost[{i}]", v, listeners, balancers)
                       for i, v in enumerate(self.array_of_tables("vhost", data["vhost"])))
        if not vhosts:
            raise self.fail("vhost", [], "must define at least one virtual host")
        for i, l in enumerate(listeners):
            if not any(not v.listen or l.key in v.listen for v in vhosts):
                raise self.fail(f"listen[{i}]", l.key, "is served by no [[vhost]] "
                                "(every vhost's 'listen' leaves it out)")
        admin = self.admin(data["admin"], listeners) if "admin" in data else None
        if self.windows:
            self.windows_process_model(server)
        if not server.master_process and server.worker_processes > 1:
            raise self.fail("server.worker_processes", server.worker_processes,
                            "needs server.master_process = true (the master spawns them)")
        cluster = self.cluster(data["cluster"]) if "cluster" in data else None
        return Config(self.path, server, listeners, vhosts, balancers, admin, cluster)

    def cluster(self, raw: Any) -> ClusterConfig:
        """[cluster]: redis = "redis://[user:password@]host[:port][/db]", name, node,
        password_file, share_health."""
        import socket
        from urllib.parse import unquote, urlsplit
        w = "cluster"
        raw = self.table(w, raw, ("redis", "name", "node", "password_file", "share_health",
                                  "ca_file", "verify"), required=("redis", "name"))
        real = self.string(f"{w}.redis", raw["redis"]).strip()
        url = re.sub(r"//[^@/]*@", "//***@", real)      # errors never show a password
        try:
            parts = urlsplit(real)
            urlsplit(url).port
        except ValueError as e:
            raise self.fail(f"{w}.redis", url, f"is not a Redis URL ({e})") from None
        try:
            port = parts.port
        except ValueError as e:
            raise self.fail(f"{w}.redis", url, f"is not a Redis URL ({e})") from None
        if parts.scheme not in ("redis", "rediss"):
            raise self.fail(f"{w}.redis", url, "must be a redis:// or rediss:// (TLS) URL "
                            "(redis://host[:port][/db])")
        tls = parts.scheme == "rediss"
        for key in ("ca_file", "verify"):
            if key in raw and not tls:
                raise self.fail(f"{w}.{key}", raw[key], "is for a rediss:// (TLS) URL; "
                                "cluster.redis is redis://")
        ca_file = self.file(f"{w}.ca_file", raw["ca_file"]) if "ca_file" in raw else ""
        verify = self.boolean(f"{w}.verify", raw.get("verify", True))
        if not parts.hostname:
            raise self.fail(f"{w}.redis", url, "names no host (redis://host[:port][/db])")
        if parts.query or parts.fragment:
            raise self.fail(f"{w}.redis", url, "has a query or fragment: only "
                            "redis://[user:password@]host[:port][/db] is read")
        db_text = parts.path.lstrip("/")
        if db_text and (not db_text.isdigit() or int(db_text) > 15):
            raise self.fail(f"{w}.redis", url, f"has database {db_text!r}: it must be a "
                            "number from 0 to 15")
        name = self.string(f"{w}.name", raw["name"])
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise self.fail(f"{w}.name", name, "must be 1 to 64 letters, digits, '.', '_' "
                            "or '-' (it prefixes the cluster's Redis keys)")
        node = self.string(f"{w}.node", raw.get("node", socket.gethostname()))
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", node):
            raise self.fail(f"{w}.node", node, "must be 1 to 64 letters, digits, '.', '_' "
                            "or '-' (this host's name in the cluster)")
        password = unquote(parts.password) if parts.password is not None else None
        username = unquote(parts.username) if parts.username else None
        pfile = ""
        if "password_file" in raw:
            pfile = self.file(f"{w}.password_file", raw["password_file"])
            if password is not None:
                raise self.fail(f"{w}.password_file", raw["password_file"], "is given but "
                                "cluster.redis has a password too: keep one")
            try:
                with open(pfile, encoding="utf-8") as f:
                    password = f.read().strip()
            except OSError as e:
                raise self.fail(f"{w}.password_file", raw["password_file"],
                                f"cannot be read ({e.strerror or e})") from None
            if not password:
                raise self.fail(f"{w}.password_file", raw["password_file"], "is empty")
        share = self.boolean(f"{w}.share_health", raw.get("share_health", False))
        if ca_file:
            from .tls import check_ca_file
            check_ca_file(ca_file, f"{w}.ca_file", self.path)
        return ClusterConfig(real, name, node, parts.hostname, port or 6379,
                             int(db_text or 0), username, password, pfile, share, tls,
                             ca_file, verify)

    def admin(self, raw: Any, listeners) -> AdminConfig:
        w = "admin"
        raw = self.table(w, raw, ("address", "port", "allow", "auth", "tls", "server_name",
                                  "state_file"))
        d = AdminConfig()
        address = self.string(f"{w}.address", raw.get("address", d.address)).strip()
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise self.fail(f"{w}.address", address, "is not an IP address (one IPv4 or "
                            "IPv6 address; host names are not resolved)") from None
        port = self.integer(f"{w}.port", raw["port"], 1, 65535) if "port" in raw else None
        if port is not None:
            key = listen_key(address, port)
            for i, l in enumerate(listeners):
                if l.port == port and (l.key == key or _is_wildcard(l.address)
                                       or _is_wildcard(address)) \
                        and _same_family_or_star(l.address, address):
                    raise self.fail(f"{w}.port", port, f"is taken by listen[{i}] ({l.key}): "
                                    "the admin listener never shares a port with proxied "
                                    "traffic (use a route with handler = "
                                    "\"balancer-manager\" for that)")
        allow = self.networks(f"{w}.allow", raw.get("allow", list(d.allow)))
        auth = ()
        if "auth" in raw:
            aw = f"{w}.auth"
            a = self.table(aw, raw["auth"], ("file", "realm"), required=("file",))
            auth = (("file", self.file(f"{aw}.file", a["file"])),
                    ("realm", self.string(f"{aw}.realm", a.get("realm", "twistproxy admin"))))
        tls = None
        if "tls" in raw:
            if port is None:
                raise self.fail(f"{w}.tls", "{...}", "needs admin.port (TLS is for the "
                                "admin listener)")
            tls = self.tls(w, raw["tls"], [])
        names = tuple(self.hostname(f"{w}.server_name[{i}]", n, wildcard=False)
                      for i, n in enumerate(self.strings(f"{w}.server_name",
                                                         raw.get("server_name", []))))
        state = self.file(f"{w}.state_file", raw["state_file"]) if "state_file" in raw else ""
        return AdminConfig(address, port, allow, auth, tls, names, state)

    def server(self, raw: Any) -> ServerConfig:
        w = "server"
        raw = self.table(w, raw, tuple(ServerConfig.__dataclass_fields__))
        d = ServerConfig()
        return ServerConfig(
            access_log=self.log_target(f"{w}.access_log", raw.get("access_log", d.access_log)),
            error_log=self.log_target(f"{w}.error_log", raw.get("error_log", d.error_log),
                                      console_ok=False),
            server_tokens=self.choice(f"{w}.server_tokens",
                                      raw.get("server_tokens", d.server_tokens), _SERVER_TOKENS),
            timeout=self.duration(f"{w}.timeout", raw.get("timeout", d.timeout), lo=0.001),
            keepalive_timeout=self.duration(f"{w}.keepalive_timeout",
                                            raw.get("keepalive_timeout", d.keepalive_timeout)),
            header_timeout=self.duration(f"{w}.header_timeout",
                                         raw.get("header_timeout", d.header_timeout), lo=0.001),
            tunnel_timeout=self.duration(f"{w}.tunnel_timeout",
                                         raw.get("tunnel_timeout", d.tunnel_timeout), lo=0.001),
            abort_on_close=self.boolean(f"{w}.abort_on_close",
                                        raw.get("abort_on_close", d.abort_on_close)),
            lingering_time=self.duration(f"{w}.lingering_time",
                                         raw.get("lingering_time", d.lingering_time)),
            lingering_timeout=self.duration(f"{w}.lingering_timeout",
                                            raw.get("lingering_timeout", d.lingering_timeout),
                                            lo=0.001),
            limit_request_line=self.integer(f"{w}.limit_request_line",
                                            raw.get("limit_request_line", d.limit_request_line),
                                            64, 1 << 20),
            limit_request_fieldsize=self.integer(
                f"{w}.limit_request_fieldsize",
                raw.get("limit_request_fieldsize", d.limit_request_fieldsize), 64, 1 << 20),
            limit_request_fields=self.integer(
                f"{w}.limit_request_fields",
                raw.get("limit_request_fields", d.limit_request_fields), 1, 10000),
            busy_poll=self.integer(f"{w}.busy_poll", raw.get("busy_poll", d.busy_poll),
                                   0, 10000),
            worker_processes=self.worker_processes(
                f"{w}.worker_processes", raw.get("worker_processes", d.worker_processes)),
            master_process=self.boolean(f"{w}.master_process",
                                        raw.get("master_process", not self.windows)),
            graceful_timeout=self.duration(f"{w}.graceful_timeout",
                                           raw.get("graceful_timeout", d.graceful_timeout)),
            served_by_header=self.header_name(f"{w}.served_by_header",
                                              raw.get("served_by_header", d.served_by_header)),
            handover_socket=self.unix_socket(f"{w}.handover_socket",
                                             raw.get("handover_socket", d.handover_socket)),
            resolver=self.resolver(f"{w}.resolver", raw.get("resolver", [])),
        )

    def resolver(self, w: str, value: Any) -> tuple[tuple[str, int], ...]:
        """DNS servers as nginx's `resolver`: "ADDRESS" or "ADDRESS:PORT" ("[V6]:PORT")."""
        out = []
        for i, text in enumerate(self.strings(w, value)):
            m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([0-9.]+)(?::(\d+))?|([0-9A-Fa-f:]+)",
                             text.strip())
            address = m and (m.group(1) or m.group(3) or m.group(5))
            try:
                ipaddress.ip_address(address or "")
            except ValueError:
                raise self.fail(f"{w}[{i}]", text, "must be an IP address, optionally with "
                                ":PORT (\"127.0.0.1:53\", \"[::1]:53\")") from None
            port = int(m.group(2) or m.group(4) or 53)
            if not 1 <= port <= 65535:
                raise self.fail(f"{w}[{i}]", text, "has a port outside 1-65535")
            out.append((address, port))
        return tuple(out)

    def windows_process_model(self, server: ServerConfig) -> None:
        """Windows has neither fork nor a way to pass listening sockets to children
        that Twisted adopts, nor SIGHUP: one process serves, and a restart of the
        service is the reload (README, Windows)."""
        why = "on Windows twistproxy runs as one process (no master or workers)"
        if server.master_process:
            raise self.fail("server.master_process", True, f"is POSIX only: {why}")
        if server.worker_processes > 1:
            raise self.fail("server.worker_processes", server.worker_processes,
                            f"is POSIX only: {why}")

    def log_target(self, where: str, value: Any, console_ok: bool = True) -> str:
        """A log file (relative: to the configuration file's folder), "" for none or
        for the default, "-" (standard output) where `console_ok`."""
        self.string(where, value)
        if value == "" or (value == "-" and console_ok):
            return value
        if value == "-":
            raise self.fail(where, value, 'must name a file, or be "" for standard error')
        return self.file(where, value)

    def worker_processes(self, where: str, value: Any) -> int:
        """A whole number from 1 to 256, or "auto": the CPUs this process may run on."""
        if isinstance(value, str):
            if value.strip().lower() != "auto":
                raise self.fail(where, value, 'must be a whole number from 1 to 256 or "auto"')
            try:
                return max(1, min(256, len(os.sched_getaffinity(0))))
            except (AttributeError, OSError):
                return max(1, min(256, os.cpu_count() or 1))
        self.typed(where, value, int, 'a whole number from 1 to 256 or "auto"')
        if not 1 <= value <= 256:
            raise self.fail(where, value, 'must be a whole number from 1 to 256 or "auto"')
        return value

    def unix_socket(self, where: str, value: Any) -> str:
        """A UNIX socket's path (relative ones: to the configuration file's folder) in a
        folder that exists, or "" for none."""
        if not self.string(where, value):
            return ""
        if self.windows:
            raise self.fail(where, value, "is POSIX only (a UNIX socket passing the "
                            "listeners with SCM_RIGHTS): on Windows a restart of the "
                            "service closes the ports for a moment")
        path = self.file(where, value)
        if len(os.fsencode(path)) > 107:
            raise self.fail(where, value, "is too long for a UNIX socket path (at most "
                            "107 bytes once made absolute)")
        if not os.path.isdir(os.path.dirname(path)):
            raise self.fail(where, value, f"cannot be created: the folder "
                            f"{os.path.dirname(path)} does not exist")
        return path

    def header_name(self, where: str, value: Any) -> str:
        """An HTTP header name (a token), or "" for none."""
        value = self.string(where, value).strip()
        if value and not _TOKEN.match(value):
            raise self.fail(where, value, "is not a header name (letters, digits and "
                            "!#$%&'*+-.^_`|~ only)")
        return value

    def listener(self, w: str, raw: Any) -> ListenConfig:
        raw = self.table(w, raw, ("address", "port", "tls", "certificate",
                                  "redirect_to_https"), required=("address", "port"))
        address = self.string(f"{w}.address", raw["address"]).strip()
        if address != "*":
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise self.fail(f"{w}.address", address,
                                "is not an IP address (use one IPv4 or IPv6 address, "
                                "'0.0.0.0', '::' or '*'; host names are not resolved)") from None
        port = self.integer(f"{w}.port", raw["port"], 1, 65535)
        tls = None
        if "tls" in raw:
            tls = self.tls(w, raw["tls"], raw.get("certificate", []))
        elif "certificate" in raw:
            raise ConfigError(f"{self.path}: {w}.certificate: needs a 'tls' table on the "
                              "same listener (the default certificate)")
        redirect = self.boolean(f"{w}.redirect_to_https", raw.get("redirect_to_https", False))
        if redirect and tls is not None:
            raise self.fail(f"{w}.redirect_to_https", True, "is for a plain listener; this "
                            "one has tls")
        return ListenConfig(address, port, tls, redirect)

    def file(self, w: str, value: Any) -> str:
        """A path; relative ones are relative to the configuration file's folder. On
        Windows, drive letters, UNC names and either slash."""
        self.string(w, value)
        if not value:
            raise self.fail(w, value, "must name a file")
        if any(c in value for c in "\n\t\r\b\f"):
            raise self.fail(w, value, "has a control character in it: in a \"double-quoted\" "
                            "TOML string \\n, \\t, \\r, \\b and \\f are escapes; write a "
                            "Windows path in 'single quotes' or with forward slashes")
        paths = self.paths
        base = paths.dirname(paths.abspath(self.path)) if not self.path.startswith("<") \
            else os.getcwd()
        return paths.normpath(paths.join(base, paths.expanduser(value)))

    def certificate(self, w: str, raw: dict, names: tuple[str, ...]) -> CertConfig:
        """cert, key and optional chain files of a checked table (the listener's tls
        table or a [[listen.certificate]])."""
        return CertConfig(self.file(f"{w}.cert", raw["cert"]),
                          self.file(f"{w}.key", raw["key"]),
                          self.file(f"{w}.chain", raw["chain"]) if "chain" in raw else "",
                          names, w)

    def tls(self, w: str, raw: Any, certificates: Any) -> TLSConfig:
        tw = f"{w}.tls"
        raw = self.table(tw, raw, ("cert", "key", "chain", "min_version", "ciphers"),
                         required=("cert", "key"))
        certs = [self.certificate(tw, raw, ())]
        for i, c in enumerate(self.array_of_tables(f"{w}.certificate", certificates)):
            cw = f"{w}.certificate[{i}]"
            self.table(cw, c, ("server_name", "cert", "key", "chain"),
                       required=("server_name", "cert", "key"))
            names = tuple(self.hostname(f"{cw}.server_name[{j}]", n, wildcard=True)
                          for j, n in enumerate(self.strings(f"{cw}.server_name",
                                                             c["server_name"])))
            certs.append(self.certificate(cw, c, names))
        ciphers = self.string(f"{tw}.ciphers", raw.get("ciphers", ""))
        return TLSConfig(tuple(certs),
                         self.choice(f"{tw}.min_version", raw.get("min_version", "1.2"),
                                     ("1.2", "1.3")),
                         ciphers)

    def check_listeners(self, listeners: tuple[ListenConfig, ...]) -> None:
        seen: dict[str, int] = {}
        for i, l in enumerate(listeners):
            if l.key in seen:
                raise self.fail(f"listen[{i}]", l.key,
                                f"is already defined by listen[{seen[l.key]}]")
            seen[l.key] = i
        # A wildcard and a specific address on the same port cannot both be bound.
        for i, a in enumerate(listeners):
            for j, b in enumerate(listeners[:i]):
                if a.port == b.port and (_is_wildcard(a.address) or _is_wildcard(b.address)) \
                        and _same_family_or_star(a.address, b.address):
                    raise self.fail(f"listen[{i}]", a.key,
                                    f"overlaps listen[{j}] ({b.key}): a wildcard address and "
                                    "another address cannot share a port; list each IP instead")

    def vhost(self, w: str, raw: Any, listeners, balancers) -> VhostConfig:
        raw = self.table(w, raw, ("server_name", "server_alias", "listen", "preserve_host",
                                  "add_headers", "proxy_via", "proxy_chain_auth",
                                  "allow_encoded_slashes", "proxy_requests",
                                  "allow_connect", "connect_allow", "connect_deny", "proxy_allow",
                                  "proxy_auth", "request_headers",
                                  "response_headers", "route"), required=("server_name",))
        name = self.hostname(f"{w}.server_name", raw["server_name"], wildcard=False)
        aliases = tuple(self.hostname(f"{w}.server_alias[{i}]", a, wildcard=True)
                        for i, a in enumerate(self.strings(f"{w}.server_alias",
                                                           raw.get("server_alias", []))))
        keys = {l.key for l in listeners}
        listen = []
        for i, item in enumerate(self.strings(f"{w}.listen", raw.get("listen", []))):
            key = self.listen_ref(f"{w}.listen[{i}]", item)
            if key not in keys:
                raise self.fail(f"{w}.listen[{i}]", item,
                                f"names no [[listen]] (defined: {', '.join(sorted(keys))})")
            listen.append(key)
        routes = tuple(self.route(f"{w}.route[{i}]", r, balancers)
                       for i, r in enumerate(self.array_of_tables(f"{w}.route",
                                                                  raw.get("route", []))))
        return VhostConfig(
            server_name=name,
            server_alias=aliases,
            listen=tuple(listen),
            preserve_host=self.boolean(f"{w}.preserve_host", raw.get("preserve_host", False)),
            add_headers=self.boolean(f"{w}.add_headers", raw.get("add_headers", True)),
            proxy_via=self.choice(f"{w}.proxy_via", raw.get("proxy_via", "off"), _PROXY_VIA),
            proxy_chain_auth=self.boolean(f"{w}.proxy_chain_auth",
                                          raw.get("proxy_chain_auth", False)),
            allow_encoded_slashes=self.choice(f"{w}.allow_encoded_slashes",
                                              raw.get("allow_encoded_slashes", "off"),
                                              _ENCODED_SLASHES),
            **self.forward_proxy(w, raw),
            request_headers=self.header_actions(f"{w}.request_headers",
                                                raw.get("request_headers", [])),
            response_headers=self.header_actions(f"{w}.response_headers",
                                                 raw.get("response_headers", [])),
            routes=routes,
        )

    def forward_proxy(self, w: str, raw: dict) -> dict:
        """The forward-proxy keys of a vhost (mod_proxy_connect, ProxyRequests)."""
        out: dict = {"proxy_requests": self.boolean(f"{w}.proxy_requests",
                                                     raw.get("proxy_requests", False))}
        if "allow_connect" in raw:
            ports = raw["allow_connect"]
            ports = ports if isinstance(ports, list) else [ports]
            ranges = []
            for i, p in enumerate(ports):
                pw = f"{w}.allow_connect[{i}]"
                if isinstance(p, str) and re.fullmatch(r"\d+-\d+", p.strip()):
                    lo, hi = (int(x) for x in p.split("-"))
                    if not 1 <= lo <= hi <= 65535:
                        raise self.fail(pw, p, "must be a port range LOW-HIGH within 1-65535")
                    ranges.append((lo, hi))
                else:
                    n = self.integer(pw, p, 1, 65535)
                    ranges.append((n, n))
            out["allow_connect"] = tuple(ranges)
        for key in ("connect_allow", "connect_deny"):
            if key in raw:
                out[key] = tuple(p.lower() for p in self.strings(f"{w}.{key}", raw[key]))
        if "proxy_allow" in raw:
            out["proxy_allow"] = self.networks(f"{w}.proxy_allow", raw["proxy_allow"])
        if "proxy_auth" in raw:
            aw = f"{w}.proxy_auth"
            a = self.table(aw, raw["proxy_auth"], ("file", "realm"), required=("file",))
            out["proxy_auth"] = (("file", self.file(f"{aw}.file", a["file"])),
                                 ("realm", self.string(f"{aw}.realm",
                                                       a.get("realm", "twistproxy"))))
        return out

    def hostname(self, w: str, value: Any, wildcard: bool) -> str:
        self.string(w, value)
        name = value.strip().lower().rstrip(".")
        body = name[2:] if wildcard and name.startswith("*.") else name
        if not body or not re.fullmatch(r"[a-z0-9_]([a-z0-9_\-]*[a-z0-9_])?"
                                        r"(\.[a-z0-9_]([a-z0-9_\-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\]",
                                        body):
            allowed = "a host name, or '*.domain'" if wildcard else "a host name"
            raise self.fail(w, value, f"is not {allowed}")
        return name

    def listen_ref(self, w: str, value: str) -> str:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+|\*):(\d+)", value.strip())
        try:
            if not m:
                raise ValueError
            addr, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            return listen_key(addr, int(port))
        except ValueError:
            raise self.fail(w, value, "must be 'ADDRESS:PORT' (e.g. '127.0.0.2:80', "
                                      "'[::1]:8080', '*:80')") from None

    def header_actions(self, w: str, raw: Any) -> tuple[HeaderAction, ...]:
        out = []
        for i, item in enumerate(self.array_of_tables(w, raw)):
            iw = f"{w}[{i}]"
            self.table(iw, item, ("action", "name", "value", "always"),
                       required=("action", "name"))
            action = self.choice(f"{iw}.action", item["action"], ("set", "add", "unset"))
            name = self.string(f"{iw}.name", item["name"])
            if not _TOKEN.match(name):
                raise self.fail(f"{iw}.name", name, "is not a valid header name")
            value = self.string(f"{iw}.value", item.get("value", ""))
            if action != "unset" and "value" not in item:
                raise ConfigError(f"{self.path}: {iw}.value: missing (required for '{action}')")
            if any(c in value for c in "\r\n\0"):
                raise self.fail(f"{iw}.value", value, "must not contain CR, LF or NUL")
            if any(ord(c) > 255 for c in value):
                raise self.fail(f"{iw}.value", value, "must be Latin-1 text (header values "
                                "are bytes; percent-encode other characters)")
            if action == "unset" and "value" in item:
                raise self.fail(f"{iw}.value", value, "makes no sense with action 'unset'")
            out.append(HeaderAction(action, name, value,
                                    self.boolean(f"{iw}.always", item.get("always", False))))
        return tuple(out)

    def route(self, w: str, raw: Any, balancers) -> RouteConfig:
        allowed = ("path", "regex", "url", "exclude", "reverse", "match_headers",
                   "cookie_domain", "cookie_path", "request_headers", "response_headers",
                   "handler", *_WORKER_KEYS)
        raw = self.table(w, raw, allowed)
        if "handler" in raw:
            return self.handler_route(w, raw)
        if ("path" in raw) == ("regex" in raw):
            raise ConfigError(f"{self.path}: {w}: needs exactly one of 'path' or 'regex'")
        path = regex = None
        groups = 0
        if "path" in raw:
            path = self.string(f"{w}.path", raw["path"])
            if not path.startswith("/"):
                raise self.fail(f"{w}.path", path, "must start with '/'")
        else:
            regex = self.regex(f"{w}.regex", raw["regex"])
            groups = re.compile(regex).groups
        exclude = self.boolean(f"{w}.exclude", raw.get("exclude", False))
        url = None
        if exclude:
            if "url" in raw:
                raise self.fail(f"{w}.url", raw["url"], "makes no sense with exclude = true")
        elif "url" not in raw:
            raise ConfigError(f"{self.path}: {w}: needs 'url' (or exclude = true)")
        else:
            url = self.backend_url(f"{w}.url", raw["url"], balancers, groups)
        status = self.string(f"{w}.status", raw.get("status", ""))
        if not re.fullmatch(r"([+-]?I)*", status.upper()):
            raise self.fail(f"{w}.status", status, "takes only the I flag on a route: \"-I\" "
                            "puts its worker in error state for 'retry' seconds after a "
                            "failed connect, \"+I\" (the default) never")
        reverse = self.boolean(f"{w}.reverse", raw.get("reverse", False))
        if reverse and (regex is not None or exclude):
            raise self.fail(f"{w}.reverse", reverse, "needs a 'path' route with a 'url' "
                            "(ProxyPassReverse maps a backend URL back to a path)")
        match_headers = []
        raw_mh = raw.get("match_headers", {})
        raw_mh = self.table(f"{w}.match_headers", raw_mh,
                            tuple(raw_mh) if isinstance(raw_mh, dict) else ())
        for name, pattern in raw_mh.items():
            if not _TOKEN.match(name):
                raise self.fail(f"{w}.match_headers", name, "is not a valid header name")
            match_headers.append((name, self.regex(f"{w}.match_headers.{_quote_key(name)}",
                                                   pattern)))
        return RouteConfig(
            path=path, regex=regex, url=url, exclude=exclude,
            reverse=reverse,
            match_headers=tuple(match_headers),
            cookie_domain=self.mapping(f"{w}.cookie_domain", raw.get("cookie_domain", {})),
            cookie_path=self.mapping(f"{w}.cookie_path", raw.get("cookie_path", {}), paths=True),
            request_headers=self.header_actions(f"{w}.request_headers",
                                                raw.get("request_headers", [])),
            response_headers=self.header_actions(f"{w}.response_headers",
                                                 raw.get("response_headers", [])),
            worker=self.worker(w, raw),
            where=w,
        )

    def handler_route(self, w: str, raw: dict) -> RouteConfig:
        """A route served by an admin page (Apache's <Location> + SetHandler)."""
        handler = self.choice(f"{w}.handler", raw["handler"], HANDLERS)
        for key in raw:
            if key not in ("path", "handler"):
                raise self.fail(f"{w}.{key}", raw[key], f"makes no sense with handler = "
                                f"\"{handler}\" (only 'path' goes with it)")
        if "path" not in raw:
            raise ConfigError(f"{self.path}: {w}: needs 'path' with handler = \"{handler}\"")
        path = self.string(f"{w}.path", raw["path"])
        if not path.startswith("/"):
            raise self.fail(f"{w}.path", path, "must start with '/'")
        return RouteConfig(path=path, where=w, handler=handler)

    def mapping(self, w: str, raw: Any, paths: bool = False) -> tuple[tuple[str, str], ...]:
        raw = self.table(w, raw, tuple(raw) if isinstance(raw, dict) else ())
        out = []
        for k, v in raw.items():
            kw = f"{w}.{_quote_key(k)}"
            if not k:
                raise ConfigError(f"{self.path}: {kw}: an empty key would match everything")
            v = self.string(kw, v)
            if paths and not v.startswith("/"):
                raise self.fail(kw, v, "must start with '/'")
            out.append((k, v))
        return tuple(out)

    def worker(self, w: str, raw: dict) -> WorkerParams:
        d = WorkerParams()
        g = raw.get
        smax = self.integer(f"{w}.smax", g("smax"), 0, 100000) if "smax" in raw else None
        mx = self.integer(f"{w}.max", g("max"), 1, 100000) if "max" in raw else None
        if smax is not None and mx is not None and smax > mx:
            raise self.fail(f"{w}.smax", smax, f"must not exceed max ({mx})")
        opt = lambda k, lo=0.0: self.duration(f"{w}.{k}", g(k), lo) if k in raw else None
        upgrade = self.string(f"{w}.upgrade", g("upgrade", d.upgrade))
        field = self.integer(f"{w}.response_field_size",
                             g("response_field_size", d.response_field_size), 256, 1 << 24)
        head = self.integer(f"{w}.response_head_size",
                            g("response_head_size", d.response_head_size), 256, 1 << 26)
        if head < field:
            raise self.fail(f"{w}.response_head_size", head,
                            f"must not be less than response_field_size ({field})")
        return WorkerParams(
            max=mx, smax=smax,
            ttl=opt("ttl", 0.001), acquire=opt("acquire", 0.001),
            connectiontimeout=opt("connectiontimeout", 0.001), timeout=opt("timeout", 0.001),
            disablereuse=self.boolean(f"{w}.disablereuse", g("disablereuse", d.disablereuse)),
            keepalive=self.boolean(f"{w}.keepalive", g("keepalive", d.keepalive)),
            retry=self.duration(f"{w}.retry", g("retry", d.retry)),
            ping=self.duration(f"{w}.ping", g("ping", d.ping)),
            upgrade=upgrade,
            verify=self.boolean(f"{w}.verify", g("verify", True)),
            ca_file=self.file(f"{w}.ca_file", g("ca_file")) if "ca_file" in raw else "",
            status=str(g("status", "")).upper(),      # checked by route() or member()
            response_field_size=field, response_head_size=head,
        )

    def backend_url(self, w: str, value: Any, balancers, groups: int = 0,
                    balancer_ok: bool = True) -> BackendURL:
        self.string(w, value)
        kinds = "an http, https, ws, wss or balancer URL" if balancer_ok else \
            "an http, https, ws or wss URL"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise self.fail(w, value, f"is not {kinds}") from None
        scheme = parts.scheme.lower()
        if port == 0:
            raise self.fail(w, value, "has port 0")
        if scheme not in _DEFAULT_PORTS and not (balancer_ok and scheme == "balancer"):
            raise self.fail(w, value, f"is not {kinds}")
        host = (parts.hostname or "").lower()
        if not host:
            raise self.fail(w, value, "has no host")
        if "$" in parts.netloc or "$" in scheme:
            raise self.fail(w, value, "must not substitute $N into the scheme or host")
        if parts.fragment or parts.username or parts.password:
            raise self.fail(w, value, "must not contain a fragment or user:password@")
        for n in re.findall(r"\$(\d)", parts.path + parts.query):
            if int(n) > groups:
                raise self.fail(w, value, f"uses ${n} but the regex has {groups} group(s)")
        if scheme == "balancer":
            if port is not None:
                raise self.fail(w, value, "must be balancer://NAME/path (no port)")
            if host not in balancers:
                known = ", ".join(sorted(balancers)) or "none defined"
                raise self.fail(w, value, f"names an undefined balancer ({known})")
            port = 0
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return BackendURL(scheme, host, port or _DEFAULT_PORTS.get(scheme, 0), path, value)

    def balancer(self, w: str, name: str, raw: Any) -> BalancerConfig:
        if not re.fullmatch(r"[a-z0-9_][a-z0-9_\-]*", name):
            raise self.fail(w, name, "is not a valid balancer name "
                                     "(lower-case letters, digits, '_' and '-')")
        allowed = tuple(BalancerConfig.__dataclass_fields__) + ("member",) + _HC_KEYS
        allowed = tuple(k for k in allowed if k not in ("name", "members")) + ("resolve_every",)
        raw = self.table(w, raw, allowed, required=() if isinstance(raw, dict) and "members_from" in raw
                         else ("member",))
        d = BalancerConfig(name)
        # health-check keys on the balancer are the members' template (Apache's hctemplate)
        template = {k: raw[k] for k in _HC_KEYS if k in raw}
        if template:     # checked here, so an error names the balancer's key
            self.member(w, {**template, "url": "http://template.invalid/"})
        members = tuple(self.member(f"{w}.member[{i}]", {**template, **m}
                                    if isinstance(m, dict) else m)
                        for i, m in enumerate(self.array_of_tables(f"{w}.member",
                                                                   raw.get("member", []))))
        found = self.members_from(w, raw, template) if "members_from" in raw else None
        if "resolve_every" in raw and found is None:
            raise self.fail(f"{w}.resolve_every", raw["resolve_every"],
                            "needs members_from (it is how often DNS is asked)")
        if not members and found is None:
            raise self.fail(f"{w}.member", [], "must list at least one member "
                            "(or use members_from)")
        routes = [m.route for m in members if m.route]
        for i, m in enumerate(members):
            earlier = [j for j, o in enumerate(members[:i]) if m.route and o.route == m.route]
            if earlier:
                raise self.fail(f"{w}.member[{i}].route", m.route,
                                f"is already the route of member[{earlier[0]}]")
            if m.redirect and m.redirect not in routes:
                raise self.fail(f"{w}.member[{i}].redirect", m.redirect,
                                "names no member's route")
        sep = self.string(f"{w}.stickysessionsep", raw.get("stickysessionsep", "."))
        if sep.lower() == "off":
            sep = ""
        elif len(sep) != 1:
            raise self.fail(f"{w}.stickysessionsep", sep, "must be one character or 'Off'")
        sticky = self.string(f"{w}.stickysession", raw.get("stickysession", ""))
        if sticky and not all(_TOKEN.match(p) and "|" not in p for p in sticky.split("|", 1)):
            raise self.fail(f"{w}.stickysession", sticky, "must be NAME or COOKIE|PARAM")
        cookie = ()
        if "sticky_cookie" in raw:
            cw = f"{w}.sticky_cookie"
            sc = self.table(cw, raw["sticky_cookie"], ("name", "path"), required=("name",))
            cname = self.string(f"{cw}.name", sc["name"])
            if not _TOKEN.match(cname):
                raise self.fail(f"{cw}.name", cname, "is not a valid cookie name")
            cookie = (("name", cname), ("path", self.string(f"{cw}.path", sc.get("path", "/"))))
        statuses = raw.get("failonstatus", [])
        if not isinstance(statuses, list):
            statuses = [statuses]
        return BalancerConfig(
            name=name,
            lbmethod=self.choice(f"{w}.lbmethod", raw.get("lbmethod", d.lbmethod), _LBMETHODS),
            stickysession=sticky,
            stickysessionsep=sep,
            scolonpathdelim=self.boolean(f"{w}.scolonpathdelim",
                                         raw.get("scolonpathdelim", False)),
            nofailover=self.boolean(f"{w}.nofailover", raw.get("nofailover", False)),
            maxattempts=(self.integer(f"{w}.maxattempts", raw["maxattempts"], 0, 100)
                         if "maxattempts" in raw else None),
            timeout=self.duration(f"{w}.timeout", raw.get("timeout", 0)),
            failonstatus=tuple(self.integer(f"{w}.failonstatus[{i}]", s, 100, 599)
                               for i, s in enumerate(statuses)),
            failontimeout=self.boolean(f"{w}.failontimeout", raw.get("failontimeout", False)),
            forcerecovery=self.boolean(f"{w}.forcerecovery", raw.get("forcerecovery", True)),
            sticky_cookie=cookie,
            growth=self.integer(f"{w}.growth", raw.get("growth", 0), 0, 100),
            members=members,
            members_from=found,
        )

    def members_from(self, w: str, raw: dict, template: dict) -> DiscoveryConfig:
        """members_from = { srv = NAME } or { host = NAME, port = N }, scheme, member."""
        fw = f"{w}.members_from"
        mf = self.table(fw, raw["members_from"], ("srv", "host", "port", "scheme", "member"))
        if ("srv" in mf) == ("host" in mf):
            raise self.fail(fw, mf, "needs one of srv (an SRV name) or host (A/AAAA) "
                            "with port")
        key = "srv" if "srv" in mf else "host"
        name = self.string(f"{fw}.{key}", mf[key]).strip().rstrip(".").lower()
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_\-]{0,62})(\.[a-z0-9_]([a-z0-9_\-]{0,62}))*",
                            name) or len(name) > 253:
            raise self.fail(f"{fw}.{key}", mf[key], "is not a DNS name")
        port = 0
        if key == "host":
            if "port" not in mf:
                raise ConfigError(f"{self.path}: {fw}.port: missing (required with host)")
            port = self.integer(f"{fw}.port", mf["port"], 1, 65535)
        elif "port" in mf:
            raise self.fail(f"{fw}.port", mf["port"], "is for host (SRV records name "
                            "their ports)")
        scheme = self.choice(f"{fw}.scheme", mf.get("scheme", "http"), tuple(_DEFAULT_PORTS))
        extra = mf.get("member", {})
        self.table(f"{fw}.member", extra, tuple(k for k in MemberConfig.__dataclass_fields__
                                                 if k not in ("worker", "url", "redirect"))
                   + _WORKER_KEYS)
        # checked as a member, so an error names the members_from.member key
        member = self.member(f"{fw}.member", {**template, **extra,
                                               "url": f"{scheme}://discovered.invalid/"})
        if member.route:
            raise self.fail(f"{fw}.member.route", member.route, "would be every found "
                            "member's route (routes name one member)")
        every = self.duration(f"{w}.resolve_every", raw.get("resolve_every", 30), lo=0.1)
        return DiscoveryConfig(srv=name if key == "srv" else "",
                               host=name if key == "host" else "", port=port,
                               scheme=scheme, resolve_every=every, member=member)

    def member(self, w: str, raw: Any) -> MemberConfig:
        allowed = tuple(k for k in MemberConfig.__dataclass_fields__ if k != "worker") \
            + _WORKER_KEYS
        raw = self.table(w, raw, allowed, required=("url",))
        d = MemberConfig(url=None)  # type: ignore[arg-type]
        url = self.backend_url(f"{w}.url", raw["url"], {}, balancer_ok=False)
        route = self.string(f"{w}.route", raw.get("route", ""))
        if len(route) > 63 or (route and not _TOKEN.match(route)):
            raise self.fail(f"{w}.route", route, "must be a token of at most 63 characters")
        status = self.string(f"{w}.status", raw.get("status", ""))
        if not re.fullmatch(r"([+-]?[DSIHRENC])*", status.upper()):
            raise self.fail(f"{w}.status", status,
                            "must be flags D, S, I, H, R, E, N or C, each optionally after "
                            "+ or -")
        expect = raw.get("hcexpect", [200, 399])
        if (not isinstance(expect, list) or len(expect) != 2
                or not all(isinstance(x, int) and 100 <= x <= 599 for x in expect)
                or expect[0] > expect[1]):
            raise self.fail(f"{w}.hcexpect", expect, "must be [LOW, HIGH] status codes")
        return MemberConfig(
            url=url, route=route,
            loadfactor=self.number(f"{w}.loadfactor", raw.get("loadfactor", 1), 1, 100),
            lbset=self.integer(f"{w}.lbset", raw.get("lbset", 0), 0, 99),
            status=status.upper(),
            redirect=self.string(f"{w}.redirect", raw.get("redirect", "")),
            worker=self.worker(w, raw),
            hcmethod=self.choice(f"{w}.hcmethod", raw.get("hcmethod", d.hcmethod), _HCMETHODS,
                                 fold=str.upper),
            hcuri=self.string(f"{w}.hcuri", raw.get("hcuri", d.hcuri)),
            hcinterval=self.duration(f"{w}.hcinterval", raw.get("hcinterval", d.hcinterval), 0.1),
            hcpasses=self.integer(f"{w}.hcpasses", raw.get("hcpasses", d.hcpasses), 1, 1000),
            hcfails=self.integer(f"{w}.hcfails", raw.get("hcfails", d.hcfails), 1, 1000),
            hcexpect=(expect[0], expect[1]),
        )


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{...}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(where: str, key: str) -> str:
    return _quote_key(key) if where == "(top level)" else f"{where}.{_quote_key(key)}"


def _quote_key(key: str) -> str:
    import json
    return key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else json.dumps(key)


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _is_wildcard(address: str) -> bool:
    return address in ("*", "0.0.0.0", "::")


def _same_family_or_star(a: str, b: str) -> bool:
    if "*" in (a, b) or "::" in (a, b):
        return True          # "::" is dual-stack on Linux: it collides with IPv4 too
    return (":" in a) == (":" in b)

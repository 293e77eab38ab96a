"""From Apache's directives to a twistproxy configuration, with a report of the rest.

Owns the meaning of each httpd directive for twistproxy: what it becomes (a listener,
a vhost key, a route, a balancer member, a header action...), in which order routes
are tried, and what is not carried over, said once per directive as `file:line:
Directive args: why`. The tree comes from parser.py (includes, defines and
conditionals already resolved); the result is a document for tomlout.py.

Apache's semantics followed here (mod_proxy.c, mod_rewrite.c, core):
- The main server's settings and ProxyPass lines are inherited by every
  <VirtualHost>, whose own come after (mod_proxy merges base then override).
- mod_rewrite's translate hook runs before mod_proxy's, so RewriteRule [P] routes come
  first, then <Location> ProxyPass lines (the last matching Location wins in Apache,
  so they are listed last first), then ProxyPass/ProxyPassMatch in file order.
- A connection to an address with IP-specific <VirtualHost>s is served by those only;
  `*:port` vhosts serve the other addresses of that port; the main server serves
  listeners no vhost names. The first vhost of an address is its default, as ours.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .parser import Node, Parsed
from .tomlout import Table

NO_EQUIVALENT = "no equivalent"
NOT_NEEDED = "not needed"
DIFFERS = "differs"


@dataclass(frozen=True)
class Report:
    where: str
    directive: str
    kind: str
    why: str = ""
    proxied: bool = False      # proxied traffic would differ: exit status 1

    def line(self) -> str:
        return f"{self.where}: {self.directive}: {self.kind}" + (f" ({self.why})" if self.why
                                                                else "")


@dataclass
class Imported:
    doc: Table
    reports: list[Report]

    @property
    def status(self) -> int:
        """0: the result serves the same proxied traffic; 1: something proxied could
        not be carried over."""
        return 1 if any(r.proxied for r in self.reports) else 0


# directives that only run Apache itself: nothing to carry over
_NOT_NEEDED = {
    "loadmodule": "twistproxy has every module it needs built in",
    "loadfile": "twistproxy loads no shared objects",
    "serverroot": "paths are resolved on import", "pidfile": "twistproxy run --pidfile",
    "user": "run it as the user you want (systemd, twistd --uid)", "group": "as User",
    "mutex": "", "defaultruntimedir": "", "scoreboardfile": "", "listenbacklog": "",
    "startservers": "one event loop per process; see worker_processes",
    "minspareservers": "", "maxspareservers": "", "minsparethreads": "",
    "maxsparethreads": "", "threadsperchild": "", "threadlimit": "", "serverlimit": "",
    "maxrequestworkers": "", "maxclients": "", "maxconnectionsperchild": "",
    "maxrequestsperchild": "", "asyncrequestworkerfactor": "", "enablesendfile": "",
    "enablemmap": "", "hostnamelookups": "", "serveradmin": "", "serversignature":
    "twistproxy's own error pages carry no signature", "usecanonicalname": "",
    "addefaultcharset": "", "traceenable": "", "sslrandomseed": "",
    "sslsessioncache": "", "sslsessioncachetimeout": "", "sslpassphrasedialog": "",
    "sslstaplingcache": "", "sslcompression": "off is twistproxy's only setting",
    "rewriteengine": "", "loglevel": "twistproxy run "
    "--log-level", "keepalive": "keep-alive is on; keepalive_timeout = 0 would end it",
    "proxyset": "", "sslproxyengine": "an https:// backend URL is TLS by itself",
    "extendedstatus": "server-status always shows everything",
    "maxkeepaliverequests": "a client connection serves requests until it is idle "
    "for keepalive_timeout",
}
# directives with no equivalent that change what proxied requests get
_CHANGES_PROXIED = {
    "sslverifyclient": "client certificates are not asked for: anyone who reaches the "
    "listener is proxied", "sslverifydepth": "no client certificates",
    "sslcacertificatefile": "no client certificates (SSLProxyCACertificateFile is for "
    "backends)", "sslcacertificatepath": "no client certificates",
    "proxyerroroverride": "backends' error pages are passed through as they are",
    "limitrequestbody": "request bodies are not limited in size",
    "rewriteoptions": "rewrite rules are not inherited", "proxyremote": "no upstream "
    "proxy", "proxyremotematch": "no upstream proxy", "proxybadheader": "a bad response "
    "header is always a 502", "authtype": "no authentication on reverse-proxied "
    "requests", "authname": "", "authuserfile": "", "authbasicprovider": "",
}
_PROXY_ENV = ("force-proxy-request-1.0", "proxy-nokeepalive", "proxy-initial-not-pooled",
              "proxy-sendchunked", "proxy-sendcl", "proxy-interim-response", "no-proxy",
              "proxy-chain-auth", "proxy-source-port")
# file serving and other things a proxy does not do
_NO_EQUIVALENT = {
    "documentroot": "twistproxy serves no files", "alias": "twistproxy serves no files",
    "aliasmatch": "twistproxy serves no files", "scriptalias": "no CGI",
    "directoryindex": "twistproxy serves no files", "options": "", "allowoverride": "",
    "addhandler": "", "addtype": "", "addoutputfilter": "", "addoutputfilterbytype": "",
    "errordocument": "twistproxy's error pages are its own", "redirect": "",
    "redirectmatch": "", "redirectpermanent": "", "redirecttemp": "", "php_value": "",
    "php_admin_value": "", "php_flag": "", "php_admin_flag": "", "wsgiscriptalias": "",
    "wsgidaemonprocess": "", "setenv": "", "setenvif": "", "browsermatch": "",
    "expiresactive": "", "expiresbytype": "", "deflatecompressionlevel": "",
    "setoutputfilter": "", "logformat": "the access log has one format (README)",
    "serverpath": "", "accessfilename": "",
}
_SECTIONS_NO_EQUIVALENT = ("directory", "directorymatch", "files", "filesmatch", "limit",
                           "limitexcept", "macro", "ifdirective", "iffile", "ifsection",
                           "if", "elseif", "else", "requireall", "requireany",
                           "requirenone")

_WORKER_KEYS = {"max", "smax", "ttl", "acquire", "connectiontimeout", "timeout",
                "disablereuse", "keepalive", "retry", "ping", "upgrade", "status"}
_WORKER_RENAMED = {"responsefieldsize": "response_field_size"}
_BALANCER_KEYS = {"lbmethod", "stickysession", "stickysessionsep", "scolonpathdelim",
                  "nofailover", "maxattempts", "timeout", "failonstatus", "failontimeout",
                  "forcerecovery", "growth"}
_MEMBER_KEYS = {"route", "loadfactor", "lbset", "redirect", "status"} | _WORKER_KEYS
_HC_KEYS = {"hcmethod", "hcuri", "hcinterval", "hcpasses", "hcfails"}
# worker parameters that tune Apache's buffers or connection handling, not what is
# sent or to whom: not needed here
_TUNING_KEYS = {"iobuffersize", "receivebuffersize", "flushpackets", "flushwait",
                "enablereuse", "addressttl", "secret", "mapping"}
_BOOLEAN_KEYS = {"disablereuse", "keepalive", "scolonpathdelim", "nofailover",
                 "failontimeout", "forcerecovery"}
_DURATION_KEYS = {"ttl", "acquire", "connectiontimeout", "timeout", "retry", "ping",
                  "hcinterval"}
_INT_KEYS = {"max", "smax", "maxattempts", "growth", "lbset", "hcpasses", "hcfails",
             "response_field_size"}

_ON_OFF = ("on", "off")
_VHOST_CHOICES = {
    "proxypreservehost": ("preserve_host", _ON_OFF),
    "proxyaddheaders": ("add_headers", _ON_OFF),
    "proxyrequests": ("proxy_requests", _ON_OFF),
    "proxyvia": ("proxy_via", ("off", "on", "full", "block")),
    "allowencodedslashes": ("allow_encoded_slashes", ("off", "on", "nodecode")),
}
_REWRITE_HEADERS = {"HTTP_HOST": "Host", "HTTP_USER_AGENT": "User-Agent",
                    "HTTP_REFERER": "Referer", "HTTP_COOKIE": "Cookie",
                    "HTTP_ACCEPT": "Accept", "HTTP_FORWARDED": "Forwarded",
                    "HTTP_PROXY_CONNECTION": "Proxy-Connection"}
_UNIVERSAL = {"^", ".*", "^.*", "^.*$", "^/", "^/.*", "^/.*$", "(.*)", "^(.*)$"}


def shown(node: Node) -> str:
    """The directive as written, on one line (continuations joined)."""
    raw = " ".join(node.raw.split())
    if node.is_section:
        return f"<{node.name}{(' ' + raw) if raw else ''}>"
    return f"{node.name} {raw}".rstrip()


@dataclass
class _Route:
    """A route being built, with where it came from."""
    table: Table
    url: str = ""
    node: Node | None = None


@dataclass
class _Balancer:
    name: str                   # ours (renamed if two servers use one name)
    node: Node
    params: dict = field(default_factory=dict)
    members: list = field(default_factory=list)


@dataclass
class _Server:
    """The main server or one <VirtualHost>: what it says, before inheritance."""
    node: Node | None
    addresses: list[tuple[str, int | None]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    keys: dict = field(default_factory=dict)          # vhost keys set here
    notes: dict = field(default_factory=dict)         # key -> where it came from
    proxypass: list[_Route] = field(default_factory=list)
    locations: list[_Route] = field(default_factory=list)
    rewrites: list[_Route] = field(default_factory=list)
    rewrite_on: bool = False
    rewrite_nodes: list[Node] = field(default_factory=list)
    reverse: list[tuple[str, str, Node]] = field(default_factory=list)
    cookie_domain: dict = field(default_factory=dict)
    cookie_path: dict = field(default_factory=dict)
    request_headers: list[dict] = field(default_factory=list)
    response_headers: list[dict] = field(default_factory=list)
    sticky_cookies: list[tuple[dict, Node]] = field(default_factory=list)
    balancers: dict = field(default_factory=dict)      # Apache's name -> _Balancer
    templates: dict = field(default_factory=dict)
    ssl: dict = field(default_factory=dict)
    ssl_proxy: dict = field(default_factory=dict)
    admin_allow: list[str] = field(default_factory=list)
    proxy_access: tuple[list[str], Node] | None = None


class InvalidApache(ValueError):
    """A value Apache itself would refuse: the input is not a valid configuration."""


class InvalidAt(Exception):
    """`where: what` for an InvalidApache value (exit status 2)."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


class ImportError_(Exception):
    """An Apache configuration that is valid for Apache but makes no twistproxy
    configuration (no Listen at all, say): one line."""


class Importer:
    def __init__(self, parsed: Parsed):
        self.parsed = parsed
        self.reports: list[Report] = []
        self.main = _Server(None)
        self.vhosts: list[_Server] = []
        self.listens: list[tuple[str, int, Node]] = []
        self.server: dict = {}
        self.server_notes: dict = {}
        self.all_balancers: dict[str, _Balancer] = {}
        self.timeout: tuple[float, Node] | None = None
        self.on_wildcard: dict = {}      # IP vhosts whose port is bound as a wildcard

    # -- reporting ------------------------------------------------------------------

    def report(self, node: Node, kind: str, why: str = "", proxied: bool = False) -> None:
        self.reports.append(Report(node.where, shown(node), kind, why, proxied))

    # -- the walk -------------------------------------------------------------------

    def run(self) -> Imported:
        for node in self.parsed.nodes:
            self.directive(node, self.main)
        doc = self.build()
        # an inherited line is looked at once per vhost: said once
        return Imported(doc, list(dict.fromkeys(self.reports)))

    def directive(self, node: Node, srv: _Server) -> None:
        try:
            self._directive(node, srv)
        except InvalidApache as e:
            raise InvalidAt(node.where, f"{shown(node)}: {e}") from None
        except (ValueError, IndexError) as e:
            self.report(node, DIFFERS, f"could not be read ({e}): not carried over",
                        proxied=True)

    def _directive(self, node: Node, srv: _Server) -> None:
        key = node.key
        handler = getattr(self, f"d_{key}", None)
        if handler is not None:
            handler(node, srv)
        elif key in _VHOST_CHOICES:
            self.vhost_choice(node, srv)
        elif node.is_section and key in _SECTIONS_NO_EQUIVALENT:
            self.report(node, NO_EQUIVALENT, "its directives are not read: twistproxy "
                        "serves no files and has no per-directory configuration")
        elif key in _NOT_NEEDED:
            self.report(node, NOT_NEEDED, _NOT_NEEDED[key])
        elif key in _CHANGES_PROXIED:
            self.report(node, NO_EQUIVALENT, _CHANGES_PROXIED[key], proxied=True)
        elif key in ("setenv", "setenvif", "setenvifnocase", "browsermatch") and \
                any(a.lower().lstrip("!").startswith(_PROXY_ENV) for a in node.args):
            self.report(node, NO_EQUIVALENT, "mod_proxy's environment switches are not "
                        "carried over", proxied=True)
        elif key in _NO_EQUIVALENT:
            self.report(node, NO_EQUIVALENT, _NO_EQUIVALENT[key])
        elif node.is_section:
            self.report(node, NO_EQUIVALENT, "an unknown section: its directives are not "
                        "read", proxied=True)
        else:
            # unknown to the importer: it may change what is proxied, so say so
            self.report(node, NO_EQUIVALENT, "not known to the importer", proxied=True)

    # -- global ---------------------------------------------------------------------

    def d_listen(self, node: Node, srv: _Server) -> None:
        if srv is not self.main:
            return self.report(node, DIFFERS, "Listen belongs to the main server")
        spec = node.args[0] if node.args else ""
        m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):(\d+)|(\d+)", spec)
        if not m:
            return self.report(node, DIFFERS, "not an address:port or a port", proxied=True)
        if m.group(4):
            address, port = "*", int(m.group(4))
        else:
            address, port = (m.group(1) or m.group(2)), int(m.group(3))
        if len(node.args) > 1 and node.args[1].lower() not in ("http", "https"):
            self.report(node, DIFFERS, f"protocol {node.args[1]}: served as HTTP")
        self.listens.append((address, port, node))

    def d_servertokens(self, node: Node, srv: _Server) -> None:
        value = (node.args[0] if node.args else "").lower()
        mapping = {"prod": "prod", "productonly": "prod", "full": "full"}
        if value in mapping:
            self.set_server("server_tokens", mapping[value], node)
        else:
            self.set_server("server_tokens", "prod", node)
            self.report(node, DIFFERS, "twistproxy has prod, full and off: prod")

    def d_keepalivetimeout(self, node: Node, srv: _Server) -> None:
        self.set_server("keepalive_timeout", _seconds(node.args[0]), node)

    def d_timeout(self, node: Node, srv: _Server) -> None:
        # Apache's Timeout is ProxyTimeout's default
        if self.timeout is None or self.timeout[1].key == "timeout":
            self.timeout = (_seconds(node.args[0]), node)

    def d_proxytimeout(self, node: Node, srv: _Server) -> None:
        if srv is self.main:
            self.timeout = (_seconds(node.args[0]), node)
        else:
            srv.keys["__timeout"] = _seconds(node.args[0])
            srv.notes["__timeout"] = node

    def d_limitrequestline(self, node: Node, srv: _Server) -> None:
        self.limit("limit_request_line", node, 64)

    def d_limitrequestfieldsize(self, node: Node, srv: _Server) -> None:
        self.limit("limit_request_fieldsize", node, 64)

    def d_limitrequestfields(self, node: Node, srv: _Server) -> None:
        self.limit("limit_request_fields", node, 1)

    def limit(self, key: str, node: Node, lowest: int) -> None:
        value = _atoi(node.args[0])
        if value < lowest:
            return self.report(node, DIFFERS, f"twistproxy's {key} is at least {lowest}: "
                               "left at its default", proxied=True)
        self.set_server(key, value, node)

    def d_requestreadtimeout(self, node: Node, srv: _Server) -> None:
        for arg in node.args:
            m = re.fullmatch(r"header=(\d+)(?:-(\d+))?(?:,minrate=\d+)?", arg, re.I)
            if m:
                self.set_server("header_timeout", int(m.group(2) or m.group(1)), node)
                if m.group(2):
                    self.report(node, DIFFERS, f"header_timeout = {m.group(2)} s, the upper "
                                "bound, with no MinRate extension")
            elif not arg.lower().startswith("body="):
                self.report(node, DIFFERS, f"{arg}: only header= is carried over")

    def d_errorlog(self, node: Node, srv: _Server) -> None:
        target = node.args[0] if node.args else ""
        if srv is not self.main:
            return self.report(node, DIFFERS, "one error log for the whole proxy")
        if target.startswith(("|", "syslog")):
            return self.report(node, NO_EQUIVALENT, "piped and syslog logs: run "
                               "twistproxy under systemd or a log shipper")
        self.set_server("error_log", self._path(target), node)

    def d_customlog(self, node: Node, srv: _Server) -> None:
        target = node.args[0] if node.args else ""
        if target.startswith("|"):
            return self.report(node, NO_EQUIVALENT, "piped logs")
        if srv is not self.main or "access_log" in self.server:
            return self.report(node, DIFFERS, "one access log for the whole proxy")
        self.set_server("access_log", self._path(target), node)
        self.report(node, DIFFERS, "the access log is the combined format plus the "
                    "time taken and the member (README, Access log)")

    d_transferlog = d_customlog

    def set_server(self, key: str, value, node: Node) -> None:
        self.server[key] = value
        self.server_notes[key] = node

    # -- virtual hosts --------------------------------------------------------------

    def d_virtualhost(self, node: Node, srv: _Server) -> None:
        if srv is not self.main:
            return self.report(node, DIFFERS, "a <VirtualHost> inside another")
        vh = _Server(node)
        for spec in node.args:
            parsed = _vhost_address(spec)
            if parsed is None:
                self.report(node, DIFFERS, f"address {spec!r} is not an IP, * or "
                            "_default_ (names are not resolved)", proxied=True)
                continue
            vh.addresses.append(parsed)
        self.vhosts.append(vh)
        for child in node.children or ():
            self.directive(child, vh)

    def d_servername(self, node: Node, srv: _Server) -> None:
        if not node.args:
            raise InvalidApache("ServerName takes one argument")
        name = node.args[0]
        name = re.sub(r"^[a-z]+://", "", name)
        name = re.sub(r":\d+$", "", name)
        srv.names = [name]
        srv.notes["__servername"] = node

    def d_serveralias(self, node: Node, srv: _Server) -> None:
        for name in node.args:
            if "*" in name[1:] or "?" in name or (name.startswith("*") and
                                                   not name.startswith("*.")):
                self.report(node, DIFFERS, f"{name}: only a leading '*.' wildcard is "
                            "carried over", proxied=True)
                continue
            srv.aliases.append(name)

    def _flag(self, node: Node) -> bool | None:
        value = (node.args[0] if node.args else "").lower()
        if value in ("on", "off"):
            return value == "on"
        self.report(node, DIFFERS, "expected On or Off", proxied=True)
        return None

    def _vhost_key(self, key: str, value, node: Node, srv: _Server) -> None:
        srv.keys[key] = value
        srv.notes[key] = node

    def vhost_choice(self, node: Node, srv: _Server) -> None:
        """A directive that is one vhost key: On/Off, or one of a few words."""
        key, choices = _VHOST_CHOICES[node.key]
        value = (node.args[0] if node.args else "").lower()
        if value not in choices:
            return self.report(node, DIFFERS, f"expected {', '.join(choices)}", proxied=True)
        self._vhost_key(key, value == "on" if choices == _ON_OFF else value, node, srv)

    def d_allowconnect(self, node: Node, srv: _Server) -> None:
        ports: list = []
        for arg in node.args:
            ports.append(int(arg) if arg.isdigit() else arg)
        self._vhost_key("allow_connect", ports, node, srv)

    # -- ProxyPass and friends ------------------------------------------------------

    def d_proxypass(self, node: Node, srv: _Server, location: str | None = None,
                    regex: bool = False) -> None:
        args = list(node.args)
        if location is None and args[:1] == ["~"]:       # ProxyPass ~ REGEX URL
            args = args[1:]
            regex = True
        if location is None:
            if len(args) < 2:
                raise InvalidApache("outside <Location> it takes a path and a URL")
            path, target, params = args[0], args[1], args[2:]
        else:
            if not args:
                return self.report(node, DIFFERS, "needs a URL", proxied=True)
            path, target, params = location, args[0], args[1:]
        route = Table(f"{shown(node)}  ({node.where})")
        if regex:
            route["regex"] = path
        else:
            route["path"] = path
        if target == "!":
            route["exclude"] = True
            self._add_route(srv, route, node, location)
            return
        if not regex and location is not None and _is_glob(path):
            return self.report(node, DIFFERS, f"<Location {path}> is a wildcard: not "
                               "carried over (use <LocationMatch> with a regex)",
                               proxied=True)
        url = target
        if not re.match(r"(?i)(https?|wss?|balancer)://", url):
            return self.report(node, NO_EQUIVALENT, "twistproxy proxies to http, https, "
                               "ws, wss and balancer URLs", proxied=True)
        route["url"] = url
        balancer = url.lower().startswith("balancer://")
        for param in params:
            low = param.lower()
            if low in ("nocanon", "interpolate", "noquery"):
                self.report(node, DIFFERS, f"{param}: not carried over", proxied=True)
                continue
            k, _, v = param.partition("=")
            k = k.lower()
            if balancer and k in _BALANCER_KEYS:
                self._balancer_param(srv, url, k, v, node)
            elif k == "status" and v.upper().strip("+-") not in ("I", ""):
                self.report(node, DIFFERS, f"{param}: a route's worker takes only I",
                            proxied=True)
            else:
                self._worker_param(route, k, v, param, node, _WORKER_KEYS)
        self._add_route(srv, route, node, location, url)

    def d_proxypassmatch(self, node: Node, srv: _Server, location: str | None = None) -> None:
        self.d_proxypass(node, srv, location, regex=True)

    def _add_route(self, srv: _Server, route: Table, node: Node, location: str | None,
                   url: str = "") -> None:
        (srv.locations if location is not None else srv.proxypass).append(
            _Route(route, url, node))

    def _worker_param(self, table: Table, key: str, value: str, param: str, node: Node,
                      keys: set) -> None:
        """A ProxyPass or BalancerMember parameter: one of `keys` (ours, or renamed),
        Apache's tuning that is not needed here, or one we lack."""
        if key in keys or key in _WORKER_RENAMED:
            self._param(table, _WORKER_RENAMED.get(key, key), value, node)
        elif key in _TUNING_KEYS:
            self.report(node, NOT_NEEDED, f"{param}: twistproxy sizes its own buffers and "
                        "reuses connections (disablereuse=On to stop that)")
        else:
            self.report(node, DIFFERS, f"{param}: not a parameter twistproxy has",
                        proxied=True)

    def _param(self, table: Table, key: str, value: str, node: Node) -> None:
        converted = _convert(key, value)
        if converted is None:
            self.report(node, DIFFERS, f"{key}={value}: not a value twistproxy takes",
                        proxied=True)
            return
        table[key] = converted

    def d_proxypassreverse(self, node: Node, srv: _Server, location: str | None = None) -> None:
        args = list(node.args)
        if location is not None:
            args = [location] + args
        if len(args) < 2:
            return self.report(node, DIFFERS, "needs a path and a URL", proxied=True)
        srv.reverse.append((args[0], args[1], node))

    def d_proxypassreversecookiedomain(self, node: Node, srv: _Server) -> None:
        if len(node.args) >= 2:
            srv.cookie_domain[node.args[0]] = node.args[1]

    def d_proxypassreversecookiepath(self, node: Node, srv: _Server) -> None:
        if len(node.args) >= 2:
            srv.cookie_path[node.args[0]] = node.args[1]

    # -- <Proxy>, balancers, members ------------------------------------------------

    def d_proxy(self, node: Node, srv: _Server) -> None:
        target = node.args[0] if node.args else ""
        if target.lower().startswith("balancer://"):
            bal = self._balancer(srv, target, node)
            for child in node.children or ():
                if child.key == "balancermember":
                    self.member(child, srv, bal, list(child.args))
                elif child.key == "proxyset":
                    self.proxyset(child, srv, bal)
                elif child.key in ("order", "allow", "deny", "require", "satisfy"):
                    self.access(child, srv, in_balancer=True)
                else:
                    self.directive(child, srv)
            return
        if target != "*":
            self.report(node, DIFFERS, "access control for some backends only: not "
                        "carried over", proxied=True)
            return
        for child in node.children or ():
            if child.key in ("order", "allow", "deny", "require", "satisfy"):
                self.access(child, srv, in_balancer=False)
            else:
                self.directive(child, srv)

    def access(self, node: Node, srv: _Server, in_balancer: bool) -> None:
        """Require / Order / Allow / Deny inside a <Proxy>."""
        key = node.key
        args = [a.lower() for a in node.args]
        if key in ("order", "satisfy"):
            return self.report(node, NOT_NEEDED, "read with its Allow and Deny lines")
        if (key == "allow" and args[:2] == ["from", "all"]) or \
                (key == "require" and args == ["all", "granted"]):
            return self.report(node, NOT_NEEDED, "everyone may use it, as by default")
        networks = _networks(node)
        if networks is not None and not in_balancer:
            prev = srv.proxy_access
            srv.proxy_access = ((prev[0] if prev else []) + networks, node)
            return
        self.report(node, DIFFERS, "twistproxy has no access control on reverse-proxied "
                    "requests: everyone who reaches the listener is proxied", proxied=True)

    def _balancer(self, srv: _Server, url: str, node: Node) -> _Balancer:
        name = re.sub(r"(?i)^balancer://", "", url).split("/", 1)[0]
        bal = srv.balancers.get(name)
        if bal is None:
            ours = name
            n = 2
            while ours in self.all_balancers:
                ours = f"{name}_{n}"
                n += 1
            bal = srv.balancers[name] = self.all_balancers[ours] = _Balancer(ours, node)
        return bal

    def _find_balancer(self, srv: _Server, url: str) -> _Balancer | None:
        name = re.sub(r"(?i)^balancer://", "", url).split("/", 1)[0]
        return srv.balancers.get(name) or self.main.balancers.get(name)

    def _balancer_param(self, srv: _Server, url: str, key: str, value: str, node: Node) -> None:
        bal = self._find_balancer(srv, url) or self._balancer(self.main, url, node)
        converted = _convert(key, value)
        if converted is None:
            self.report(node, DIFFERS, f"{key}={value}: not a value twistproxy takes",
                        proxied=True)
        else:
            bal.params[key] = converted

    def d_balancermember(self, node: Node, srv: _Server) -> None:
        args = list(node.args)
        if args and args[0].lower().startswith("balancer://"):
            bal = self._balancer(srv, args[0], node)
            return self.member(node, srv, bal, args[1:])
        self.report(node, DIFFERS, "outside <Proxy balancer://...> it needs the "
                    "balancer's URL first", proxied=True)

    def member(self, node: Node, srv: _Server, bal: _Balancer, args: list[str]) -> None:
        if not args:
            return self.report(node, DIFFERS, "needs a URL", proxied=True)
        member = Table(f"{shown(node)}  ({node.where})", url=args[0])
        if re.match(r"(?i)[a-z]+://[^/]+/$", args[0]):
            self.report(node, DIFFERS, "the member URL ends in /: Apache sends the "
                        "request's path after it whole (//page), twistproxy one slash "
                        "(/page) (README, Deliberate differences)")
        hc: dict = {}
        for param in args[1:]:
            k, _, v = param.partition("=")
            k = k.lower()
            if k == "hctemplate":
                template = srv.templates.get(v) or self.main.templates.get(v)
                if template is None:
                    self.report(node, DIFFERS, f"hctemplate={v}: no such ProxyHCTemplate "
                                "before it", proxied=True)
                else:
                    hc.update(template)           # as Apache: a later parameter wins
            elif k in _HC_KEYS:
                hc[k] = v
            elif k == "hcexpr":
                self.report(node, DIFFERS, f"{param}: a check passes on a status from 200 "
                            "to 399 (hcexpect), expressions are not carried over",
                            proxied=True)
            else:
                self._worker_param(member, k, v, param, node, _MEMBER_KEYS)
        for k, v in hc.items():
            self._param(member, k, v, node)
        if any(k in member for k in _HC_KEYS) and "hcmethod" not in member:
            member["hcmethod"] = "TCP"        # mod_proxy_hcheck's default method
        bal.members.append(member)

    def proxyset(self, node: Node, srv: _Server, bal: _Balancer | None = None) -> None:
        args = list(node.args)
        if bal is None:
            if not args or not args[0].lower().startswith("balancer://"):
                return self.report(node, DIFFERS, "only ProxySet on a balancer is carried "
                                   "over", proxied=True)
            bal = self._balancer(srv, args[0], node)
            args = args[1:]
        for param in args:
            k, _, v = param.partition("=")
            k = k.lower()
            if k in _BALANCER_KEYS:
                converted = _convert(k, v)
                if converted is None:
                    self.report(node, DIFFERS, f"{param}: not a value twistproxy takes",
                                proxied=True)
                else:
                    bal.params[k] = converted
            else:
                self.report(node, DIFFERS, f"{param}: not a balancer parameter twistproxy "
                            "has", proxied=True)

    def d_proxyset(self, node: Node, srv: _Server) -> None:
        self.proxyset(node, srv)

    def d_proxyhctemplate(self, node: Node, srv: _Server) -> None:
        if not node.args:
            return self.report(node, DIFFERS, "needs a name", proxied=True)
        params = {}
        for param in node.args[1:]:
            k, _, v = param.partition("=")
            if k.lower() in _HC_KEYS:
                params[k.lower()] = v
            else:
                self.report(node, DIFFERS, f"{param}: not carried over", proxied=True)
        srv.templates[node.args[0]] = params

    # -- <Location> -----------------------------------------------------------------

    def d_location(self, node: Node, srv: _Server, regex: bool = False) -> None:
        args = list(node.args)
        if args[:1] == ["~"]:                        # <Location ~ "regex">
            args, regex = args[1:], True
        path = args[0] if args else "/"
        handler = None
        requires: list[Node] = []
        for child in node.children or ():
            key = child.key
            if key == "sethandler":
                handler = child
            elif key in ("require", "order", "allow", "deny", "satisfy"):
                requires.append(child)
            elif key == "proxypass" and not regex:
                self.d_proxypass(child, srv, location=path)
            elif key == "proxypassmatch" or (key == "proxypass" and regex):
                self.d_proxypass(child, srv, location=path, regex=True)
            elif key == "proxypassreverse":
                self.d_proxypassreverse(child, srv, location=path)
            elif key in ("requestheader", "header"):
                self.report(child, DIFFERS, "headers are set per vhost: not carried over "
                            "for this location only", proxied=True)
            else:
                self.directive(child, srv)
        if handler is None:
            for r in requires:
                self.report(r, DIFFERS, "twistproxy has no access control on "
                            "reverse-proxied requests", proxied=True)
            return
        name = (handler.args[0] if handler.args else "").lower()
        if name not in ("balancer-manager", "server-status") or regex:
            return self.report(handler, NO_EQUIVALENT, "twistproxy's handlers are "
                               "balancer-manager, server-status and metrics, on a path")
        route = Table(f"{shown(node)} with SetHandler {name}  ({node.where})",
                      path=path, handler=name)
        srv.locations.append(_Route(route, "", node))
        allow: list[str] = []
        for r in requires:
            nets = _networks(r)
            if nets is None:
                self.report(r, DIFFERS, "the admin pages take client networks (allow) "
                            "and Basic auth only")
            else:
                allow.extend(nets)
        srv.admin_allow.extend(allow)

    def d_locationmatch(self, node: Node, srv: _Server) -> None:
        self.d_location(node, srv, regex=True)

    # -- headers --------------------------------------------------------------------

    def d_requestheader(self, node: Node, srv: _Server) -> None:
        action = self._header(node, request=True)
        if action is not None:
            srv.request_headers.append(action)

    def d_header(self, node: Node, srv: _Server) -> None:
        args = list(node.args)
        # Apache's ROUTEID recipe: the balancer sets the cookie itself (sticky_cookie)
        if len(args) >= 3 and args[-1].lower() == "env=balancer_route_changed" and \
                "%{BALANCER_WORKER_ROUTE}e" in " ".join(args):
            m = re.match(r"\s*([^=;\s]+)=\.?%\{BALANCER_WORKER_ROUTE\}e(.*)$",
                         args[-2] if args[-2] else "")
            if m:
                cookie = {"name": m.group(1)}
                pm = re.search(r";\s*path=([^;]+)", m.group(2), re.I)
                if pm:
                    cookie["path"] = pm.group(1).strip()
                srv.sticky_cookies.append((cookie, node))
                return
        action = self._header(node, request=False)
        if action is not None:
            srv.response_headers.append(action)

    def _header(self, node: Node, request: bool) -> dict | None:
        args = list(node.args)
        always = False
        if not request and args and args[0].lower() in ("always", "onsuccess"):
            always = args.pop(0).lower() == "always"
        if not args:
            self.report(node, DIFFERS, "no action", proxied=True)
            return None
        action = args.pop(0).lower()
        if args and args[-1].lower() == "early":
            self.report(node, DIFFERS, "early: applied like the others, not before the "
                        "request is read", proxied=True)
            args.pop()
        condition = args[-1] if args and re.match(r"(?i)(env=|expr=)", args[-1]) else None
        if condition:
            self.report(node, DIFFERS, f"{condition}: conditions are not carried over",
                        proxied=True)
            return None
        if action in ("set", "add", "append", "merge", "setifempty") and len(args) >= 2:
            name, value = args[0], args[1]
            if "%{" in value:
                self.report(node, DIFFERS, "the value has %{...} variables, which are not "
                            "expanded", proxied=True)
                return None
            if action in ("append", "merge", "setifempty"):
                self.report(node, DIFFERS, f"{action}: twistproxy has set, add and unset",
                            proxied=True)
                return None
            out = {"action": action, "name": name, "value": value}
            if always:
                out["always"] = True
            return out
        if action == "unset" and args:
            return {"action": "unset", "name": args[0]}
        self.report(node, DIFFERS, f"{action}: twistproxy has set, add and unset",
                    proxied=True)
        return None

    # -- mod_rewrite ----------------------------------------------------------------

    def d_rewriteengine(self, node: Node, srv: _Server) -> None:
        flag = self._flag(node)
        if flag is not None:
            srv.rewrite_on = flag

    def d_rewritecond(self, node: Node, srv: _Server) -> None:
        srv.rewrite_nodes.append(node)

    def d_rewriterule(self, node: Node, srv: _Server) -> None:
        conds = [n for n in srv.rewrite_nodes if n.key == "rewritecond"]
        srv.rewrite_nodes = []
        if not srv.rewrite_on:
            return self.report(node, NOT_NEEDED, "RewriteEngine is not On here: Apache "
                               "ignores it too")
        if getattr(srv, "_rewrite_done", False):
            return self.report(node, NOT_NEEDED, "after a rule that ends every request's "
                               "rewriting: never reached")
        args = list(node.args)
        if len(args) < 2:
            return self.report(node, DIFFERS, "needs a pattern and a substitution",
                               proxied=True)
        pattern, target = args[0], args[1]
        flags = _flags(args[2] if len(args) > 2 else "")
        if target == "-" and "l" in flags and pattern in _UNIVERSAL and not conds:
            srv._rewrite_done = True            # type: ignore[attr-defined]
            return self.report(node, NOT_NEEDED, "it only ends rewriting; what is not "
                               "routed above goes on to ProxyPass, as here")
        if "p" not in flags:
            for c in conds:
                self.report(c, NO_EQUIVALENT, "a condition of the rule below")
            return self.report(node, NO_EQUIVALENT, "only proxying rules ([P]) are carried "
                               "over: redirects and internal rewrites are not",
                               proxied=True)
        unsupported = set(flags) - {"p", "l", "nc", "last", "proxy", "nocase", "qsa", "ne",
                                    "noescape"}
        why = []
        if unsupported:
            why.append(f"flags {', '.join(sorted(unsupported))}")
        if not re.match(r"(?i)(https?|wss?|balancer)://", target):
            why.append("its target is not an absolute URL")
        elif not re.search(r"\$[1-9]", target):
            why.append("its target has no $N: twistproxy would append the path")
        if re.search(r"%[0-9{]", target):
            why.append("its target uses %N or %{...}, which twistproxy does not expand")
        if "?" in target and "qsa" not in flags:
            why.append("its target has a query, which replaces the request's without "
                       "[QSA]; twistproxy would append the request's")
        # [OR] joins a condition to the next; the groups so made must all hold, so a
        # route per choice of one condition from each group (their product)
        groups: list[list] = [[]]
        for c in conds:
            expr = self._condition(c)
            if isinstance(expr, str):
                why.append(expr)
                continue
            header, regex, is_or = expr
            groups[-1].append((header, regex))
            if not is_or:
                groups.append([])
        alternatives: list[dict] = [{}]
        for group in (g for g in groups if g):
            alternatives = [_both(alt, header, regex) for alt in alternatives
                            for header, regex in group]
        if why:
            for c in conds:
                self.report(c, NO_EQUIVALENT, "a condition of the rule below")
            return self.report(node, DIFFERS, "; ".join(why) + ": not carried over",
                               proxied=True)
        regex = ("(?i)" if "nc" in flags or "nocase" in flags else "") + pattern
        for alt in alternatives:
            route = Table(f"{shown(node)}  ({node.where})"
                          + "".join(f"\n  {shown(c)}  ({c.where})" for c in conds),
                          regex=regex, url=target)
            if alt:
                route["match_headers"] = alt
            srv.rewrites.append(_Route(route, target, node))

    def _condition(self, node: Node):
        """(header, regex, OR?) for a RewriteCond on a request header, or why not."""
        args = list(node.args)
        if len(args) < 2:
            return "a RewriteCond without a pattern"
        test, pattern = args[0], args[1]
        flags = _flags(args[2] if len(args) > 2 else "")
        m = re.fullmatch(r"%\{(?:HTTP:([A-Za-z0-9-]+)|([A-Z_]+))\}", test)
        header = None
        if m and m.group(1):
            header = m.group(1)
        elif m and m.group(2) in _REWRITE_HEADERS:
            header = _REWRITE_HEADERS[m.group(2)]
        if header is None:
            return f"a condition on {test} (only request headers are carried over)"
        if set(flags) - {"nc", "nocase", "or", "ornext"}:
            return f"condition flags {','.join(sorted(set(flags) - {'nc', 'or'}))}"
        negate = pattern.startswith("!")
        if negate:
            pattern = pattern[1:]
        if pattern.startswith(("<", ">", "=", "-")):
            return f"the comparison {pattern!r} (only regexes are carried over)"
        regex = pattern
        try:
            matches_empty = re.search(pattern, "") is not None
        except re.error:
            return f"the pattern {pattern!r} is not a regex Python reads"
        if matches_empty and not negate:
            self.report(node, DIFFERS, f"a request without {header} takes this rule in "
                        "Apache (the pattern matches an empty value), not in twistproxy, "
                        "whose header matches need the header", proxied=True)
        if negate:
            regex = f"^(?![\\s\\S]*?(?:{pattern}))"
            self.report(node, DIFFERS, f"a request without {header} takes this rule in "
                        "Apache (the empty value does not match), not in twistproxy, "
                        "whose header matches need the header", proxied=True)
        if "nc" in flags or "nocase" in flags:
            regex = "(?i)" + regex
        return header, regex, ("or" in flags or "ornext" in flags)

    # -- TLS ------------------------------------------------------------------------

    def d_sslengine(self, node: Node, srv: _Server) -> None:
        flag = self._flag(node)
        if flag is not None:
            srv.ssl["engine"] = (flag, node)

    def _ssl_file(self, key: str, node: Node, srv: _Server) -> None:
        if node.args:
            srv.ssl[key] = (self._path(node.args[0]), node)

    def d_sslcertificatefile(self, node: Node, srv: _Server) -> None:
        self._ssl_file("cert", node, srv)

    def d_sslcertificatekeyfile(self, node: Node, srv: _Server) -> None:
        self._ssl_file("key", node, srv)

    def d_sslcertificatechainfile(self, node: Node, srv: _Server) -> None:
        self._ssl_file("chain", node, srv)

    def d_sslprotocol(self, node: Node, srv: _Server) -> None:
        words = " ".join(node.args).lower()
        if "-tlsv1.2" in words or re.fullmatch(r"\s*\+?tlsv1\.3\s*", words):
            srv.ssl["min_version"] = ("1.3", node)
        else:
            self.report(node, DIFFERS, "TLS 1.2 and newer (min_version = \"1.3\" for 1.3 "
                        "only)")

    def d_sslciphersuite(self, node: Node, srv: _Server) -> None:
        if node.args:
            srv.ssl["ciphers"] = (node.args[-1], node)

    def d_sslproxyverify(self, node: Node, srv: _Server) -> None:
        value = (node.args[0] if node.args else "").lower()
        srv.ssl_proxy["verify"] = (value != "none", node)

    def d_sslproxycacertificatefile(self, node: Node, srv: _Server) -> None:
        if node.args:
            srv.ssl_proxy["ca_file"] = (self._path(node.args[0]), node)

    def d_sslproxycheckpeername(self, node: Node, srv: _Server) -> None:
        if node.args and node.args[0].lower() == "off":
            self.report(node, DIFFERS, "twistproxy checks the name whenever it verifies "
                        "(SSLProxyVerify none turns both off)")

    d_sslproxycheckpeercn = d_sslproxycheckpeername

    def _path(self, value: str) -> str:
        import os
        if os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(self.parsed.server_root, value))

    # -- building -------------------------------------------------------------------

    def build(self) -> Table:
        doc = Table()
        server = Table("[server]: the main server's settings")
        if self.timeout is not None:
            self.server["timeout"] = self.timeout[0]
            self.server_notes["timeout"] = self.timeout[1]
        if "access_log" not in self.server:
            server["access_log"] = ""
            server.note("access_log", "no CustomLog: no access log, as in Apache")
        for k, v in self.server.items():
            server[k] = v
            server.note(k, f"{shown(self.server_notes[k])}  ({self.server_notes[k].where})")
        doc["server"] = server
        listeners = self._listeners()
        if not listeners:
            raise ImportError_("no Listen directive: twistproxy needs an address and port "
                               "to listen on")
        doc["listen"] = [t for t, _, _ in listeners]
        keys = [k for _, k, _ in listeners]
        vhosts, admin_allow = self._vhosts(keys)
        if admin_allow:
            doc["admin"] = Table("[admin]: who may see the balancer-manager and "
                                 "server-status pages (Require)", allow=admin_allow)
        doc["vhost"] = vhosts
        balancers = Table()
        for bal in self.all_balancers.values():
            if not bal.members:
                self.reports.append(Report(bal.node.where, shown(bal.node), DIFFERS,
                                           "a balancer without members: left out",
                                           proxied=True))
                continue
            table = Table(f"{shown(bal.node)}  ({bal.node.where})", **bal.params)
            table["member"] = bal.members
            balancers[bal.name] = table
        if balancers:
            doc["balancer"] = balancers
        return doc

    def _listeners(self) -> list[tuple[Table, str, Node]]:
        out = []
        seen: dict[str, Node] = {}
        for address, port, node in self.listens:
            key = _key(address, port)
            if key in seen:
                self.report(node, NOT_NEEDED, f"the same as {seen[key].where}")
                continue
            seen[key] = node
            table = Table(f"{shown(node)}  ({node.where})", address=address, port=port)
            out.append((table, key, node))
        # TLS: the vhosts with SSLEngine on give their listener its certificates (a
        # vhost inherits the main server's SSL directives; the main server serves the
        # listeners no vhost names)
        keys = [k for _, k, _ in out]
        for vh in self.vhosts:
            vh.ssl = {**self.main.ssl, **vh.ssl}
        claimed = {k for vh in self.vhosts for k in self._vhost_keys(vh, keys)}
        for table, key, node in out:
            certs = []
            for vh in self.vhosts + [self.main]:
                engine = vh.ssl.get("engine")
                if not engine or not engine[0]:
                    continue
                served = self._vhost_keys(vh, keys) if vh is not self.main else \
                    [k for k in keys if k not in claimed]
                if key not in served:
                    continue
                if "cert" not in vh.ssl or "key" not in vh.ssl:
                    if "cert" in vh.ssl and "key" not in vh.ssl:
                        vh.ssl["key"] = vh.ssl["cert"]     # a PEM with both, as Apache
                    else:
                        self.report(engine[1], DIFFERS, "SSLEngine on without "
                                    "SSLCertificateFile: left as plain HTTP", proxied=True)
                        continue
                certs.append(vh)
            if not certs:
                continue
            first = certs[0]
            tls = Table(f"SSLEngine on  ({first.ssl['engine'][1].where})",
                        cert=first.ssl["cert"][0], key=first.ssl["key"][0])
            if "chain" in first.ssl:
                tls["chain"] = first.ssl["chain"][0]
            for k in ("min_version", "ciphers"):
                if k in first.ssl:
                    tls[k] = first.ssl[k][0]
            table["tls"] = tls
            extra = []
            for vh in certs[1:]:
                names = (vh.names or self.main.names) + vh.aliases
                cert = Table(f"{shown(vh.node)}  ({vh.node.where})", server_name=names,
                             cert=vh.ssl["cert"][0], key=vh.ssl["key"][0])
                if "chain" in vh.ssl:
                    cert["chain"] = vh.ssl["chain"][0]
                extra.append(cert)
            if extra:
                table["certificate"] = extra
        return out

    def _vhost_keys(self, vh: _Server, keys: list[str]) -> list[str]:
        """The listener keys a <VirtualHost> serves (Apache's address matching)."""
        out = []
        ip_specific = {self._norm(a, p) for v in self.vhosts for a, p in v.addresses
                       if a not in ("*", "_default_")}
        for address, port in vh.addresses:
            for key in keys:
                laddr, lport = key.rsplit(":", 1)
                laddr = laddr.strip("[]")
                if port is not None and int(lport) != port:
                    continue
                if address in ("*", "_default_"):
                    if (laddr, int(lport)) in ip_specific and laddr != "*":
                        continue
                    out.append(key)
                elif laddr in ("*", "0.0.0.0", "::"):
                    # Apache serves it on connections to that address only; one
                    # wildcard socket cannot do that here (_vhosts reports it)
                    self.on_wildcard.setdefault(id(vh), (vh, key))
                elif self._norm(address, int(lport))[0] == laddr:
                    out.append(key)
        return list(dict.fromkeys(out))

    @staticmethod
    def _norm(address: str, port: int | None):
        try:
            return (ipaddress.ip_address(address.strip("[]")).compressed, port)
        except ValueError:
            return (address, port)

    def _vhosts(self, keys: list[str]) -> tuple[list[Table], list[str]]:
        out: list[Table] = []
        admin_allow: list[str] = []
        claimed: set[str] = set()
        servers = []
        for vh in self.vhosts:
            served = self._vhost_keys(vh, keys)
            if id(vh) in self.on_wildcard:
                key = self.on_wildcard[id(vh)][1]
                self.report(vh.node, DIFFERS, f"its address's port is bound for every "
                            f"address ({key}): twistproxy cannot serve this vhost on "
                            "connections to one address of a wildcard socket; Listen each "
                            "address on its own instead", proxied=True)
            if not served:
                if id(vh) not in self.on_wildcard:
                    self.report(vh.node, DIFFERS, "no Listen serves its address: left out",
                                proxied=bool(vh.proxypass or vh.rewrites or vh.locations))
                continue
            claimed.update(served)
            servers.append((vh, served))
        rest = [k for k in keys if k not in claimed]
        if rest or not servers:
            servers.append((self.main, rest if servers else []))
        elif "__servername" in self.main.notes and all(v.names for v in self.vhosts):
            self.report(self.main.notes["__servername"], NOT_NEEDED, "every address has "
                        "its <VirtualHost>s, so the main server answers none")
        for vh, served in servers:
            table, allow = self._vhost(vh, served)
            out.append(table)
            admin_allow.extend(allow)
        return out, list(dict.fromkeys(admin_allow))

    def _vhost(self, vh: _Server, served: list[str]) -> tuple[Table, list[str]]:
        main = self.main
        is_main = vh is main
        where = "the main server" if is_main else f"{shown(vh.node)}  ({vh.node.where})"
        name = (vh.names or main.names or ["localhost"])[0]
        table = Table(where, server_name=name)
        if vh.aliases:
            table["server_alias"] = vh.aliases
        if served and (not is_main or len(self.vhosts) > 0):
            table["listen"] = served
        keys = {**main.keys, **vh.keys} if not is_main else dict(main.keys)
        notes = {**main.notes, **vh.notes} if not is_main else dict(main.notes)
        timeout = keys.pop("__timeout", None)
        for k in ("__timeout", "__servername"):
            notes.pop(k, None)
        for k, v in keys.items():
            table[k] = v
            table.note(k, f"{shown(notes[k])}  ({notes[k].where})")
        access = vh.proxy_access or main.proxy_access
        if access is not None:
            if keys.get("proxy_requests"):
                table["proxy_allow"] = access[0]
            else:
                self.report(access[1], DIFFERS, "<Proxy *> access control applies to "
                            "reverse-proxied requests in Apache; twistproxy's proxy_allow "
                            "is for forward proxying only", proxied=True)
        request_headers = main.request_headers + ([] if is_main else vh.request_headers)
        response_headers = main.response_headers + ([] if is_main else vh.response_headers)
        if request_headers:
            table["request_headers"] = request_headers
        if response_headers:
            table["response_headers"] = response_headers
        routes = self._routes(vh, timeout)
        if routes:
            table["route"] = [r.table for r in routes]
        allow = main.admin_allow + ([] if is_main else vh.admin_allow)
        return table, allow

    def _routes(self, vh: _Server, timeout) -> list[_Route]:
        main = self.main
        is_main = vh is main
        rewrites = vh.rewrites
        locations = list(reversed(vh.locations)) + \
            ([] if is_main else list(reversed(main.locations)))
        proxypass = (main.proxypass if not is_main else []) + vh.proxypass
        routes = rewrites + locations + proxypass
        reverse = (main.reverse if not is_main else []) + vh.reverse
        used = set()
        cookie_domain = {**main.cookie_domain, **vh.cookie_domain}
        cookie_path = {**main.cookie_path, **vh.cookie_path}
        ssl_proxy = {**main.ssl_proxy, **vh.ssl_proxy}
        for route in routes:
            t = route.table
            url = route.url
            if not url:
                continue
            for i, (path, rurl, node) in enumerate(reverse):
                if _same_url(rurl, url) and path.rstrip("/") == \
                        str(t.get("path", t.get("regex", ""))).rstrip("/"):
                    t["reverse"] = True
                    used.add(i)
                elif _same_url(rurl, url) and "regex" in t and i not in used:
                    # ProxyPassMatch: its ProxyPassReverse names a prefix of the URL
                    t["reverse"] = True
                    used.add(i)
            if cookie_domain:
                t["cookie_domain"] = cookie_domain
            if cookie_path:
                t["cookie_path"] = cookie_path
            if timeout is not None and "timeout" not in t and \
                    not url.lower().startswith("balancer://"):
                t["timeout"] = timeout
            if url.lower().startswith(("https://", "wss://")):
                for k, (v, node) in ssl_proxy.items():
                    t[k] = v
            if url.lower().startswith("balancer://"):
                bal = self._find_balancer(vh, url)
                if bal is not None and not bal.members:
                    self.report(route.node, DIFFERS, "its balancer has no members: left "
                                "out", proxied=True)
                    t["__drop"] = True
                    continue
                if bal is None:
                    self.report(route.node, DIFFERS, "no <Proxy> defines this balancer",
                                proxied=True)
                    t["__drop"] = True
                    continue
                if timeout is not None:
                    for member in bal.members:
                        if "timeout" not in member:
                            member["timeout"] = timeout
                            member.note("timeout", "the vhost's ProxyTimeout")
                if bal.name != _balancer_name(url):
                    t["url"] = re.sub(r"(?i)^balancer://[^/]+", f"balancer://{bal.name}", url)
                for cookie, node in (main.sticky_cookies + ([] if is_main else
                                                            vh.sticky_cookies)):
                    bal.params["sticky_cookie"] = cookie
        for i, (path, rurl, node) in enumerate(reverse):
            if i not in used:
                self.report(node, DIFFERS, "twistproxy rewrites a route's own URL in "
                            "responses (reverse = true); this URL is no route's",
                            proxied=True)
        return [r for r in routes if not r.table.pop("__drop", False)]


def _both(alt: dict, header: str, regex: str) -> dict:
    """`alt` with `header` also matching `regex` (two regexes on one header: both)."""
    def scoped(rx: str) -> str:         # a leading (?i) may not stand inside a group
        return f"(?i:{rx[4:]})" if rx.startswith("(?i)") else f"(?:{rx})"
    out = dict(alt)
    out[header] = f"(?=[\\s\\S]*?{scoped(out[header])})(?=[\\s\\S]*?{scoped(regex)})" \
        if header in out else regex
    return out


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def _balancer_name(url: str) -> str:
    return re.sub(r"(?i)^balancer://", "", url).split("/", 1)[0]


def _key(address: str, port: int) -> str:
    if address == "*":
        return f"*:{port}"
    ip = ipaddress.ip_address(address)
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _vhost_address(spec: str) -> tuple[str, int | None] | None:
    m = re.fullmatch(r"(\*|_default_|\[[0-9A-Fa-f:.]+\]|[0-9.]+)(?::(\d+|\*))?", spec)
    if not m:
        return None
    address = m.group(1).strip("[]")
    port = int(m.group(2)) if m.group(2) and m.group(2) != "*" else None
    return address, port


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def _atoi(text: str) -> int:
    """C's atoi, as Apache reads most numbers: the leading digits ("8k" is 8)."""
    m = re.match(r"\s*([+-]?\d+)", text)
    if not m:
        raise InvalidApache(f"{text!r} is not a number")
    return int(m.group(1))


_TIME_UNITS = {"ms": 0.001, "s": 1, "mi": 60, "min": 60, "h": 3600}


def _seconds(text: str, default: str = "s") -> float | int:
    """ap_timeout_parameter_parse: digits and an optional unit (ms, s, mi, h)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", text.lower())
    if not m or (m.group(2) and m.group(2) not in _TIME_UNITS):
        raise InvalidApache(f"{text!r} is not a time (digits, then ms, s, mi or h)")
    return _number(str(int(m.group(1)) * _TIME_UNITS[m.group(2) or default]))


def _flags(text: str) -> list[str]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return []
    return [f.strip().lower().split("=", 1)[0] for f in text[1:-1].split(",") if f.strip()]


def _convert(key: str, value: str):
    """An Apache parameter value as our key's type, or None."""
    low = value.lower()
    try:
        if key in _BOOLEAN_KEYS:
            if low in ("on", "off"):
                return low == "on"
            return None
        if key in ("timeout", "ttl", "retry"):
            # atoi seconds: "500ms" is 500 s, "5.5" is 5 (mod_proxy's own parsing)
            n = _atoi(value)
            if n < (0 if key == "retry" else 1):
                raise InvalidApache(f"{key}={value}: must be at least "
                                    f"{0 if key == 'retry' else 1}")
            return n
        if key == "acquire":
            return _seconds(value, "ms")               # milliseconds by default
        if key in _DURATION_KEYS:
            return _seconds(value)
        if key in _INT_KEYS:
            return _atoi(value)
        if key == "loadfactor":
            n = float(value)
            if not 1 <= n <= 100:
                raise InvalidApache(f"loadfactor={value}: must be from 1 to 100")
            return _number(value)
        if key == "failonstatus":
            return [int(x) for x in value.split(",")]
        if key == "hcmethod":
            return value.upper()
        if key == "upgrade":
            return value
    except InvalidApache:
        raise
    except ValueError:
        return None
    return value


def _networks(node: Node) -> list[str] | None:
    """Client networks a Require / Allow line grants, or None when it says something
    else (a user, an expression, a denial)."""
    args = [a for a in node.args]
    key = node.key
    if key == "require":
        if not args:
            return None
        kind, rest = args[0].lower(), args[1:]
        if kind == "local":
            return ["127.0.0.0/8", "::1/128"]
        if kind == "ip":
            out = []
            for a in rest:
                try:
                    out.append(str(ipaddress.ip_network(_partial_ip(a), strict=False)))
                except ValueError:
                    return None
            return out
        return None
    if key == "allow" and args[:1] and args[0].lower() == "from":
        out = []
        for a in args[1:]:
            if a.lower() == "all":
                return None
            try:
                out.append(str(ipaddress.ip_network(_partial_ip(a), strict=False)))
            except ValueError:
                return None
        return out
    return None


def _partial_ip(text: str) -> str:
    """Apache's `Require ip 10.1` means 10.1.0.0/16."""
    if "/" in text or ":" in text:
        return text
    parts = [p for p in text.split(".") if p]
    if len(parts) < 4:
        return ".".join(parts + ["0"] * (4 - len(parts))) + f"/{8 * len(parts)}"
    return text


def import_parsed(parsed: Parsed) -> Imported:
    return Importer(parsed).run()


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")

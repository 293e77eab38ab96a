"""twistproxy.config: every validation path, the values a good file yields, and the
shipped configuration files (etc/twistproxy.toml, etc/examples/*.toml).

Plain pytest, no reactor. Every error must be one line that starts with the file name,
names the key path and shows the offending value: ``FILE: key.path: 'value' problem``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from twistproxy import config
from twistproxy.config import (AdminConfig, BackendURL, BalancerConfig, Config, ConfigError, HeaderAction,
                               ListenConfig, MemberConfig, RouteConfig, ServerConfig,
                               VhostConfig, WorkerParams)

ROOT = Path(__file__).parents[1]
SITE = "etc/site.toml"

LISTEN = '[[listen]]\naddress = "127.0.0.1"\nport = 8080\n'
VHOST = '[[vhost]]\nserver_name = "localhost"\n'
ROUTE = 'path = "/"\nurl = "http://127.0.0.1:8081/"'
MEMBER = 'url = "http://127.0.0.1:8101"'


def listen(*addresses: str, port: int = 8080) -> str:
    return "".join(f'[[listen]]\naddress = "{a}"\nport = {port}\n' for a in addresses)


def doc(*routes: str, vhost: str = "", top: str = "", listeners: str = LISTEN,
        after: str = "") -> str:
    """A whole file: top-level text, listeners, one vhost with `routes`, then `after`."""
    parts = [top, listeners, VHOST + vhost]
    parts += [f"[[vhost.route]]\n{r}\n" for r in routes]
    parts.append(after)
    return "\n".join(parts)


def balancer(body: str = "", members: tuple[str, ...] = (MEMBER,), name: str = "app") -> str:
    text = f"[balancer.{name}]\n{body}\n"
    for m in members:
        text += f"[[balancer.{name}.member]]\n{m}\n"
    return text


def bal_doc(body: str = "", members: tuple[str, ...] = (MEMBER,), name: str = "app",
            **kw) -> str:
    """A file whose only route goes to balancer `name`; `kw` as for doc()."""
    return doc(f'path = "/"\nurl = "balancer://{name}/"', after=balancer(body, members, name),
               **kw)


def member_doc(*lines: str, extra_members: tuple[str, ...] = ()) -> str:
    return bal_doc(members=("\n".join((MEMBER,) + lines),) + extra_members)


def fails(text: str, path: str = SITE) -> str:
    """The ConfigError text for `text`, checked to be one line starting with the file."""
    with pytest.raises(ConfigError) as info:
        config.loads(text, path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    return msg


def ok(text: str) -> Config:
    return config.loads(text, SITE)


# ---------------------------------------------------------------------------
# errors: (file text, key path, value as shown or None, problem)

E = pytest.param
ERRORS = [
    # -- the document ------------------------------------------------------------
    E(VHOST, "listen", None, "missing (required)", id="missing-listen"),
    E(LISTEN, "vhost", None, "missing (required)", id="missing-vhost"),
    E("listen = []\n" + VHOST, "listen", "[]", "must name at least one address and port",
      id="empty-listen"),
    E("vhost = []\n" + LISTEN, "vhost", "[]", "must define at least one virtual host",
      id="empty-vhost"),
    E("listen = 5\n" + VHOST, "listen", "5", "must be an array of tables ([[...]])",
      id="listen-not-tables"),
    E("vhost = [1, 2]\n" + LISTEN, "vhost", "[1, 2]", "must be an array of tables",
      id="vhost-not-tables"),
    E(doc(top="lisen = 1\n"), "lisen", None, "unknown key (did you mean 'listen'?)",
      id="unknown-top-level"),
    E(doc(top="vhosts = 1\n"), "vhosts", None, "unknown key (did you mean 'vhost'?)",
      id="unknown-top-level-vhosts"),
    E(doc(top="zzz = 1\n"), "zzz", None,
      "unknown key (known keys: server, listen, vhost, balancer, admin, cluster)", id="unknown-top-no-hint"),
    E(doc(top='balancer = "abc"\n'), "balancer", "'abc'", "must be a table",
      id="balancer-not-table"),
    E(doc(top="[[balancer]]\nx = 1\n"), "balancer", None, "must be a table",
      id="balancer-array"),

    # -- [server] ----------------------------------------------------------------
    E(doc(top='[server]\naccess_logs = "-"\n'), "server.access_logs", None,
      "unknown key (did you mean 'access_log'?)", id="server-unknown"),
    E(doc(top="server = 5\n"), "server", "5", "must be a table", id="server-not-table"),
    E(doc(top='[server]\nserver_tokens = "verbose"\n'), "server.server_tokens", "'verbose'",
      "must be one of: prod, full, off", id="server-tokens"),
    E(doc(top="[server]\naccess_log = 5\n"), "server.access_log", "5", "must be a string",
      id="server-access-log-type"),
    E(doc(top="[server]\nserver_name = 'x'\n"), "server.server_name", None,
      "unknown key", id="server-name-is-per-vhost"),
    E(doc(top="[server]\ntimeout = 0\n"), "server.timeout", "0",
      "must be at least 0.001 seconds", id="server-timeout-zero"),
    E(doc(top="[server]\ntimeout = 40000000\n"), "server.timeout", "40000000",
      "is longer than a year", id="server-timeout-huge"),
    E(doc(top="[server]\nheader_timeout = true\n"), "server.header_timeout", "true",
      "must be seconds (a number, or '500ms', '2s')", id="server-header-timeout-bool"),
    E(doc(top='[server]\nkeepalive_timeout = "abc"\n'), "server.keepalive_timeout", "'abc'",
      "must be seconds (a number, or '500ms', '2s')", id="server-keepalive-abc"),
    E(doc(top="[server]\nkeepalive_timeout = -1\n"), "server.keepalive_timeout", "-1",
      "must be at least 0 seconds", id="server-keepalive-negative"),
    E(doc(top="[server]\nlimit_request_line = 10\n"), "server.limit_request_line", "10",
      "must be a whole number from 64 to 1048576", id="server-limit-line"),
    E(doc(top="[server]\nlimit_request_fieldsize = 2000000\n"),
      "server.limit_request_fieldsize", "2000000", "must be a whole number from 64 to 1048576",
      id="server-limit-fieldsize"),
    E(doc(top="[server]\nlimit_request_fields = 1.5\n"), "server.limit_request_fields", "1.5",
      "must be a whole number from 1 to 10000", id="server-limit-fields-float"),
    E(doc(top="[server]\nbusy_poll = -1\n"), "server.busy_poll", "-1",
      "must be a whole number from 0 to 10000", id="server-busy-poll-negative"),
    E(doc(top="[server]\nbusy_poll = 0.5\n"), "server.busy_poll", "0.5",
      "must be a whole number from 0 to 10000", id="server-busy-poll-float"),
    E(doc(top='[server]\nabort_on_close = "yes"\n'), "server.abort_on_close", "'yes'",
      "must be true or false", id="server-abort-on-close-string"),
    E(doc(top="[server]\nlingering_time = -1\n"), "server.lingering_time", "-1",
      "must be at least 0 seconds", id="server-lingering-time-negative"),
    E(doc(top='[server]\nlingering_time = "30 min"\n'), "server.lingering_time", "'30 min'",
      "must be seconds (a number, or '500ms', '2s')", id="server-lingering-time-unit"),
    E(doc(top="[server]\nlingering_timeout = 0\n"), "server.lingering_timeout", "0",
      "must be at least 0.001 seconds", id="server-lingering-timeout-zero"),

    # -- [[listen]] --------------------------------------------------------------
    E(doc(listeners='[[listen]]\nadress = "127.0.0.1"\nport = 8080\n'), "listen[0].adress",
      None, "unknown key (did you mean 'address'?)", id="listen-unknown"),
    E(doc(listeners='[[listen]]\naddress = "127.0.0.1"\n'), "listen[0].port", None,
      "missing (required)", id="listen-missing-port"),
    E(doc(listeners="[[listen]]\nport = 8080\n"), "listen[0].address", None,
      "missing (required)", id="listen-missing-address"),
    E(doc(listeners=LISTEN + 'tls = { cert = "a.pem" }\n'), "listen[0].tls.key", None,
      "missing (required)", id="listen-tls-no-key"),
    E(doc(listeners=LISTEN + 'tls = { cert = "a.pem", key = "a.key", min_version = "1.1" }\n'),
      "listen[0].tls.min_version", "'1.1'", "must be one of: 1.2, 1.3", id="listen-tls-old"),
    E(doc(listeners=LISTEN + 'redirect_to_https = true\n'
          'tls = { cert = "a.pem", key = "a.key" }\n'), "listen[0].redirect_to_https", "true",
      "is for a plain listener", id="listen-tls-redirect"),
    E(doc(listeners=LISTEN + '[[listen.certificate]]\nserver_name = "a"\ncert = "a"\n'
          'key = "b"\n'), "listen[0].certificate", None, "needs a 'tls' table",
      id="listen-certificate-without-tls"),
    E(doc(listeners=listen("localhost")), "listen[0].address", "'localhost'",
      "is not an IP address", id="listen-hostname"),
    E(doc(listeners=listen("300.1.1.1")), "listen[0].address", "'300.1.1.1'",
      "is not an IP address", id="listen-bad-ipv4"),
    E(doc(listeners=listen("127.0.0.1:8080")), "listen[0].address", "'127.0.0.1:8080'",
      "is not an IP address", id="listen-address-with-port"),
    E(doc(listeners='[[listen]]\naddress = 127\nport = 8080\n'), "listen[0].address", "127",
      "must be a string", id="listen-address-type"),
    E(doc(listeners=listen("127.0.0.1", port=0)), "listen[0].port", "0",
      "must be a whole number from 1 to 65535", id="listen-port-0"),
    E(doc(listeners=listen("127.0.0.1", port=65536)), "listen[0].port", "65536",
      "must be a whole number from 1 to 65535", id="listen-port-65536"),
    E(doc(listeners='[[listen]]\naddress = "127.0.0.1"\nport = "8080"\n'), "listen[0].port",
      "'8080'", "must be a whole number from 1 to 65535", id="listen-port-string"),
    E(doc(listeners='[[listen]]\naddress = "127.0.0.1"\nport = true\n'), "listen[0].port",
      "true", "must be a whole number from 1 to 65535", id="listen-port-bool"),
    E(doc(listeners=listen("127.0.0.1", "127.0.0.1")), "listen[1]", "'127.0.0.1:8080'",
      "is already defined by listen[0]", id="listen-duplicate"),
    E(doc(listeners=listen("::1", "0:0::1")), "listen[1]", "'[::1]:8080'",
      "is already defined by listen[0]", id="listen-duplicate-ipv6-spelling"),
    E(doc(listeners=listen("127.0.0.1", "0.0.0.0")), "listen[1]", "'0.0.0.0:8080'",
      "overlaps listen[0] (127.0.0.1:8080)", id="listen-overlap-wildcard-after"),
    E(doc(listeners=listen("0.0.0.0", "127.0.0.2")), "listen[1]", "'127.0.0.2:8080'",
      "overlaps listen[0] (0.0.0.0:8080)", id="listen-overlap-wildcard-before"),
    E(doc(listeners=listen("*", "127.0.0.1")), "listen[1]", "'127.0.0.1:8080'",
      "overlaps listen[0] (*:8080)", id="listen-overlap-star"),
    E(doc(listeners=listen("::", "127.0.0.1")), "listen[1]", "'127.0.0.1:8080'",
      "overlaps listen[0] ([::]:8080)", id="listen-overlap-dual-stack"),
    E(doc(listeners=listen("::", "::1")), "listen[1]", "'[::1]:8080'",
      "overlaps listen[0] ([::]:8080)", id="listen-overlap-ipv6"),
    E(doc(listeners=listen("*", "0.0.0.0")), "listen[1]", "'0.0.0.0:8080'",
      "overlaps listen[0] (*:8080)", id="listen-overlap-two-wildcards"),
    E(doc(vhost='listen = ["127.0.0.2:8080"]\n', listeners=listen("127.0.0.1", "127.0.0.2")),
      "listen[0]", "'127.0.0.1:8080'", "is served by no [[vhost]]", id="listen-unserved"),

    # -- [[vhost]] ---------------------------------------------------------------
    E(doc(vhost="preserve_hosts = true\n"), "vhost[0].preserve_hosts", None,
      "unknown key (did you mean 'preserve_host'?)", id="vhost-unknown"),
    E(doc(vhost="routes = []\n"), "vhost[0].routes", None,
      "unknown key (did you mean 'route'?)", id="vhost-unknown-routes"),
    E(LISTEN + "[[vhost]]\npreserve_host = true\n", "vhost[0].server_name", None,
      "missing (required)", id="vhost-missing-server-name"),
    E(LISTEN + '[[vhost]]\nserver_name = "*.example.com"\n', "vhost[0].server_name",
      "'*.example.com'", "is not a host name", id="vhost-wildcard-server-name"),
    E(LISTEN + '[[vhost]]\nserver_name = "bad name"\n', "vhost[0].server_name", "'bad name'",
      "is not a host name", id="vhost-bad-server-name"),
    E(LISTEN + "[[vhost]]\nserver_name = 5\n", "vhost[0].server_name", "5",
      "must be a string", id="vhost-server-name-type"),
    E(doc(vhost='server_alias = ["www.example.com", "bad name"]\n'), "vhost[0].server_alias[1]",
      "'bad name'", "is not a host name, or '*.domain'", id="vhost-bad-alias"),
    E(doc(vhost="server_alias = 5\n"), "vhost[0].server_alias", "5",
      "must be a string or a list of strings", id="vhost-alias-type"),
    E(doc(vhost='listen = ["127.0.0.1:9090"]\n'), "vhost[0].listen[0]", "'127.0.0.1:9090'",
      "names no [[listen]] (defined: 127.0.0.1:8080)", id="vhost-listen-unknown"),
    E(doc(vhost='listen = ["localhost:8080"]\n'), "vhost[0].listen[0]", "'localhost:8080'",
      "must be 'ADDRESS:PORT'", id="vhost-listen-hostname"),
    E(doc(vhost='listen = ["127.0.0.1"]\n'), "vhost[0].listen[0]", "'127.0.0.1'",
      "must be 'ADDRESS:PORT'", id="vhost-listen-no-port"),
    E(doc(vhost='listen = ["127.0.0.1:8080", 8080]\n'), "vhost[0].listen", None,
      "must be a string or a list of strings", id="vhost-listen-type"),
    E(doc(vhost='preserve_host = "yes"\n'), "vhost[0].preserve_host", "'yes'",
      "must be true or false", id="vhost-preserve-host-type"),
    E(doc(vhost="add_headers = 1\n"), "vhost[0].add_headers", "1", "must be true or false",
      id="vhost-add-headers-type"),
    E(doc(vhost='proxy_chain_auth = "on"\n'), "vhost[0].proxy_chain_auth", "'on'",
      "must be true or false", id="vhost-chain-auth-type"),
    E(doc(vhost='proxy_via = "maybe"\n'), "vhost[0].proxy_via", "'maybe'",
      "must be one of: off, on, full, block", id="vhost-proxy-via"),
    E(doc(vhost='allow_encoded_slashes = "decode"\n'), "vhost[0].allow_encoded_slashes",
      "'decode'", "must be one of: off, on, nodecode", id="vhost-allow-encoded-slashes"),
    E(doc(vhost='allow_encoded_slashes = true\n'), "vhost[0].allow_encoded_slashes",
      "true", "must be a string", id="vhost-allow-encoded-slashes-type"),
    E(doc(vhost="route = 5\n"), "vhost[0].route", "5", "must be an array of tables",
      id="vhost-route-type"),

    # -- header actions ------------------------------------------------------------
    E(doc(ROUTE, vhost='request_headers = [{ action = "replace", name = "X-A", value = "1" }]\n'),
      "vhost[0].request_headers[0].action", "'replace'", "must be one of: set, add, unset",
      id="header-bad-action"),
    E(doc(ROUTE, vhost='response_headers = [{ action = "set", name = "Bad Name", value = "1" }]\n'),
      "vhost[0].response_headers[0].name", "'Bad Name'", "is not a valid header name",
      id="header-bad-name"),
    E(doc(ROUTE, vhost='request_headers = [{ action = "set", name = "X-A" }]\n'),
      "vhost[0].request_headers[0].value", None, "missing (required for 'set')",
      id="header-set-without-value"),
    E(doc(ROUTE, vhost='response_headers = [{ action = "add", name = "X-A" }]\n'),
      "vhost[0].response_headers[0].value", None, "missing (required for 'add')",
      id="header-add-without-value"),
    E(doc(ROUTE, vhost='request_headers = [{ action = "set", name = "X-A", '
                       'value = "a\\r\\nb" }]\n'),
      "vhost[0].request_headers[0].value", r"'a\r\nb'", "must not contain CR, LF or NUL",
      id="header-value-crlf"),
    E(doc(ROUTE, vhost='request_headers = [{ action = "set", name = "X-A", '
                       'value = "a\\u0000" }]\n'),
      "vhost[0].request_headers[0].value", r"'a\x00'", "must not contain CR, LF or NUL",
      id="header-value-nul"),
    E(doc(ROUTE, vhost='request_headers = [{ action = "set", name = "X-A", valeu = "1" }]\n'),
      "vhost[0].request_headers[0].valeu", None, "unknown key (did you mean 'value'?)",
      id="header-unknown-key"),
    E(doc(ROUTE, vhost='request_headers = [{ name = "X-A", value = "1" }]\n'),
      "vhost[0].request_headers[0].action", None, "missing (required)",
      id="header-missing-action"),
    E(doc(ROUTE, vhost='request_headers = [{ action = "unset" }]\n'),
      "vhost[0].request_headers[0].name", None, "missing (required)",
      id="header-missing-name"),
    E(doc(ROUTE, vhost='response_headers = [{ action = "set", name = "X-A", value = "1", '
                       'always = "yes" }]\n'),
      "vhost[0].response_headers[0].always", "'yes'", "must be true or false",
      id="header-always-type"),
    E(doc(ROUTE, vhost="request_headers = 5\n"), "vhost[0].request_headers", "5",
      "must be an array of tables", id="header-list-type"),
    E(doc(ROUTE, ROUTE + '\nresponse_headers = [{ action = "drop", name = "Server" }]'),
      "vhost[0].route[1].response_headers[0].action", "'drop'",
      "must be one of: set, add, unset", id="route-header-bad-action"),
    E(doc(ROUTE + '\nrequest_headers = [{ action = "set", name = "X:A", value = "1" }]'),
      "vhost[0].route[0].request_headers[0].name", "'X:A'", "is not a valid header name",
      id="route-header-bad-name"),

    # -- [[vhost.route]] -----------------------------------------------------------
    E(doc(ROUTE + "\nrevers = true"), "vhost[0].route[0].revers", None,
      "unknown key (did you mean 'reverse'?)", id="route-unknown"),
    E(doc(ROUTE + "\nconnecttimeout = 5"), "vhost[0].route[0].connecttimeout", None,
      "unknown key (did you mean 'connectiontimeout'?)", id="route-unknown-worker-key"),
    E(doc('url = "http://127.0.0.1:8081/"'), "vhost[0].route[0]", None,
      "needs exactly one of 'path' or 'regex'", id="route-no-path-or-regex"),
    E(doc('path = "/"\nregex = "^/"\nurl = "http://127.0.0.1:8081/"'), "vhost[0].route[0]",
      None, "needs exactly one of 'path' or 'regex'", id="route-path-and-regex"),
    E(doc(ROUTE + "\nexclude = true"), "vhost[0].route[0].url", "'http://127.0.0.1:8081/'",
      "makes no sense with exclude = true", id="route-url-with-exclude"),
    E(doc('path = "/"'), "vhost[0].route[0]", None, "needs 'url' (or exclude = true)",
      id="route-missing-url"),
    E(doc('path = "/"\nexclude = false'), "vhost[0].route[0]", None,
      "needs 'url' (or exclude = true)", id="route-missing-url-exclude-false"),
    E(doc('path = "x"\nurl = "http://h/"'), "vhost[0].route[0].path", "'x'",
      "must start with '/'", id="route-path-relative"),
    E(doc('path = 5\nurl = "http://h/"'), "vhost[0].route[0].path", "5", "must be a string",
      id="route-path-type"),
    E(doc('regex = "("\nurl = "http://h/"'), "vhost[0].route[0].regex", "'('",
      "is not a valid regular expression", id="route-bad-regex"),
    E(doc('regex = "^/a/(.*)$"\nurl = "http://h/$2"'), "vhost[0].route[0].url",
      "'http://h/$2'", "uses $2 but the regex has 1 group(s)", id="route-group-beyond"),
    E(doc('regex = "^/a/(.*)$"\nurl = "http://h/x?q=$3"'), "vhost[0].route[0].url",
      "'http://h/x?q=$3'", "uses $3 but the regex has 1 group(s)", id="route-group-in-query"),
    E(doc('path = "/"\nurl = "http://h/$1"'), "vhost[0].route[0].url", "'http://h/$1'",
      "uses $1 but the regex has 0 group(s)", id="route-group-on-path-route"),
    E(doc('regex = "^/(.*)$"\nurl = "http://$1/"'), "vhost[0].route[0].url", "'http://$1/'",
      "must not substitute $N into the scheme or host", id="route-group-in-host"),
    E(doc('regex = "^/a/(.*)$"\nurl = "http://h/$1"\nreverse = true'),
      "vhost[0].route[0].reverse", "true", "needs a 'path' route with a 'url'",
      id="route-reverse-on-regex"),
    E(doc('path = "/x"\nexclude = true\nreverse = true'), "vhost[0].route[0].reverse", "true",
      "needs a 'path' route with a 'url'", id="route-reverse-on-exclude"),
    E(doc(ROUTE + '\nexclude = "yes"'), "vhost[0].route[0].exclude", "'yes'",
      "must be true or false", id="route-exclude-type"),
    E(doc(ROUTE + "\nreverse = 1"), "vhost[0].route[0].reverse", "1", "must be true or false",
      id="route-reverse-type"),
    # url
    E(doc('path = "/"\nurl = "ftp://h/"'), "vhost[0].route[0].url", "'ftp://h/'",
      "is not an http, https, ws, wss or balancer URL", id="url-ftp"),
    E(doc('path = "/"\nurl = "127.0.0.1:8081"'), "vhost[0].route[0].url", "'127.0.0.1:8081'",
      "is not an http, https, ws, wss or balancer URL", id="url-no-scheme"),
    E(doc('path = "/"\nurl = "http://h:99999/"'), "vhost[0].route[0].url", "'http://h:99999/'",
      "is not an http, https, ws, wss or balancer URL", id="url-port-out-of-range"),
    E(doc('path = "/"\nurl = 5'), "vhost[0].route[0].url", "5", "must be a string",
      id="url-type"),
    E(doc('path = "/"\nurl = "http:///x"'), "vhost[0].route[0].url", "'http:///x'",
      "has no host", id="url-no-host"),
    E(doc('path = "/"\nurl = "http://u:p@h/"'), "vhost[0].route[0].url", "'http://u:p@h/'",
      "must not contain a fragment or user:password@", id="url-userinfo"),
    E(doc('path = "/"\nurl = "http://h/#top"'), "vhost[0].route[0].url", "'http://h/#top'",
      "must not contain a fragment or user:password@", id="url-fragment"),
    E(doc('path = "/"\nurl = "balancer://nope/"'), "vhost[0].route[0].url",
      "'balancer://nope/'", "names an undefined balancer (none defined)",
      id="url-undefined-balancer"),
    E(doc(ROUTE, 'path = "/b"\nurl = "balancer://nope/"', after=balancer(name="app")),
      "vhost[0].route[1].url", "'balancer://nope/'", "names an undefined balancer (app)",
      id="url-undefined-balancer-others-defined"),
    E(doc('path = "/"\nurl = "balancer://app:80/"', after=balancer()), "vhost[0].route[0].url",
      "'balancer://app:80/'", "must be balancer://NAME/path (no port)", id="url-balancer-port"),
    # match_headers, cookie rewriting
    E(doc(ROUTE + '\nmatch_headers = { "Bad Name" = "x" }'), "vhost[0].route[0].match_headers",
      "'Bad Name'", "is not a valid header name", id="match-headers-bad-name"),
    E(doc(ROUTE + '\nmatch_headers = { "User-Agent" = "(" }'),
      "vhost[0].route[0].match_headers.User-Agent", "'('", "is not a valid regular expression",
      id="match-headers-bad-regex"),
    E(doc(ROUTE + "\nmatch_headers = { X-A = 5 }"), "vhost[0].route[0].match_headers.X-A", "5",
      "must be a string", id="match-headers-value-type"),
    E(doc(ROUTE + '\nmatch_headers = "msie"'), "vhost[0].route[0].match_headers", "'msie'",
      "must be a table", id="match-headers-type"),
    E(doc(ROUTE + '\ncookie_domain = { "backend.local" = 5 }'),
      'vhost[0].route[0].cookie_domain."backend.local"', "5", "must be a string",
      id="cookie-domain-value-type"),
    E(doc(ROUTE + "\ncookie_path = 5"), "vhost[0].route[0].cookie_path", "5",
      "must be a table", id="cookie-path-type"),
    # worker parameters on a route
    E(doc(ROUTE + '\ntimeout = "abc"'), "vhost[0].route[0].timeout", "'abc'",
      "must be seconds (a number, or '500ms', '2s')", id="duration-abc"),
    E(doc(ROUTE + '\nconnectiontimeout = "5 minutes"'), "vhost[0].route[0].connectiontimeout",
      "'5 minutes'", "must be seconds (a number, or '500ms', '2s')", id="duration-minutes"),
    E(doc(ROUTE + '\nttl = "-1"'), "vhost[0].route[0].ttl", "'-1'", "must be seconds",
      id="duration-negative-string"),
    E(doc(ROUTE + "\nping = true"), "vhost[0].route[0].ping", "true", "must be seconds",
      id="duration-bool"),
    E(doc(ROUTE + "\nretry = [1]"), "vhost[0].route[0].retry", "[1]", "must be seconds",
      id="duration-list"),
    E(doc(ROUTE + "\ntimeout = 0"), "vhost[0].route[0].timeout", "0",
      "must be at least 0.001 seconds", id="duration-timeout-zero"),
    E(doc(ROUTE + "\nttl = -1"), "vhost[0].route[0].ttl", "-1",
      "must be at least 0.001 seconds", id="duration-ttl-negative"),
    E(doc(ROUTE + '\nacquire = "0ms"'), "vhost[0].route[0].acquire", "'0ms'",
      "must be at least 0.001 seconds", id="duration-acquire-zero"),
    E(doc(ROUTE + "\nretry = -1"), "vhost[0].route[0].retry", "-1",
      "must be at least 0 seconds", id="duration-retry-negative"),
    E(doc(ROUTE + "\nconnectiontimeout = 1e9"), "vhost[0].route[0].connectiontimeout",
      "1000000000.0",
      "is longer than a year", id="duration-too-long"),
    E(doc(ROUTE + "\nmax = 5\nsmax = 10"), "vhost[0].route[0].smax", "10",
      "must not exceed max (5)", id="smax-over-max"),
    E(doc(ROUTE + "\nmax = 0"), "vhost[0].route[0].max", "0",
      "must be a whole number from 1 to 100000", id="max-zero"),
    E(doc(ROUTE + "\nsmax = -1"), "vhost[0].route[0].smax", "-1",
      "must be a whole number from 0 to 100000", id="smax-negative"),
    E(doc(ROUTE + '\nmax = "10"'), "vhost[0].route[0].max", "'10'",
      "must be a whole number from 1 to 100000", id="max-string"),
    E(doc(ROUTE + '\ndisablereuse = "on"'), "vhost[0].route[0].disablereuse", "'on'",
      "must be true or false", id="disablereuse-type"),
    E(doc(ROUTE + "\nkeepalive = 1"), "vhost[0].route[0].keepalive", "1",
      "must be true or false", id="keepalive-type"),
    E(doc(ROUTE + "\nupgrade = 5"), "vhost[0].route[0].upgrade", "5", "must be a string",
      id="upgrade-type"),
    E(doc(ROUTE + "\nresponse_field_size = 100"), "vhost[0].route[0].response_field_size",
      "100", "must be a whole number from 256 to 16777216", id="response-field-size-small"),
    E(doc(ROUTE + '\nresponse_field_size = "8k"'), "vhost[0].route[0].response_field_size",
      "'8k'", "must be a whole number from 256 to 16777216", id="response-field-size-string"),
    E(doc(ROUTE + "\nresponse_head_size = 1e6"), "vhost[0].route[0].response_head_size",
      "1000000.0", "must be a whole number from 256 to 67108864",
      id="response-head-size-float"),
    E(doc(ROUTE + "\nresponse_head_size = 4096"), "vhost[0].route[0].response_head_size",
      "4096", "must not be less than response_field_size (8192)",
      id="response-head-below-field"),

    # -- [balancer.NAME] -----------------------------------------------------------
    E(doc(ROUTE, after=balancer(name="IIS")), "balancer.IIS", "'IIS'",
      "is not a valid balancer name", id="balancer-name-upper"),
    E(doc(ROUTE, after=balancer(name='"my.pool"')), 'balancer."my.pool"', "'my.pool'",
      "is not a valid balancer name", id="balancer-name-dot"),
    E(doc(ROUTE, after="[balancer]\napp = 5\n"), "balancer.app", "5", "must be a table",
      id="balancer-entry-type"),
    E(bal_doc('lbmethd = "bytraffic"'), "balancer.app.lbmethd", None,
      "unknown key (did you mean 'lbmethod'?)", id="balancer-unknown"),
    E(bal_doc("members = []"), "balancer.app.members", None,
      "unknown key (did you mean 'member'?)", id="balancer-unknown-members"),
    E(doc('path = "/"\nurl = "balancer://app/"', after='[balancer.app]\nlbmethod = "byrequests"\n'),
      "balancer.app.member", None, "missing (required)", id="balancer-no-member"),
    E(doc('path = "/"\nurl = "balancer://app/"', after="[balancer.app]\nmember = []\n"),
      "balancer.app.member", "[]", "must list at least one member", id="balancer-empty-member"),
    E(doc('path = "/"\nurl = "balancer://app/"', after="[balancer.app]\nmember = 5\n"),
      "balancer.app.member", "5", "must be an array of tables", id="balancer-member-type"),
    E(bal_doc('lbmethod = "roundrobin"'), "balancer.app.lbmethod", "'roundrobin'",
      "must be one of: byrequests, bytraffic, bybusyness", id="lbmethod-unknown"),
    E(bal_doc('lbmethod = "heartbeat"'), "balancer.app.lbmethod", "'heartbeat'",
      "must be one of: byrequests, bytraffic, bybusyness", id="lbmethod-heartbeat"),
    E(bal_doc("lbmethod = 1"), "balancer.app.lbmethod", "1", "must be a string",
      id="lbmethod-type"),
    E(bal_doc('stickysessionsep = "::"'), "balancer.app.stickysessionsep", "'::'",
      "must be one character or 'Off'", id="stickysessionsep-long"),
    E(bal_doc('stickysessionsep = ""'), "balancer.app.stickysessionsep", "''",
      "must be one character or 'Off'", id="stickysessionsep-empty"),
    E(bal_doc("stickysessionsep = 1"), "balancer.app.stickysessionsep", "1",
      "must be a string", id="stickysessionsep-type"),
    E(bal_doc('stickysession = "bad name"'), "balancer.app.stickysession", "'bad name'",
      "must be NAME or COOKIE|PARAM", id="stickysession-space"),
    E(bal_doc('stickysession = "JSESSIONID|"'), "balancer.app.stickysession", "'JSESSIONID|'",
      "must be NAME or COOKIE|PARAM", id="stickysession-empty-param"),
    E(bal_doc('stickysession = "a;b"'), "balancer.app.stickysession", "'a;b'",
      "must be NAME or COOKIE|PARAM", id="stickysession-semicolon"),
    E(bal_doc('sticky_cookie = { path = "/" }'), "balancer.app.sticky_cookie.name", None,
      "missing (required)", id="sticky-cookie-no-name"),
    E(bal_doc('sticky_cookie = { name = "ROUTEID", domain = "x" }'),
      "balancer.app.sticky_cookie.domain", None, "unknown key", id="sticky-cookie-unknown"),
    E(bal_doc('sticky_cookie = { name = "a b" }'), "balancer.app.sticky_cookie.name", "'a b'",
      "is not a valid cookie name", id="sticky-cookie-bad-name"),
    E(bal_doc('sticky_cookie = { name = "ROUTEID", path = 5 }'),
      "balancer.app.sticky_cookie.path", "5", "must be a string", id="sticky-cookie-path-type"),
    E(bal_doc('sticky_cookie = "ROUTEID"'), "balancer.app.sticky_cookie", "'ROUTEID'",
      "must be a table", id="sticky-cookie-type"),
    E(bal_doc("maxattempts = 101"), "balancer.app.maxattempts", "101",
      "must be a whole number from 0 to 100", id="maxattempts-range"),
    E(bal_doc('timeout = "abc"'), "balancer.app.timeout", "'abc'", "must be seconds",
      id="balancer-timeout"),
    E(bal_doc("failonstatus = [503, 600]"), "balancer.app.failonstatus[1]", "600",
      "must be a whole number from 100 to 599", id="failonstatus-range"),
    E(bal_doc('failonstatus = ["503"]'), "balancer.app.failonstatus[0]", "'503'",
      "must be a whole number from 100 to 599", id="failonstatus-type"),
    E(bal_doc('nofailover = "yes"'), "balancer.app.nofailover", "'yes'",
      "must be true or false", id="nofailover-type"),
    E(bal_doc("scolonpathdelim = 1"), "balancer.app.scolonpathdelim", "1",
      "must be true or false", id="scolonpathdelim-type"),
    E(bal_doc('failontimeout = "on"'), "balancer.app.failontimeout", "'on'",
      "must be true or false", id="failontimeout-type"),
    E(bal_doc('forcerecovery = "off"'), "balancer.app.forcerecovery", "'off'",
      "must be true or false", id="forcerecovery-type"),

    # -- [[balancer.NAME.member]] ----------------------------------------------------
    E(member_doc("loadfator = 2"), "balancer.app.member[0].loadfator", None,
      "unknown key (did you mean 'loadfactor'?)", id="member-unknown"),
    E(member_doc('hcmetod = "GET"'), "balancer.app.member[0].hcmetod", None,
      "unknown key (did you mean 'hcmethod'?)", id="member-unknown-hc"),
    E(bal_doc(members=('route = "node1"',)), "balancer.app.member[0].url", None,
      "missing (required)", id="member-missing-url"),
    E(bal_doc(members=('url = "balancer://app/"',)), "balancer.app.member[0].url",
      "'balancer://app/'", "is not an http, https, ws or wss URL", id="member-balancer-url"),
    E(bal_doc(members=('url = "htp://127.0.0.1:8101"',)), "balancer.app.member[0].url",
      "'htp://127.0.0.1:8101'", "is not an http, https, ws or wss URL", id="member-bad-scheme"),
    E(bal_doc(members=('url = "http://127.0.0.1:8101/$1"',)), "balancer.app.member[0].url",
      "'http://127.0.0.1:8101/$1'", "uses $1 but the regex has 0 group(s)",
      id="member-group-ref"),
    E(member_doc('status = "+X"'), "balancer.app.member[0].status", "'+X'",
      "must be flags D, S, I, H, R, E, N or C, each optionally after + or -", id="status-unknown"),
    E(member_doc('status = "H+"'), "balancer.app.member[0].status", "'H+'",
      "must be flags D, S, I, H, R, E, N or C", id="status-trailing-sign"),
    E(member_doc('status = "hot"'), "balancer.app.member[0].status", "'hot'",
      "must be flags D, S, I, H, R, E, N or C", id="status-word"),
    E(member_doc("status = 1"), "balancer.app.member[0].status", "1", "must be a string",
      id="status-type"),
    E(member_doc(f'route = "{"n" * 64}"'), "balancer.app.member[0].route", f"'{'n' * 64}'",
      "must be a token of at most 63 characters", id="member-route-too-long"),
    E(member_doc('route = "node 1"'), "balancer.app.member[0].route", "'node 1'",
      "must be a token of at most 63 characters", id="member-route-space"),
    E(member_doc('route = "node1"\nredirect = "node9"'), "balancer.app.member[0].redirect",
      "'node9'", "names no member's route", id="redirect-unknown"),
    E(member_doc('redirect = "node2"', extra_members=(MEMBER + '\nredirect = "node1"',)),
      "balancer.app.member[0].redirect", "'node2'", "names no member's route",
      id="redirect-no-routes"),
    E(member_doc("loadfactor = 0"), "balancer.app.member[0].loadfactor", "0",
      "must be a number from 1 to 100", id="loadfactor-zero"),
    E(member_doc("loadfactor = 100.5"), "balancer.app.member[0].loadfactor", "100.5",
      "must be a number from 1 to 100", id="loadfactor-over"),
    E(member_doc('loadfactor = "2"'), "balancer.app.member[0].loadfactor", "'2'",
      "must be a number from 1 to 100", id="loadfactor-string"),
    E(member_doc("lbset = 100"), "balancer.app.member[0].lbset", "100",
      "must be a whole number from 0 to 99", id="lbset-range"),
    E(member_doc('hcmethod = "POST"'), "balancer.app.member[0].hcmethod", "'POST'",
      "must be one of: NONE, TCP, OPTIONS, HEAD, GET", id="hcmethod-unknown"),
    E(member_doc('hcinterval = "50ms"'), "balancer.app.member[0].hcinterval", "'50ms'",
      "must be at least 0.1 seconds", id="hcinterval-too-short"),
    E(member_doc('hcinterval = "often"'), "balancer.app.member[0].hcinterval", "'often'",
      "must be seconds", id="hcinterval-abc"),
    E(member_doc("hcpasses = 0"), "balancer.app.member[0].hcpasses", "0",
      "must be a whole number from 1 to 1000", id="hcpasses-zero"),
    E(member_doc("hcfails = 1001"), "balancer.app.member[0].hcfails", "1001",
      "must be a whole number from 1 to 1000", id="hcfails-range"),
    E(member_doc("hcuri = 5"), "balancer.app.member[0].hcuri", "5", "must be a string",
      id="hcuri-type"),
    E(member_doc("hcexpect = [200]"), "balancer.app.member[0].hcexpect", "[200]",
      "must be [LOW, HIGH] status codes", id="hcexpect-one"),
    E(member_doc("hcexpect = [399, 200]"), "balancer.app.member[0].hcexpect", "[399, 200]",
      "must be [LOW, HIGH] status codes", id="hcexpect-reversed"),
    E(member_doc("hcexpect = [200, 600]"), "balancer.app.member[0].hcexpect", "[200, 600]",
      "must be [LOW, HIGH] status codes", id="hcexpect-range"),
    E(member_doc('hcexpect = "200-399"'), "balancer.app.member[0].hcexpect", "'200-399'",
      "must be [LOW, HIGH] status codes", id="hcexpect-string"),
    E(member_doc("hcexpect = [200.0, 399]"), "balancer.app.member[0].hcexpect", "[200.0, 399]",
      "must be [LOW, HIGH] status codes", id="hcexpect-float"),
    E(member_doc("max = 2\nsmax = 3"), "balancer.app.member[0].smax", "3",
      "must not exceed max (2)", id="member-smax-over-max"),
    E(member_doc("response_field_size = 0"), "balancer.app.member[0].response_field_size",
      "0", "must be a whole number from 256 to 16777216", id="member-response-field-size"),
    E(member_doc('timeout = "abc"'), "balancer.app.member[0].timeout", "'abc'",
      "must be seconds", id="member-timeout-abc"),
    E(member_doc("retry = false"), "balancer.app.member[0].retry", "false", "must be seconds",
      id="member-retry-bool"),
]


@pytest.mark.parametrize("text, where, value, problem", ERRORS)
def test_error(text, where, value, problem):
    msg = fails(text)
    head = f"{SITE}: {where}: "
    assert msg.startswith(head), msg
    if value is not None:
        assert msg.startswith(f"{head}{value} "), msg
    assert problem in msg, msg


def test_error_names_the_file_it_was_given():
    msg = fails(doc(ROUTE + "\ntimeout = 0"), path="/etc/twistproxy/prod.toml")
    assert msg.startswith("/etc/twistproxy/prod.toml: vhost[0].route[0].timeout: 0 ")


def test_bad_scheme_exact_message():
    text = doc(ROUTE, 'path = "/a"\nurl = "http://127.0.0.1:8082/"', 'path = "/b"\nurl = "htp://x"')
    assert fails(text) == ("etc/site.toml: vhost[0].route[2].url: 'htp://x' is not an http, "
                           "https, ws, wss or balancer URL")


def test_route_index_counts_per_vhost():
    text = (LISTEN + VHOST + f"[[vhost.route]]\n{ROUTE}\n"
            + '[[vhost]]\nserver_name = "other"\n'
            + f"[[vhost.route]]\n{ROUTE}\n[[vhost.route]]\npath = \"/\"\nurl = \"gopher://x\"\n")
    assert fails(text).startswith(f"{SITE}: vhost[1].route[1].url: 'gopher://x' is not an ")


@pytest.mark.parametrize("text, line", [
    ("[[listen]\n", "line 1"),
    (LISTEN + "[[vhost]]\nserver_name = \n", "line 5"),
    (LISTEN + '[[vhost]]\nserver_name = "a\n', "line 5"),
    (LISTEN + LISTEN.replace("[[listen]]", "[listen]"), "line 4"),
], ids=["bad-header", "no-value", "unterminated-string", "table-vs-array"])
def test_invalid_toml(text, line):
    msg = fails(text)
    assert msg.startswith(f"{SITE}: not valid TOML: "), msg
    assert line in msg, msg


def test_member_route_used_twice():
    msg = fails(member_doc('route = "node1"', extra_members=(MEMBER + '\nroute = "node1"',)))
    # Either member may be named; the path, value and problem must be there.
    assert msg.startswith(f"{SITE}: balancer.app.member["), msg
    assert "].route: 'node1' is already the route of member[0]" in msg, msg


def test_error_value_with_quote_and_control_characters_stays_one_line():
    msg = fails(doc('path = "/"\nurl = "h\\ttp://it\'s\\nhere"'))
    assert msg.startswith(f"{SITE}: vhost[0].route[0].url: "), msg
    assert "is not an http, https, ws, wss or balancer URL" in msg


def test_long_list_value_is_shortened():
    msg = fails(f"listen = [{', '.join(['1'] * 100)}]\n" + VHOST)
    assert msg.startswith(f"{SITE}: listen: [1, 1, "), msg
    assert "..." in msg and len(msg) < 200, msg


# ---------------------------------------------------------------------------
# values that load


@pytest.mark.parametrize("written, seconds", [
    ('"500ms"', 0.5), ('"2s"', 2.0), ("2", 2.0), ("1.5", 1.5), ('"2"', 2.0),
    ('"0.25s"', 0.25), ('" 250 ms "', 0.25), ('"1ms"', 0.001), ("86400", 86400.0),
])
def test_duration_accepted(written, seconds):
    cfg = ok(doc(ROUTE + f"\ntimeout = {written}\nttl = {written}\nacquire = {written}\n"
                 f"connectiontimeout = {written}\nretry = {written}\nping = {written}"))
    w = cfg.vhosts[0].routes[0].worker
    assert (w.timeout, w.ttl, w.acquire, w.connectiontimeout, w.retry, w.ping) == (seconds,) * 6
    assert all(isinstance(x, float) for x in (w.timeout, w.retry))


def test_durations_everywhere():
    cfg = ok(bal_doc('timeout = "1500ms"',
                     members=(MEMBER + '\nhcinterval = "100ms"\ntimeout = "2s"\nretry = 0',),
                     top='[server]\ntimeout = "90s"\nkeepalive_timeout = 0\n'
                         'header_timeout = "500ms"\n'))
    assert (cfg.server.timeout, cfg.server.keepalive_timeout, cfg.server.header_timeout) == \
        (90.0, 0.0, 0.5)
    bal = cfg.balancers["app"]
    assert bal.timeout == 1.5
    m = bal.members[0]
    assert (m.hcinterval, m.worker.timeout, m.worker.retry) == (0.1, 2.0, 0.0)


def test_close_settings():
    cfg = ok(doc(ROUTE, top='[server]\nabort_on_close = true\nlingering_time = 0\n'
                            'lingering_timeout = "250ms"\n'))
    assert (cfg.server.abort_on_close, cfg.server.lingering_time,
            cfg.server.lingering_timeout) == (True, 0.0, 0.25)


def test_defaults():
    cfg = ok(doc(ROUTE, after=balancer()))
    assert cfg.server == ServerConfig()
    assert cfg.server.access_log == "-" and cfg.server.server_tokens == "prod"
    assert (cfg.server.timeout, cfg.server.keepalive_timeout, cfg.server.header_timeout) == \
        (60.0, 5.0, 20.0)
    assert (cfg.server.limit_request_line, cfg.server.limit_request_fieldsize,
            cfg.server.limit_request_fields) == (8190, 8190, 100)
    assert cfg.server.busy_poll == 100
    assert ok(doc(ROUTE, top="[server]\nbusy_poll = 0\n")).server.busy_poll == 0
    # a client's FIN: answer, then close (HAProxy's default); lingering as nginx's
    assert (cfg.server.abort_on_close, cfg.server.lingering_time,
            cfg.server.lingering_timeout) == (False, 30.0, 5.0)
    v = cfg.vhosts[0]
    assert v == VhostConfig("localhost", routes=v.routes)
    assert (v.preserve_host, v.add_headers, v.proxy_via, v.proxy_chain_auth,
            v.allow_encoded_slashes) == (False, True, "off", False, "off")
    r = v.routes[0]
    assert r.worker == WorkerParams()
    assert (r.worker.max, r.worker.smax, r.worker.ttl, r.worker.acquire,
            r.worker.connectiontimeout, r.worker.timeout) == (None,) * 6
    assert (r.worker.disablereuse, r.worker.keepalive, r.worker.retry, r.worker.ping,
            r.worker.upgrade) == (False, False, 60.0, 0.0, "")
    assert (r.exclude, r.reverse, r.match_headers, r.cookie_domain, r.cookie_path,
            r.request_headers, r.response_headers) == (False, False, (), (), (), (), ())
    b = cfg.balancers["app"]
    assert (b.lbmethod, b.stickysession, b.stickysessionsep, b.scolonpathdelim, b.nofailover,
            b.maxattempts, b.timeout, b.failonstatus, b.failontimeout, b.forcerecovery,
            b.sticky_cookie) == ("byrequests", "", ".", False, False, None, 0.0, (), False,
                                 True, ())
    m = b.members[0]
    assert m == MemberConfig(url=m.url)
    assert (m.route, m.loadfactor, m.lbset, m.status, m.redirect, m.hcmethod, m.hcuri,
            m.hcinterval, m.hcpasses, m.hcfails, m.hcexpect) == \
        ("", 1.0, 0, "", "", "NONE", "", 30.0, 1, 1, (200, 399))


def test_worker_params_on_route():
    cfg = ok(doc(ROUTE + '\nmax = 10\nsmax = 10\nttl = 60\nacquire = "500ms"\n'
                 'connectiontimeout = 3\ntimeout = 30\ndisablereuse = true\nkeepalive = true\n'
                 'retry = 0\nping = "250ms"\nupgrade = "websocket"'))
    assert cfg.vhosts[0].routes[0].worker == WorkerParams(
        max=10, smax=10, ttl=60.0, acquire=0.5, connectiontimeout=3.0, timeout=30.0,
        disablereuse=True, keepalive=True, retry=0.0, ping=0.25, upgrade="websocket")


def test_response_head_limits_default_and_per_route_and_member():
    w = ok(doc(ROUTE)).vhosts[0].routes[0].worker
    assert (w.response_field_size, w.response_head_size) == (8192, 65536)
    w = ok(doc(ROUTE + "\nresponse_field_size = 16384\nresponse_head_size = 16384")
           ).vhosts[0].routes[0].worker
    assert (w.response_field_size, w.response_head_size) == (16384, 16384)
    m = ok(member_doc("response_field_size = 512")).balancers["app"].members[0].worker
    assert (m.response_field_size, m.response_head_size) == (512, 65536)


def test_smax_without_max_and_zero_smax():
    w = ok(doc(ROUTE + "\nsmax = 0")).vhosts[0].routes[0].worker
    assert (w.max, w.smax) == (None, 0)


@pytest.mark.parametrize("written, mode", [("off", "off"), ("On", "on"),
                                           ("NoDecode", "nodecode")])
def test_allow_encoded_slashes_modes(written, mode):
    cfg = ok(doc(ROUTE, vhost=f'allow_encoded_slashes = "{written}"\n'))
    assert cfg.vhosts[0].allow_encoded_slashes == mode


def test_choices_are_case_insensitive_and_normalised():
    cfg = ok(bal_doc('lbmethod = "ByBusyness"',
                     members=(MEMBER + '\nhcmethod = "get"\nstatus = "+h-e"',),
                     top='[server]\nserver_tokens = "Off"\n', vhost='proxy_via = "Full"\n')
             .replace('server_name = "localhost"', 'server_name = "WWW.Example.COM."'))
    assert cfg.server.server_tokens == "off"
    assert cfg.vhosts[0].server_name == "www.example.com"
    assert cfg.vhosts[0].proxy_via == "full"
    assert cfg.balancers["app"].lbmethod == "bybusyness"
    m = cfg.balancers["app"].members[0]
    assert (m.hcmethod, m.status) == ("GET", "+H-E")


@pytest.mark.parametrize("status", ["", "H", "+H", "-I", "S-E", "D", "N", "C", "+D+S-I",
                                    "e"])
def test_status_flags_accepted(status):
    m = ok(member_doc(f'status = "{status}"')).balancers["app"].members[0]
    assert m.status == status.upper()


def test_sticky_sessions():
    cfg = ok(bal_doc('stickysession = "JSESSIONID|jsessionid"\nstickysessionsep = "~"\n'
                     'scolonpathdelim = true\nnofailover = true\nmaxattempts = 0\n'
                     'failonstatus = 503\nfailontimeout = true\nforcerecovery = false\n'
                     'sticky_cookie = { name = "ROUTEID" }',
                     members=(MEMBER + '\nroute = "node1"',
                              'url = "http://127.0.0.1:8102"\nroute = "node2"\n'
                              'redirect = "node1"\nloadfactor = 2.5\nlbset = 1\n'
                              'hcexpect = [200, 299]')))
    b = cfg.balancers["app"]
    assert b.name == "app"
    assert (b.stickysession, b.stickysessionsep, b.scolonpathdelim, b.nofailover,
            b.maxattempts, b.failonstatus, b.failontimeout, b.forcerecovery) == \
        ("JSESSIONID|jsessionid", "~", True, True, 0, (503,), True, False)
    assert b.sticky_cookie == (("name", "ROUTEID"), ("path", "/"))
    assert [m.route for m in b.members] == ["node1", "node2"]
    m2 = b.members[1]
    assert (m2.redirect, m2.loadfactor, m2.lbset, m2.hcexpect) == ("node1", 2.5, 1, (200, 299))


@pytest.mark.parametrize("written, sep", [('"Off"', ""), ('"off"', ""), ('"."', "."),
                                          ('"_"', "_")])
def test_stickysessionsep(written, sep):
    assert ok(bal_doc(f"stickysessionsep = {written}")).balancers["app"].stickysessionsep == sep


def test_sticky_cookie_path():
    b = ok(bal_doc('sticky_cookie = { name = "BALANCEID", path = "/app" }')).balancers["app"]
    assert dict(b.sticky_cookie) == {"name": "BALANCEID", "path": "/app"}


def test_backend_urls():
    cfg = ok(doc('path = "/a/"\nurl = "HTTP://Backend.Local:8081/x?y=1"',
                 'path = "/b/"\nurl = "https://[::1]/"',
                 'path = "/c/"\nurl = "ws://127.0.0.1"',
                 'path = "/d/"\nurl = "wss://h:443/sock"',
                 'regex = "^/e/(\\\\d+)/(.*)$"\nurl = "http://h:80/item/$1?rest=$2"',
                 'path = "/f/"\nurl = "balancer://app/sub/"', after=balancer()))
    a, b, c, d, e, f = (r.url for r in cfg.vhosts[0].routes)
    assert a == BackendURL("http", "backend.local", 8081, "/x?y=1",
                           "HTTP://Backend.Local:8081/x?y=1")
    assert (a.origin, a.hostport, a.tls, a.is_balancer) == \
        ("http://backend.local:8081", "backend.local:8081", False, False)
    assert (b.host, b.port, b.tls, b.origin, b.hostport) == \
        ("::1", 443, True, "https://[::1]", "[::1]")
    assert (c.scheme, c.port, c.path, c.origin) == ("ws", 80, "", "ws://127.0.0.1")
    assert (d.tls, d.origin, d.path) == (True, "wss://h", "/sock")
    assert (e.origin, e.path) == ("http://h", "/item/$1?rest=$2")
    assert cfg.vhosts[0].routes[4].regex == "^/e/(\\d+)/(.*)$"
    assert (f.is_balancer, f.host, f.port, f.path, f.origin) == \
        (True, "app", 0, "/sub/", "balancer://app")


def test_regex_route_with_groups_and_group_zero():
    r = ok(doc('regex = "^/(a)(b)(c)$"\nurl = "http://h/$3/$2/$1/$0"')).vhosts[0].routes[0]
    assert (r.path, r.regex, r.url.path, r.reverse) == (None, "^/(a)(b)(c)$", "/$3/$2/$1/$0",
                                                        False)


def test_route_extras():
    cfg = ok(doc(ROUTE + '\nreverse = true\nmatch_headers = { "User-Agent" = "(?i)msie", '
                 'X-Mode = "^legacy$" }\ncookie_domain = { "backend.local" = "www.example.com" }'
                 '\ncookie_path = { "/app/" = "/" }\nrequest_headers = [{ action = "unset", '
                 'name = "X-Debug" }]\nresponse_headers = [{ action = "add", name = "X-Via", '
                 'value = "twistproxy", always = true }]',
                 'path = "/static"\nexclude = true'))
    r, x = cfg.vhosts[0].routes
    assert r.where == "vhost[0].route[0]" and x.where == "vhost[0].route[1]"
    assert r.reverse is True
    assert r.match_headers == (("User-Agent", "(?i)msie"), ("X-Mode", "^legacy$"))
    assert r.cookie_domain == (("backend.local", "www.example.com"),)
    assert r.cookie_path == (("/app/", "/"),)
    assert r.request_headers == (HeaderAction("unset", "X-Debug"),)
    assert r.response_headers == (HeaderAction("add", "X-Via", "twistproxy", True),)
    assert (x.path, x.exclude, x.url) == ("/static", True, None)


def test_vhost_header_rules_keep_order_and_case():
    v = ok(doc(ROUTE, vhost='request_headers = [\n  { action = "SET", name = "X-Forwarded-Proto", '
                            'value = "https" },\n  { action = "add", name = "x-tag", '
                            'value = "" },\n]\n')).vhosts[0]
    assert v.request_headers == (HeaderAction("set", "X-Forwarded-Proto", "https"),
                                 HeaderAction("add", "x-tag", ""))


def test_header_rules_as_array_of_tables():
    v = ok(doc(ROUTE, after='[[vhost.response_headers]]\naction = "unset"\nname = "Server"\n'))
    assert v.vhosts[0].response_headers == (HeaderAction("unset", "Server"),)


def test_vhost_names_and_listen():
    cfg = ok(listen("127.0.0.2", "::1")
             + '[[vhost]]\nserver_name = "example.com"\nserver_alias = ["WWW.example.com", '
               '"*.Example.org"]\nlisten = ["127.0.0.2:8080", "[0:0::1]:8080"]\n'
               'preserve_host = true\nadd_headers = false\nproxy_chain_auth = true\n'
             + '[[vhost]]\nserver_name = "[::1]"\nserver_alias = "alias.local"\n')
    a, b = cfg.vhosts
    assert a.server_alias == ("www.example.com", "*.example.org")
    assert a.listen == ("127.0.0.2:8080", "[::1]:8080")
    assert (a.preserve_host, a.add_headers, a.proxy_chain_auth) == (True, False, True)
    assert (b.server_name, b.server_alias, b.listen, b.routes) == \
        ("[::1]", ("alias.local",), (), ())


def test_vhost_listen_ref_to_wildcards():
    cfg = ok(listen("*") + VHOST + 'listen = ["*:8080"]\n')
    assert cfg.vhosts[0].listen == ("*:8080",)
    cfg = ok(listen("0.0.0.0") + VHOST + 'listen = ["0.0.0.0:8080"]\n')
    assert cfg.vhosts[0].listen == ("0.0.0.0:8080",)


@pytest.mark.parametrize("addresses, ports", [
    (("127.0.0.2", "127.0.0.3"), (8080, 8080)),
    (("0.0.0.0", "::1"), (8080, 8080)),          # IPv4 wildcard, IPv6 address: no clash
    (("::1", "127.0.0.1"), (8080, 8080)),
    (("0.0.0.0", "127.0.0.1"), (8080, 8081)),    # same address family, other port
    (("*", "::1"), (80, 443)),
])
def test_listeners_that_do_not_clash(addresses, ports):
    text = "".join(f'[[listen]]\naddress = "{a}"\nport = {p}\n' for a, p in zip(addresses, ports))
    cfg = ok(text + VHOST)
    assert [(l.address, l.port) for l in cfg.listeners] == list(zip(addresses, ports))


def test_listen_keys_and_bind_addresses():
    cfg = ok(listen(" 127.0.0.1 ", port=80) + listen("*", port=81) + listen("0:0::1", port=82)
             + listen("0.0.0.0", port=83) + VHOST)
    assert [l.key for l in cfg.listeners] == ["127.0.0.1:80", "*:81", "[::1]:82", "0.0.0.0:83"]
    assert [l.bind_address for l in cfg.listeners] == ["127.0.0.1", "::", "0:0::1", "0.0.0.0"]
    assert cfg.listeners[0] == ListenConfig("127.0.0.1", 80)


def test_single_listen_table_is_accepted():
    cfg = ok('[listen]\naddress = "127.0.0.1"\nport = 8080\n' + VHOST)
    assert cfg.listeners == (ListenConfig("127.0.0.1", 8080),)


def test_config_is_frozen():
    cfg = ok(doc(ROUTE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vhosts = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vhosts[0].routes[0].worker.max = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------
# the happy path: DESIGN.md's configuration sketch without its `tls` parts

SKETCH = '''
[server]
access_log = "-"              # "-" is stdout, else a path
server_tokens = "prod"        # what Server/Via reveal

[[listen]]
address = "127.0.0.1"         # one IP, "0.0.0.0", "::", or "*"
port = 8080

[[listen]]
address = "127.0.0.1"
port = 8443

[[vhost]]
server_name = "example.com"
server_alias = ["www.example.com", "*.example.org"]
listen = ["127.0.0.1:8080", "127.0.0.1:8443"]   # optional; default: every listener
preserve_host = true          # ProxyPreserveHost

  [[vhost.route]]             # first match wins, in file order, like ProxyPass
  path = "/apache-apps"
  exclude = true              # ProxyPass /apache-apps !

  [[vhost.route]]
  path = "/api/users/"
  url = "http://127.0.0.1:3000/"
  reverse = true              # ProxyPassReverse
  timeout = 30                # worker parameters as in mod_proxy
  ttl = 60

  [[vhost.route]]
  regex = "^/aspnet/(.*)$"    # ProxyPassMatch
  url = "http://127.0.0.1:8081/$1"

  [[vhost.route]]
  path = "/"
  url = "balancer://iis/"

[[vhost]]
server_name = "proxy.internal"
FORWARD_PROXY_KEYS

[balancer.iis]
lbmethod = "byrequests"
stickysession = "BALANCEID"
nofailover = true

  [[balancer.iis.member]]
  url = "http://127.0.0.1:8101/"
  route = "node1"

  [[balancer.iis.member]]
  url = "http://127.0.0.1:8102/"
  route = "node2"
  status = "+H"               # hot standby
'''

FORWARD_PROXY = '''proxy_requests = true         # forward proxy + CONNECT (ProxyRequests)
allow_connect = [443, 563]    # AllowCONNECT
proxy_allow = ["127.0.0.0/8"] # who may use it'''


def check_sketch(cfg: Config) -> None:
    assert cfg.path == SITE
    assert cfg.server == ServerConfig(access_log="-", server_tokens="prod")
    assert cfg.listeners == (ListenConfig("127.0.0.1", 8080), ListenConfig("127.0.0.1", 8443))

    site, proxy = cfg.vhosts
    assert site.server_name == "example.com"
    assert site.server_alias == ("www.example.com", "*.example.org")
    assert site.listen == ("127.0.0.1:8080", "127.0.0.1:8443")
    assert site.preserve_host is True
    assert (site.add_headers, site.proxy_via) == (True, "off")

    apps, users, aspnet, root = site.routes
    assert apps == RouteConfig(path="/apache-apps", exclude=True, where="vhost[0].route[0]")
    assert (users.path, users.reverse) == ("/api/users/", True)
    assert users.url == BackendURL("http", "127.0.0.1", 3000, "/", "http://127.0.0.1:3000/")
    assert users.worker == WorkerParams(timeout=30.0, ttl=60.0)
    assert (aspnet.path, aspnet.regex, aspnet.reverse) == (None, "^/aspnet/(.*)$", False)
    assert aspnet.url == BackendURL("http", "127.0.0.1", 8081, "/$1",
                                    "http://127.0.0.1:8081/$1")
    assert root.path == "/" and root.url.is_balancer and root.url.host == "iis"
    assert root.worker == WorkerParams()

    assert proxy.server_name == "proxy.internal"
    assert (proxy.listen, proxy.routes) == ((), ())

    assert list(cfg.balancers) == ["iis"]
    iis = cfg.balancers["iis"]
    assert (iis.name, iis.lbmethod, iis.stickysession, iis.nofailover) == \
        ("iis", "byrequests", "BALANCEID", True)
    node1, node2 = iis.members
    assert node1 == MemberConfig(
        url=BackendURL("http", "127.0.0.1", 8101, "/", "http://127.0.0.1:8101/"), route="node1")
    assert (node2.url.port, node2.route, node2.status) == (8102, "node2", "+H")

    assert cfg.summary() == (
        "etc/site.toml: ok: 2 listener(s) (127.0.0.1:8080, 127.0.0.1:8443), 2 vhost(s), "
        "4 route(s), 1 balancer(s) with 2 member(s)")


def test_design_sketch_without_tls():
    check_sketch(ok(SKETCH.replace("FORWARD_PROXY_KEYS", "")))


def test_summary_counts():
    cfg = ok(listen("127.0.0.2", "127.0.0.3") + VHOST + f"[[vhost.route]]\n{ROUTE}\n")
    assert cfg.summary() == ("etc/site.toml: ok: 2 listener(s) (127.0.0.2:8080, "
                             "127.0.0.3:8080), 1 vhost(s), 1 route(s), 0 balancer(s) with "
                             "0 member(s)")


# ---------------------------------------------------------------------------
# config.load: files


def test_load_file(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SKETCH.replace("FORWARD_PROXY_KEYS", ""), encoding="utf-8")
    cfg = config.load(str(path))
    assert cfg.path == str(path)
    assert cfg.summary().startswith(f"{path}: ok: 2 listener(s)")


def test_load_crlf_file(tmp_path):
    path = tmp_path / "crlf.toml"
    path.write_bytes(doc(ROUTE).replace("\n", "\r\n").encode())
    assert config.load(str(path)).vhosts[0].routes[0].url.port == 8081


def test_load_error_names_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(doc('path = "/"\nurl = "htp://x"'), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value) == (f"{path}: vhost[0].route[0].url: 'htp://x' is not an http, "
                               "https, ws, wss or balancer URL")


def test_load_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[listen]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid TOML: ") and "\n" not in msg


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: cannot read: "), msg
    assert "No such file" in msg and "\n" not in msg


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}: cannot read: ") and "\n" not in msg, msg


def test_load_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(doc(ROUTE).replace('"localhost"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: not UTF-8 text ("), msg
    assert "at byte" in msg and "\n" not in msg


# ---------------------------------------------------------------------------
# edge cases once missed: scalars where tables belong, nan, port 0, odd keys

@pytest.mark.parametrize("value", ["5", "true"])
def test_balancer_scalar(value):
    msg = fails(doc(ROUTE, top=f"balancer = {value}\n"))
    assert msg.startswith(f"{SITE}: balancer: {value} must be a table")


@pytest.mark.parametrize("value", ["5", "true"])
def test_match_headers_scalar(value):
    msg = fails(doc(ROUTE + f"\nmatch_headers = {value}"))
    assert msg.startswith(f"{SITE}: vhost[0].route[0].match_headers: {value} must be a table")


def test_duration_nan():
    msg = fails(doc(ROUTE + "\ntimeout = nan"))
    assert msg.startswith(f"{SITE}: vhost[0].route[0].timeout: nan ")


def test_url_port_zero():
    msg = fails(doc('path = "/"\nurl = "http://127.0.0.1:0/"'))
    assert msg.startswith(f"{SITE}: vhost[0].route[0].url: 'http://127.0.0.1:0/' ")


@pytest.mark.parametrize("text", [
    doc(ROUTE + '\n"a\\nb" = 1'),
    doc(ROUTE + '\ncookie_domain = { "a\\nb" = 1 }'),
    doc(ROUTE, after='[balancer."a\\nb"]\nx = 1\n'),
], ids=["unknown-key", "mapping-key", "balancer-name"])
def test_newline_in_key(text):
    fails(text)


def test_stickysession_two_bars():
    fails(bal_doc('stickysession = "A|B|C"'))


# ---------------------------------------------------------------------------
# the shipped files

SHIPPED = sorted([ROOT / "etc" / "twistproxy.toml", *(ROOT / "etc" / "examples").glob("*.toml")])


def test_shipped_files_are_there():
    names = {p.name for p in SHIPPED}
    assert {"twistproxy.toml", "apache-iis-port80.toml", "two-ips-one-port.toml",
            "microservices.toml", "iis-farm-sticky.toml", "useragent-routing.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_file_loads(path):
    cfg = config.load(str(path))
    assert cfg.summary().startswith(f"{path}: ok: ")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "every shipped file opens with a comment saying what it is"


def test_default_config_active_content():
    cfg = config.load(str(ROOT / "etc" / "twistproxy.toml"))
    assert cfg.listeners == (ListenConfig("127.0.0.1", 8080),)
    assert cfg.server == ServerConfig()
    (v,) = cfg.vhosts
    assert (v.server_name, v.listen) == ("localhost", ())
    (r,) = v.routes
    assert (r.path, r.url.raw, r.exclude) == ("/", "http://127.0.0.1:8081/", False)
    assert cfg.balancers == {}


def _schema_keys() -> dict[str, set[str]]:
    worker = set(WorkerParams.__dataclass_fields__)
    route = set(RouteConfig.__dataclass_fields__) - {"worker", "where"}
    return {
        "server": set(ServerConfig.__dataclass_fields__),
        "listen": set(ListenConfig.__dataclass_fields__) - {"tls"},
        "vhost": set(VhostConfig.__dataclass_fields__) - {"routes"} | {"route"},
        "route": route | worker,
        "header rule": set(HeaderAction.__dataclass_fields__),
        "balancer": set(BalancerConfig.__dataclass_fields__) - {"name", "members"} | {"member"},
        "member": set(MemberConfig.__dataclass_fields__) - {"worker"} | worker,
        "sticky_cookie": {"name", "path"},
        "admin": set(AdminConfig.__dataclass_fields__),
    }


def test_default_config_documents_every_key():
    text = (ROOT / "etc" / "twistproxy.toml").read_text(encoding="utf-8")
    lines = [line.lstrip("# \t") for line in text.splitlines()]
    missing = {}
    for section, keys in _schema_keys().items():
        for key in keys:
            if key == "member":
                found = any(line.startswith("[[balancer.") and ".member]]" in line
                            for line in lines)
            elif section in ("header rule", "sticky_cookie"):
                found = any(f"{key} =" in line for line in lines)
            else:
                found = any(line.startswith(f"{key} =") for line in lines)
            if not found:
                missing.setdefault(section, []).append(key)
    assert not missing, f"etc/twistproxy.toml does not show these keys: {missing}"
    for key in ("tls = ", "cert = ", "key = ", "chain = ", "min_version = ", "ciphers = ",
                "[[listen.certificate]]", "server_name = "):
        assert any(line.startswith(key) for line in lines), f"TLS key {key!r} not shown"


# ---------------------------------------------------------------------------
# [server] worker_processes, graceful_timeout, served_by_header (process/)


@pytest.mark.parametrize("value, shown", [
    ("0", "0"), ("257", "257"), ('"many"', "'many'"), ("true", "true"), ("2.5", "2.5"),
    ('""', "''"),
])
def test_worker_processes_errors(value, shown):
    msg = fails(doc(ROUTE, top=f"[server]\nworker_processes = {value}\n"))
    assert msg.endswith(f'server.worker_processes: {shown} must be a whole number from 1 '
                        'to 256 or "auto"'), msg


def test_worker_processes_values():
    import os
    assert ok(doc(ROUTE)).server.worker_processes == 1
    assert ok(doc(ROUTE, top="[server]\nworker_processes = 4\n")).server.worker_processes == 4
    auto = ok(doc(ROUTE, top='[server]\nworker_processes = "Auto"\n')).server.worker_processes
    assert auto == len(os.sched_getaffinity(0))


def test_worker_processes_take_admin_pages_and_need_the_master():
    """The master owns the admin pages and their state, so any number of workers may
    have them; without a master there is one process only."""
    assert ok(doc(ROUTE, top="[server]\nworker_processes = 2\n", after="[admin]\n")).admin
    assert ok(doc(ROUTE)).server.master_process is True
    msg = fails(doc(ROUTE, top="[server]\nworker_processes = 2\nmaster_process = false\n"))
    assert "server.worker_processes: 2 needs server.master_process = true" in msg
    msg = fails(doc(ROUTE, top='[server]\nmaster_process = "no"\n'))
    assert "server.master_process" in msg


def test_graceful_timeout_and_served_by_header():
    cfg = ok(doc(ROUTE, top='[server]\ngraceful_timeout = "500ms"\n'
                            'served_by_header = "X-Served-By"\n'))
    assert cfg.server.graceful_timeout == 0.5 and cfg.server.served_by_header == "X-Served-By"
    assert ok(doc(ROUTE)).server.graceful_timeout == 10.0
    assert ok(doc(ROUTE)).server.served_by_header == ""
    msg = fails(doc(ROUTE, top='[server]\nserved_by_header = "X Served"\n'))
    assert "server.served_by_header: 'X Served' is not a header name" in msg
    msg = fails(doc(ROUTE, top='[server]\ngraceful_timeout = -1\n'))
    assert "server.graceful_timeout" in msg

"""`twistproxy import-apache`: what each Apache directive becomes, and what is reported.

The fixtures (tests/fixtures/apache/, each accepted by `apache2 -t`) are imported whole
and must report exactly the directives that are not carried over; the rules are then
checked one by one on small configurations. Side by side with real Apache:
tests/e2e/test_apache_differential.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from twistproxy.apache.command import Failed, convert
from twistproxy.apache.mapping import import_parsed
from twistproxy.apache.parser import parse_text
from twistproxy.apache.tomlout import dumps
from twistproxy.config import loads

FIXTURES = Path(__file__).parent / "fixtures" / "apache"
MODULES = """LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule proxy_module /usr/lib/apache2/modules/mod_proxy.so
LoadModule proxy_http_module /usr/lib/apache2/modules/mod_proxy_http.so
"""


def imported(text: str, listen: str = "Listen 127.0.0.1:8080\n"):
    """(the loaded Config, the report lines without the LoadModule ones, exit status)
    for an Apache configuration given as text."""
    parsed = parse_text(MODULES + listen + text, "/etc/apache2/httpd.conf",
                        server_root="/etc/apache2")
    result = import_parsed(parsed)
    config = loads(dumps(result.doc), "<import>")
    lines = [r.line().removeprefix("/etc/apache2/httpd.conf:")
             for r in result.reports if not r.directive.startswith("LoadModule")]
    return config, lines, result.status


def fixture(name: str, root: str | None = None):
    text, result, config = convert(str(FIXTURES / name),
                                   str(FIXTURES / root) if root else None)
    lines = [r.line().removeprefix(str(FIXTURES) + "/") for r in result.reports
             if not r.directive.startswith("LoadModule")]
    loaded = sum(1 for r in result.reports if r.directive.startswith("LoadModule"))
    return config, lines, result.status, loaded, text


# ---------------------------------------------------------------------------
# the fixtures, whole: exactly these are not carried over


def test_iis_on_port_80_imports_with_nothing_proxied_left_behind():
    config, lines, status, loaded, text = fixture("iis-port80.conf")
    assert status == 0 and loaded == 5
    assert lines == [
        "iis-port80.conf:3: PidFile /tmp/apache-fixture-iis-port80.pid: not needed "
        "(twistproxy run --pidfile)",
        'iis-port80.conf:27: DocumentRoot "/var/www/html": no equivalent (twistproxy '
        "serves no files)",
        'iis-port80.conf:33: DocumentRoot "/var/www/html": no equivalent (twistproxy '
        "serves no files)",
        "iis-port80.conf:41: RewriteRule ^ - [L]: not needed (it only ends rewriting; "
        "what is not routed above goes on to ProxyPass, as here)",
        "iis-port80.conf:2: ServerName proxy.example.com: not needed (every address has "
        "its <VirtualHost>s, so the main server answers none)",
    ]
    assert [l.key for l in config.listeners] == ["127.0.0.1:18080", "127.0.0.2:18080"]
    first, docroot, own_ip = config.vhosts
    assert (first.server_name, first.server_alias) == ("example.com", ("www.example.com",))
    assert first.preserve_host and first.listen == ("127.0.0.1:18080",)
    assert [(r.path, r.exclude) for r in first.routes] == [("/apache-apps", True),
                                                          ("/", False)]
    assert first.routes[1].reverse
    assert docroot.server_name == "apache.example.com" and not docroot.routes
    # mod_rewrite [P] rules, in order, with their conditions as header matches
    assert own_ip.listen == ("127.0.0.2:18080",)
    assert [(r.regex, r.url.raw, r.match_headers) for r in own_ip.routes] == [
        ("^/(.*)$", "http://127.0.0.1:8080/$1", (("Host", r"(?i)^iis-domain\.com$"),)),
        ("^/aspnet/(.*)$", "http://127.0.0.1:8080/$1", ()),
        ("^/(.*)$", "http://127.0.0.1:8081/$1", (("User-Agent", r"MSIE [5-8]\."),)),
    ]
    # each section says where it came from
    assert "# <VirtualHost 127.0.0.2:18080>  (" in text and "iis-port80.conf:31)" in text


def test_sticky_farm_imports_whole():
    config, lines, status, loaded, _ = fixture("iis-farm-sticky.conf")
    assert status == 0 and loaded == 9
    assert lines == [
        "iis-farm-sticky.conf:3: PidFile /tmp/apache-fixture-iis-farm.pid: not needed "
        "(twistproxy run --pidfile)",
        "iis-farm-sticky.conf:18: Order deny,allow: not needed (read with its Allow and "
        "Deny lines)",
        "iis-farm-sticky.conf:19: Allow from all: not needed (everyone may use it, as by "
        "default)",
    ] + [f"iis-farm-sticky.conf:{line}: BalancerMember http://127.0.0.1:{port}/ "
         f"route=node{n}{extra}: differs (the member URL ends in /: Apache sends the "
         "request's path after it whole (//page), twistproxy one slash (/page) (README, "
         "Deliberate differences))"
         for line, port, n, extra in ((20, 8101, 1, ""), (21, 8102, 2, ""),
                                      (22, 8103, 3, " status=+H loadfactor=2"))]
    farm = config.balancers["mycluster"]
    assert (farm.lbmethod, farm.stickysession, farm.nofailover) == \
        ("byrequests", "BALANCEID", True)
    assert [(m.url.raw, m.route, m.status, m.loadfactor) for m in farm.members] == [
        ("http://127.0.0.1:8101/", "node1", "", 1.0),
        ("http://127.0.0.1:8102/", "node2", "", 1.0),
        ("http://127.0.0.1:8103/", "node3", "+H", 2.0)]
    (vhost,) = config.vhosts
    assert vhost.server_name == "lb.example.com" and vhost.preserve_host
    assert vhost.routes[0].url.raw == "balancer://mycluster/" and vhost.routes[0].reverse


def test_howto_reports_the_access_control_and_the_extra_reverse_mapping():
    config, lines, status, loaded, _ = fixture("howto.conf")
    assert status == 1 and loaded == 15
    assert lines == [
        "howto.conf:5: ServerSignature Off: not needed (twistproxy's own error pages "
        "carry no signature)",
        "howto.conf:6: PidFile /tmp/apache-fixture-howto.pid: not needed (twistproxy run "
        "--pidfile)",
        "howto.conf:3: ServerName myapp.com: not needed (every address has its "
        "<VirtualHost>s, so the main server answers none)",
        "howto.conf:34: Require ip 127.0.0.0/8 192.168.1.0/24: differs (<Proxy *> access "
        "control applies to reverse-proxied requests in Apache; twistproxy's proxy_allow "
        "is for forward proxying only)",
        "howto.conf:106: ProxyPassReverse / https://secure.example.com/: differs "
        "(twistproxy rewrites a route's own URL in responses (reverse = true); this URL "
        "is no route's)",
    ]
    assert config.server.timeout == 30 and config.server.server_tokens == "prod"
    myapp, api, ws, checked, secure = config.vhosts
    assert [(r.path, r.handler) for r in myapp.routes[:2]] == [
        ("/server-status", "server-status"), ("/balancer-manager", "balancer-manager")]
    assert config.admin.allow == ("127.0.0.0/8", "::1/128")         # Require local
    assert config.balancers["mycluster"].members[2].status == "+H"
    users = api.routes[0]
    assert (users.worker.connectiontimeout, users.worker.ttl) == (5, 60)
    assert dict(users.cookie_path) == {"/": "/api/users/"}
    assert api.routes[2].regex == r"^/legacy/(.*)\.aspx$"
    assert ws.routes[0].url.scheme == "ws"
    c = config.balancers["checked"]
    assert (c.lbmethod, c.stickysession, dict(c.sticky_cookie)) == \
        ("bybusyness", "ROUTEID", {"name": "ROUTEID", "path": "/"})
    # ProxyHCTemplate web, and a member's own hc* parameters
    assert [(m.hcmethod, m.hcuri, m.hcinterval, m.hcpasses, m.hcfails)
            for m in c.members] == [("GET", "/health", 5, 2, 3), ("GET", "/health", 5, 2, 3),
                                    ("HEAD", "/ping", 10, 1, 1)]
    tls = config.listeners[1].tls
    assert tls.certificates[0].cert.endswith("tls/secure.example.com.pem")
    assert [a.name for a in secure.request_headers] == ["X-Forwarded-Proto",
                                                        "X-Forwarded-Port"]
    assert [a.name for a in myapp.response_headers] == ["X-Frame-Options",
                                                        "X-Content-Type-Options"]


def test_debian_layout_follows_its_includes_and_defines():
    config, lines, status, loaded, _ = fixture("debian/apache2.conf", "debian")
    assert status == 1 and loaded == 9
    assert lines == [
        "debian/apache2.conf:5: PidFile /tmp/apache-fixture-debian.pid: not needed "
        "(twistproxy run --pidfile)",
        "debian/apache2.conf:8: KeepAlive On: not needed (keep-alive is on; "
        "keepalive_timeout = 0 would end it)",
        "debian/apache2.conf:9: MaxKeepAliveRequests 100: not needed (a client "
        "connection serves requests until it is idle for keepalive_timeout)",
        "debian/conf-enabled/security.conf:2: ServerSignature Off: not needed "
        "(twistproxy's own error pages carry no signature)",
        'debian/sites-enabled/000-default.conf:20: Header edit Location '
        '"^http://app\\.internal/" "/": differs (edit: twistproxy has set, add and unset)',
    ]
    assert [l.key for l in config.listeners] == ["127.0.0.1:18083"]   # no ssl_module
    (vhost,) = config.vhosts
    assert vhost.server_alias == ("intranet", "*.intranet.example.com")
    assert [r.url.raw for r in vhost.routes] == ["balancer://farm/app/",
                                                "http://127.0.0.1:8080/"]
    farm = config.balancers["farm"]
    assert (farm.lbmethod, farm.stickysession, farm.scolonpathdelim, farm.maxattempts) == \
        ("bytraffic", "JSESSIONID|jsessionid", True, 2)
    a = farm.members[0]
    assert (a.route, a.loadfactor, a.worker.connectiontimeout, a.worker.retry) == \
        ("a", 3, 2, 30)
    assert dict(vhost.routes[1].cookie_domain) == {"app.internal": "intranet.example.com"}
    assert config.server.timeout == 300 and config.server.keepalive_timeout == 5


def test_debian_layout_with_the_farm_defined_away():
    text, result, config = convert(str(FIXTURES / "debian/apache2.conf"),
                                   str(FIXTURES / "debian"), defines=["NO_FARM"])
    assert [r.url.raw for r in config.vhosts[0].routes] == ["http://127.0.0.1:8080/"]
    assert not config.balancers


def test_an_invalid_apache_file_is_exit_2_with_file_and_line(tmp_path):
    bad = tmp_path / "httpd.conf"
    bad.write_text("Listen 80\n<VirtualHost *:80>\nServerName a\n")
    with pytest.raises(Failed) as info:
        convert(str(bad))
    assert info.value.status == 2
    assert str(info.value) == f"{bad}:2: <VirtualHost> was not closed."


def test_no_listen_is_exit_1(tmp_path):
    conf = tmp_path / "httpd.conf"
    conf.write_text("ServerName a\n")
    with pytest.raises(Failed) as info:
        convert(str(conf))
    assert info.value.status == 1 and "no Listen directive" in str(info.value)


# ---------------------------------------------------------------------------
# the rules, one at a time


def test_listen_forms():
    config, _, _ = imported("", listen="Listen 80\nListen 127.0.0.2:8080\nListen [::1]:8443 "
                                       "https\n")
    assert [l.key for l in config.listeners] == ["*:80", "127.0.0.2:8080", "[::1]:8443"]


def test_main_server_proxypass_comes_before_the_vhosts_own():
    config, _, _ = imported("ProxyPass /shared/ http://127.0.0.1:9000/\n"
                            "<VirtualHost *:8080>\nServerName a\n"
                            "ProxyPass / http://127.0.0.1:9001/\n</VirtualHost>\n")
    assert [r.path for r in config.vhosts[0].routes] == ["/shared/", "/"]


def test_rewrite_rules_come_before_proxypass_and_need_rewriteengine():
    config, lines, _ = imported(
        "<VirtualHost *:8080>\nServerName a\nProxyPass / http://127.0.0.1:9001/\n"
        "RewriteEngine On\nRewriteRule ^/old/(.*)$ http://127.0.0.1:9002/$1 [P]\n"
        "</VirtualHost>\n<VirtualHost *:8080>\nServerName b\n"
        "RewriteRule ^/x/(.*)$ http://127.0.0.1:9003/$1 [P]\n</VirtualHost>\n")
    a, b = config.vhosts
    assert [r.regex or r.path for r in a.routes] == ["^/old/(.*)$", "/"]
    assert not b.routes
    assert lines == ["13: RewriteRule ^/x/(.*)$ http://127.0.0.1:9003/$1 [P]: not needed "
                     "(RewriteEngine is not On here: Apache ignores it too)"]


def test_rewrite_conditions_or_negation_and_unsupported_ones():
    config, lines, status = imported(
        "<VirtualHost *:8080>\nServerName a\nRewriteEngine On\n"
        "RewriteCond %{HTTP_HOST} ^a\\.example$ [NC,OR]\n"
        "RewriteCond %{HTTP:X-Tenant} ^blue$\n"
        "RewriteRule ^/(.*)$ http://127.0.0.1:9002/$1 [P,L]\n"
        "RewriteCond %{HTTP_USER_AGENT} !bot\n"
        "RewriteRule ^/app/(.*)$ http://127.0.0.1:9003/$1 [P]\n"
        "RewriteCond %{REMOTE_ADDR} ^10\\.\n"
        "RewriteRule ^/admin/(.*)$ http://127.0.0.1:9004/$1 [P]\n"
        "RewriteRule ^/gone$ /elsewhere [R=301,L]\n"
        "</VirtualHost>\n")
    routes = config.vhosts[0].routes
    # [OR]: one route per alternative
    assert [r.match_headers for r in routes[:2]] == [
        (("Host", r"(?i)^a\.example$"),), (("X-Tenant", "^blue$"),)]
    # negation: the header must not match
    (name, regex), = routes[2].match_headers
    import re
    assert name == "User-Agent" and re.search(regex, "curl/8") and \
        not re.search(regex, "Googlebot/2.1")
    assert len(routes) == 3
    assert status == 1
    assert lines == [
        "11: RewriteCond %{HTTP_USER_AGENT} !bot: differs (a request without User-Agent "
        "takes this rule in Apache (the empty value does not match), not in twistproxy, "
        "whose header matches need the header)",
        "13: RewriteCond %{REMOTE_ADDR} ^10\\.: no equivalent (a condition of the rule "
        "below)",
        "14: RewriteRule ^/admin/(.*)$ http://127.0.0.1:9004/$1 [P]: differs (a condition "
        "on %{REMOTE_ADDR} (only request headers are carried over): not carried over)",
        "15: RewriteRule ^/gone$ /elsewhere [R=301,L]: no equivalent (only proxying rules "
        "([P]) are carried over: redirects and internal rewrites are not)",
    ]


def test_two_conditions_on_one_header_must_both_hold():
    import re
    config, _, _ = imported(
        "<VirtualHost *:8080>\nServerName a\nRewriteEngine On\n"
        "RewriteCond %{HTTP_USER_AGENT} Mozilla [NC]\nRewriteCond %{HTTP_USER_AGENT} !Edge\n"
        "RewriteRule ^/(.*)$ http://127.0.0.1:9002/$1 [P]\n</VirtualHost>\n")
    (name, regex), = config.vhosts[0].routes[0].match_headers
    assert name == "User-Agent"
    assert re.search(regex, "mozilla/5.0 Firefox")
    assert not re.search(regex, "Mozilla/5.0 Edge/18") and not re.search(regex, "curl")


def test_ip_specific_vhosts_take_their_address_from_the_wildcard_ones():
    config, _, _ = imported(
        "<VirtualHost *:8080>\nServerName star\n</VirtualHost>\n"
        "<VirtualHost 127.0.0.2:8080>\nServerName own\n</VirtualHost>\n",
        listen="Listen 127.0.0.1:8080\nListen 127.0.0.2:8080\n")
    star, own = config.vhosts
    assert star.listen == ("127.0.0.1:8080",) and own.listen == ("127.0.0.2:8080",)


def test_proxypass_parameters_worker_and_balancer():
    config, lines, status = imported(
        "<Proxy balancer://app>\nBalancerMember http://127.0.0.1:9001 route=a lbset=1 "
        "max=20 ttl=30 keepalive=On\nProxySet lbmethod=bybusyness failonstatus=502,503\n"
        "</Proxy>\n"
        "ProxyPass /app/ balancer://app/ stickysession=SID nofailover=On timeout=5\n"
        "ProxyPass /api/ http://127.0.0.1:9002/ connectiontimeout=500ms disablereuse=On "
        "retry=0 upgrade=websocket\n"
        "ProxyPass /odd/ http://127.0.0.1:9003/ frobnicate=1 nocanon\n")
    app = config.balancers["app"]
    assert (app.lbmethod, app.failonstatus, app.stickysession, app.nofailover,
            app.timeout) == ("bybusyness", (502, 503), "SID", True, 5)
    m = app.members[0]
    assert (m.route, m.lbset, m.worker.max, m.worker.ttl, m.worker.keepalive) == \
        ("a", 1, 20, 30, True)
    api = config.vhosts[0].routes[1].worker
    assert (api.connectiontimeout, api.disablereuse, api.retry, api.upgrade) == \
        (0.5, True, 0, "websocket")
    assert status == 1
    assert lines == [
        "11: ProxyPass /odd/ http://127.0.0.1:9003/ frobnicate=1 nocanon: differs "
        "(frobnicate=1: not a parameter twistproxy has)",
        "11: ProxyPass /odd/ http://127.0.0.1:9003/ frobnicate=1 nocanon: differs "
        "(nocanon: not carried over)",
    ]


def test_headers_set_add_unset_always_and_what_has_no_equivalent():
    config, lines, _ = imported(
        'Header always set X-Frame-Options DENY\nHeader add X-A "1"\n'
        "RequestHeader unset Proxy\nRequestHeader set X-Env prod\n"
        'Header append Vary Accept\nHeader set X-B "%{REMOTE_ADDR}e"\n'
        "Header unset Server env=nope\n")
    v = config.vhosts[0]
    assert [(a.action, a.name, a.value, a.always) for a in v.response_headers] == [
        ("set", "X-Frame-Options", "DENY", True), ("add", "X-A", "1", False)]
    assert [(a.action, a.name, a.value) for a in v.request_headers] == [
        ("unset", "Proxy", ""), ("set", "X-Env", "prod")]
    assert lines == [
        "9: Header append Vary Accept: differs (append: twistproxy has set, add and unset)",
        '10: Header set X-B "%{REMOTE_ADDR}e": differs (the value has %{...} variables, '
        "which are not expanded)",
        "11: Header unset Server env=nope: differs (env=nope: conditions are not carried "
        "over)",
    ]


def test_location_proxypass_and_the_last_matching_location_wins():
    config, _, _ = imported("<Location /a/>\nProxyPass http://127.0.0.1:9001/\n</Location>\n"
                            "<Location /a/b/>\nProxyPass http://127.0.0.1:9002/\n"
                            "</Location>\nProxyPass / http://127.0.0.1:9003/\n")
    assert [(r.path, r.url.port) for r in config.vhosts[0].routes] == [
        ("/a/b/", 9002), ("/a/", 9001), ("/", 9003)]


def test_admin_handlers_take_their_require_as_the_allow_list():
    config, lines, _ = imported("<Location /manager>\nSetHandler balancer-manager\n"
                                "Require ip 10.1 192.168.0.0/16\n</Location>\n")
    route = config.vhosts[0].routes[0]
    assert (route.path, route.handler) == ("/manager", "balancer-manager")
    assert config.admin.allow == ("10.1.0.0/16", "192.168.0.0/16")


def test_forward_proxy_with_proxy_star_access():
    config, lines, _ = imported("ProxyRequests On\nAllowCONNECT 443 8443\n"
                                "<Proxy *>\nRequire ip 10.0.0.0/8\n</Proxy>\n")
    v = config.vhosts[0]
    assert v.proxy_requests and v.allow_connect == ((443, 443), (8443, 8443))
    assert v.proxy_allow == ("10.0.0.0/8",)
    assert lines == []


def test_ssl_vhosts_share_a_listener_by_sni(tmp_path):
    config, _, _ = imported(
        "<VirtualHost *:443>\nServerName a.example\nSSLEngine on\n"
        "SSLCertificateFile tls/a.pem\nSSLCertificateKeyFile tls/a.key\n</VirtualHost>\n"
        "<VirtualHost *:443>\nServerName b.example\nServerAlias www.b.example\n"
        "SSLEngine on\nSSLCertificateFile /etc/ssl/b.pem\n"
        "SSLCertificateKeyFile /etc/ssl/b.key\nSSLProxyVerify none\n"
        "ProxyPass / https://10.0.0.9/\n</VirtualHost>\n", listen="Listen 443\n")
    tls = config.listeners[0].tls
    assert tls.certificates[0].cert == "/etc/apache2/tls/a.pem"     # ServerRoot-relative
    assert tls.certificates[1].server_names == ("b.example", "www.b.example")
    assert config.vhosts[1].routes[0].worker.verify is False


def test_timeouts_and_limits():
    config, lines, _ = imported("Timeout 120\nKeepAliveTimeout 15\nLimitRequestLine 4000\n"
                                "LimitRequestFieldSize 6000\nLimitRequestFields 50\n"
                                "RequestReadTimeout header=20-40,MinRate=500 body=20\n")
    s = config.server
    assert (s.timeout, s.keepalive_timeout, s.limit_request_line,
            s.limit_request_fieldsize, s.limit_request_fields, s.header_timeout) == \
        (120, 15, 4000, 6000, 50, 40)
    assert lines == ["10: RequestReadTimeout header=20-40,MinRate=500 body=20: differs "
                     "(header_timeout = 40 s, the upper bound, with no MinRate extension)"]


def test_serving_files_and_unknown_directives_are_reported_not_dropped():
    _, lines, status = imported("DocumentRoot /var/www\n<Directory /var/www>\nOptions None\n"
                                "</Directory>\nFrobnicate yes\n")
    assert status == 1          # an unknown directive may change what is proxied
    assert lines == [
        "5: DocumentRoot /var/www: no equivalent (twistproxy serves no files)",
        "6: <Directory /var/www>: no equivalent (its directives are not read: twistproxy "
        "serves no files and has no per-directory configuration)",
        "9: Frobnicate yes: no equivalent (not known to the importer)",
    ]


# ---------------------------------------------------------------------------
# cases a review found: each either carried over exactly or reported


def test_an_ip_vhost_on_a_port_bound_for_every_address_is_reported():
    config, lines, status = imported(
        "<VirtualHost *:80>\nServerName star\n</VirtualHost>\n"
        "<VirtualHost 127.0.0.1:80>\nServerName ip\nProxyPass / http://127.0.0.1:9001/\n"
        "</VirtualHost>\n", listen="Listen 80\n")
    assert [v.server_name for v in config.vhosts] == ["star"]
    assert config.vhosts[0].listen == ("*:80",)
    assert status == 1 and lines == [
        "8: <VirtualHost 127.0.0.1:80>: differs (its address's port is bound for every "
        "address (*:80): twistproxy cannot serve this vhost on connections to one address "
        "of a wildcard socket; Listen each address on its own instead)"]


def test_the_main_servers_tls_serves_its_listener():
    config, _, _ = imported("SSLEngine on\nSSLCertificateFile /etc/ssl/main.pem\n"
                            "SSLCertificateKeyFile /etc/ssl/main.key\n"
                            "ProxyPass / http://127.0.0.1:9001/\n", listen="Listen 443\n")
    assert config.listeners[0].tls.certificates[0].cert == "/etc/ssl/main.pem"


@pytest.mark.parametrize("rule, why", [
    ("RewriteRule ^/t/(.*)$ http://%1.internal/$1 [P]", "its target uses %N or %{...}"),
    ("RewriteRule ^/q/(.*)$ http://127.0.0.1:9001/$1?x=1 [P]", "its target has a query"),
])
def test_rewrite_targets_twistproxy_would_build_differently_are_reported(rule, why):
    config, lines, status = imported(f"RewriteEngine On\n{rule}\n")
    assert not config.vhosts[0].routes and status == 1
    assert why in lines[0]


def test_a_query_in_a_rewrite_target_with_qsa_is_carried_over():
    config, lines, _ = imported("RewriteEngine On\n"
                                "RewriteRule ^/q/(.*)$ http://127.0.0.1:9001/$1?x=1 [P,QSA]\n")
    assert config.vhosts[0].routes[0].url.raw == "http://127.0.0.1:9001/$1?x=1"
    assert lines == []


def test_a_condition_that_matches_an_empty_header_is_reported():
    _, lines, status = imported("RewriteEngine On\nRewriteCond %{HTTP:X-Debug} ^$\n"
                                "RewriteRule ^/(.*)$ http://127.0.0.1:9001/$1 [P]\n")
    assert status == 1 and "a request without X-Debug takes this rule in Apache" in lines[0]


def test_worker_parameter_units_are_mod_proxys():
    config, _, _ = imported("ProxyPass / http://127.0.0.1:9001/ acquire=3000 timeout=500ms "
                            "connectiontimeout=500ms retry=5.5 ttl=30s ping=2\n")
    w = config.vhosts[0].routes[0].worker
    # acquire: ms by default; timeout, ttl, retry: atoi seconds; the others take units
    assert (w.acquire, w.timeout, w.connectiontimeout, w.retry, w.ttl, w.ping) == \
        (3, 500, 0.5, 5, 30, 2)


def test_server_numbers_as_apache_reads_them():
    config, lines, _ = imported("KeepAliveTimeout 500ms\nTimeout 30s\nProxyTimeout 2min\n"
                                "LimitRequestLine 8k\n")
    s = config.server
    assert (s.keepalive_timeout, s.timeout, s.limit_request_line) == (0.5, 120, 8190)
    # 8k is 8 to Apache (atoi), below what twistproxy takes: said, and left at 8190
    assert lines == ["8: LimitRequestLine 8k: differs (twistproxy's limit_request_line is "
                     "at least 64: left at its default)"]


def test_a_vhosts_proxytimeout_reaches_its_balancers_members():
    config, _, _ = imported("<Proxy balancer://farm>\nBalancerMember http://127.0.0.1:9001\n"
                            "BalancerMember http://127.0.0.1:9002 timeout=9\n</Proxy>\n"
                            "<VirtualHost *:8080>\nServerName a\nProxyTimeout 5\n"
                            "ProxyPass / balancer://farm/\n</VirtualHost>\n")
    assert [m.worker.timeout for m in config.balancers["farm"].members] == [5, 9]


def test_proxypassreverse_for_another_path_is_reported():
    config, lines, status = imported("ProxyPass /app/ http://127.0.0.1:9001/\n"
                                     "ProxyPassReverse /other/ http://127.0.0.1:9001/\n")
    assert not config.vhosts[0].routes[0].reverse and status == 1
    assert "ProxyPassReverse /other/ http://127.0.0.1:9001/: differs" in lines[0]


def test_regex_forms_of_proxypass_and_location():
    config, lines, _ = imported("ProxyPass ~ ^/img/(.*)$ http://127.0.0.1:9001/$1\n"
                                "<Location ~ \"^/loc/(.*)$\">\nProxyPass http://127.0.0.1:9002/$1\n"
                                "</Location>\n<Location /wild/*>\n"
                                "ProxyPass http://127.0.0.1:9003/\n</Location>\n")
    routes = config.vhosts[0].routes
    assert [(r.regex, r.url.port) for r in routes] == [("^/loc/(.*)$", 9002),
                                                       ("^/img/(.*)$", 9001)]
    assert "<Location /wild/*> is a wildcard: not carried over" in lines[0]


def test_the_last_matching_location_wins_as_in_apache():
    # declared longest first: for /a/b/x both match and the later one, /a/, wins
    config, _, _ = imported("<Location /a/b/>\nProxyPass http://127.0.0.1:9002/\n"
                            "</Location>\n<Location /a/>\nProxyPass http://127.0.0.1:9001/\n"
                            "</Location>\n")
    assert [(r.path, r.url.port) for r in config.vhosts[0].routes] == [
        ("/a/", 9001), ("/a/b/", 9002)]


def test_what_has_no_equivalent_but_changes_proxied_traffic_sets_exit_1():
    _, lines, status = imported("SSLVerifyClient require\nProxyErrorOverride On\n"
                                "SetEnv proxy-nokeepalive 1\nSetEnv APP_ENV prod\n"
                                "ProxyPass / http://127.0.0.1:9001/ status=+H\n"
                                "<Proxy balancer://empty>\n</Proxy>\n"
                                "ProxyPass /e/ balancer://empty/\n")
    assert status == 1
    assert [line.split(": ", 1)[1].split(":")[0] for line in lines] == [
        "SSLVerifyClient require", "ProxyErrorOverride On", "SetEnv proxy-nokeepalive 1",
        "SetEnv APP_ENV prod", "ProxyPass / http", "ProxyPass /e/ balancer",
        "<Proxy balancer"]


@pytest.mark.parametrize("text, message", [
    ("ProxyPass / http://127.0.0.1:9001/ retry=-1\n", "retry=-1: must be at least 0"),
    ("<Proxy balancer://f>\nBalancerMember http://127.0.0.1:9001 loadfactor=0\n</Proxy>\n",
     "loadfactor=0: must be from 1 to 100"),
    ("ProxyPass http://127.0.0.1:9001/\n", "outside <Location> it takes a path and a URL"),
    ("ServerName\n", "ServerName takes one argument"),
])
def test_values_apache_itself_refuses_are_exit_2(tmp_path, text, message):
    conf = tmp_path / "httpd.conf"
    conf.write_text(MODULES + "Listen 127.0.0.1:8080\n" + text)
    with pytest.raises(Failed) as info:
        convert(str(conf))
    assert info.value.status == 2 and message in str(info.value)
    assert str(info.value).startswith(f"{conf}:")

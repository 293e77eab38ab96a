"""twistproxy.routing: path normalisation, vhost choice and ProxyPass-style matching."""

import pytest

from twistproxy.config import loads
from twistproxy.routing import RouteMatch, Router, has_encoded_slash, normalize_path

LISTEN = '[[listen]]\naddress = "127.0.0.1"\nport = 8080\n'
KEY = "127.0.0.1:8080"


def no_headers(name):
    return None


def headers(**values):
    table = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return table.get


def router_for(routes: str, extra: str = "") -> tuple[Router, object]:
    config = loads(f'{LISTEN}{extra}\n[[vhost]]\nserver_name = "example.org"\n{routes}')
    router = Router(config)
    return router, config.vhosts[0]


def target(router_vhost, path, query=None, header=no_headers):
    router, vhost = router_vhost
    m = router.route_for(vhost, path, query, header)
    return None if m is None else m.target


def route(path=None, url=None, regex=None, extra=""):
    lines = ["[[vhost.route]]"]
    if path is not None:
        lines.append(f"path = {path!r}")
    if regex is not None:
        lines.append(f"regex = '{regex}'")
    lines.append(f"url = {url!r}" if url else "exclude = true")
    return "\n".join(lines) + "\n" + extra + "\n"


# ---------------------------------------------------------------------------
# normalize_path


@pytest.mark.parametrize("raw, expected", [
    ("/", "/"),
    ("/plain/path.html", "/plain/path.html"),
    ("/a//b///c", "/a/b/c"),
    ("//", "/"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/b/../c", "/a/c"),
    ("/../x", "/x"),
    ("/..", "/"),
    ("/.", "/"),
    ("/a/../", "/"),
    ("/app/../admin", "/admin"),
    ("/app/..//admin", "/admin"),
    ("/.hidden/..x/x..", "/.hidden/..x/x.."),
    ("/%2e%2e/etc", "/etc"),
    ("/a/%2E%2e/etc/passwd", "/etc/passwd"),
    ("/a/%2e/b", "/a/b"),
    ("/a%2Fb", "/a%2Fb"),
    ("/a%2fb", "/a%2Fb"),
    ("/..%2F..%2Fetc", "/..%2F..%2Fetc"),
    ("/100%25", "/100%25"),
    ("/%2525", "/%2525"),
    ("/%c3%a9", "/%C3%A9"),
    ("/x%3a%3F%20", "/x%3A%3F%20"),
    ("/%41%62%7e%2D%5f%30", "/Ab~-_0"),
    ("/a//b/./c/../d%41%2F%25", "/a/b/dA%2F%25"),
])
def test_normalize(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    # allow_encoded_slashes = "on", as Apache's AllowEncodedSlashes On: %2F is a "/"
    # before slashes are merged and dot segments resolved
    ("/a%2Fb", "/a/b"),
    ("/a%2fb/x", "/a/b/x"),
    ("/q%2F%2F/x", "/q/x"),
    ("/a%2F..%2Fb", "/b"),
    ("/x%252Fy", "/x%252Fy"),           # an encoded "%" then "2F": no slash
    ("/plain", "/plain"),
])
def test_normalize_decoding_encoded_slashes(raw, expected):
    assert normalize_path(raw, decode_slashes=True) == expected


@pytest.mark.parametrize("raw, has", [
    ("/a%2Fb", True), ("/a%2fb", True), ("/a/b", False), ("/x%252Fy", False),
    ("/x%2", False), ("/%2E", False),
])
def test_has_encoded_slash(raw, has):
    assert has_encoded_slash(raw) is has


def test_normalize_fast_path_returns_same_object():
    raw = "/static/app.js"
    assert normalize_path(raw) is raw


@pytest.mark.parametrize("raw", [
    "", "a/b", "*", "http://x/", "/a b", "/a\tb", "/a\x00", "/a\x7f", "/a\r\n",
    "/%zz", "/%4", "/%", "/a%2", "/%g0", "/%+1", "/ok/%2e%2", "/..%",
])
def test_normalize_invalid(raw):
    assert normalize_path(raw) is None


# ---------------------------------------------------------------------------
# ProxyPass prefix rules (reference 1.1 table)


@pytest.mark.parametrize("rule, url, path, query, expected", [
    ("/foo", "http://b/bar", "/foo/x", "q=1", "/bar/x?q=1"),
    ("/foo", "http://b/bar", "/foo", None, "/bar"),
    ("/foo", "http://b/bar", "/foobar", None, None),
    ("/foo/", "http://b/bar/", "/foo", None, None),
    ("/foo/", "http://b/bar/", "/foo/", None, "/bar/"),
    ("/foo/", "http://b/bar/", "/foo/x/y", None, "/bar/x/y"),
    ("/foo/", "http://b/bar", "/foo/x", None, "/barx"),
    ("/foo", "http://b/bar/", "/foo/x", None, "/bar//x"),
])
def test_reference_table(rule, url, path, query, expected):
    r = router_for(route(rule, url))
    assert target(r, path, query) == expected


def test_case_sensitive():
    assert target(router_for(route("/foo", "http://b/bar")), "/FOO/x") is None


@pytest.mark.parametrize("url, path, expected", [
    ("http://b", "/x", "/x"),
    ("http://b/", "/x", "/x"),
    ("http://b", "/", "/"),
    ("http://b/", "/", "/"),
])
def test_root_rule(url, path, expected):
    assert target(router_for(route("/", url)), path) == expected


def test_empty_target_path_becomes_slash():
    r = router_for(route("/foo", "http://b"))
    assert target(r, "/foo") == "/"
    assert target(r, "/foo", "a=1") == "/?a=1"
    assert target(r, "/foo/x") == "/x"


def test_rule_with_slash_runs_matches_collapsed_path():
    r = router_for(route("/a//b", "http://b/z"))
    assert target(r, normalize_path("/a///b/c")) == "/z/c"


def test_rule_with_space_compared_encoded():
    r = router_for(route("/my docs/", "http://b/docs/"))
    assert target(r, normalize_path("/my%20docs/x")) == "/docs/x"


def test_rule_with_unreserved_escape_compared_decoded():
    r = router_for(route("/%7euser/", "http://b/u/"))
    assert target(r, normalize_path("/~user/x")) == "/u/x"


def test_result_type():
    router, vhost = router_for(route("/a", "http://b/c"))
    m = router.route_for(vhost, "/a/1", None, no_headers)
    assert isinstance(m, RouteMatch)
    assert m.route is vhost.routes[0]
    assert m.target == "/c/1"
    with pytest.raises(AttributeError):
        m.target = "/x"


# ---------------------------------------------------------------------------
# ordering and exclusions


def test_first_match_wins_not_longest():
    r = router_for(route("/", "http://general/") + route("/api/", "http://api/v1/"))
    router, vhost = r
    m = router.route_for(vhost, "/api/x", None, no_headers)
    assert m.route is vhost.routes[0] and m.target == "/api/x"


def test_specific_first():
    r = router_for(route("/api/", "http://api/v1/") + route("/", "http://general/"))
    router, vhost = r
    m = router.route_for(vhost, "/api/x", None, no_headers)
    assert m.route is vhost.routes[0] and m.target == "/v1/x"
    m = router.route_for(vhost, "/other", None, no_headers)
    assert m.route is vhost.routes[1] and m.target == "/other"


def test_exclusion_before_general_rule():
    r = router_for(route("/private") + route("/", "http://b/"))
    assert target(r, "/private") is None
    assert target(r, "/private/x") is None
    assert target(r, "/privateer") == "/privateer"
    assert target(r, "/public") == "/public"


def test_exclusion_after_general_rule_is_shadowed():
    r = router_for(route("/", "http://b/") + route("/private"))
    assert target(r, "/private/x") == "/private/x"


def test_regex_exclusion():
    r = router_for(route(regex=r"\.php$") + route("/", "http://b/"))
    assert target(r, "/x/index.php") is None
    assert target(r, "/x/index.html") == "/x/index.html"


def test_no_routes_and_no_match():
    assert target(router_for(""), "/x") is None
    assert target(router_for(route("/a", "http://b/")), "/b") is None


# ---------------------------------------------------------------------------
# regex routes (reference 1.4)


def test_regex_with_groups():
    r = router_for(route(regex=r"^/user/(\w+)/(\d+)$", url="http://b/u/$1/item/$2"))
    assert target(r, "/user/bob/42") == "/u/bob/item/42"
    assert target(r, "/user/bob/42", "x=1") == "/u/bob/item/42?x=1"
    assert target(r, "/user/bob/x") is None


def test_regex_unmatched_group_is_empty():
    r = router_for(route(regex=r"^/a(/x)?(/y)$", url="http://b/z$1$2"))
    assert target(r, "/a/y") == "/z/y"
    assert target(r, "/a/x/y") == "/z/x/y"


def test_regex_without_dollar_appends_whole_path():
    r = router_for(route(regex=r"\.gif$", url="http://b"))
    assert target(r, "/foo/x.gif") == "/foo/x.gif"
    assert target(r, "/foo/x.gif", "v=2") == "/foo/x.gif?v=2"
    r = router_for(route(regex=r"\.gif$", url="http://b/img"))
    assert target(r, "/foo/x.gif") == "/img/foo/x.gif"


def test_regex_is_search_not_match():
    r = router_for(route(regex=r"static", url="http://b/s"))
    assert target(r, "/a/static/b") == "/s/a/static/b"


def test_regex_group_into_url_query():
    r = router_for(route(regex=r"^/p/(\d+)$", url="http://b/page?id=$1"))
    assert target(r, "/p/7") == "/page?id=7"
    assert target(r, "/p/7", "x=1") == "/page?id=7&x=1"


def test_prefix_url_with_query():
    r = router_for(route("/a", "http://b/c?k=v"))
    assert target(r, "/a/x") == "/c/x?k=v"
    assert target(r, "/a/x", "q=1") == "/c/x?k=v&q=1"


# ---------------------------------------------------------------------------
# match_headers


def test_match_headers():
    r = router_for(route("/", "http://old/", extra='match_headers = {"User-Agent" = "(?i)msie"}')
                   + route("/", "http://new/"))
    router, vhost = r
    ie = headers(user_agent="Mozilla/4.0 (compatible; MSIE 6.0)")
    ff = headers(user_agent="Mozilla/5.0 Firefox")
    assert router.route_for(vhost, "/x", None, ie).route is vhost.routes[0]
    assert router.route_for(vhost, "/x", None, ff).route is vhost.routes[1]
    assert router.route_for(vhost, "/x", None, no_headers).route is vhost.routes[1]


def test_match_headers_all_required():
    r = router_for(route("/", "http://b/",
                         extra='match_headers = {"X-A" = "^1$", "X-B" = "yes"}'))
    assert target(r, "/", header=headers(x_a="1", x_b="oh yes")) == "/"
    assert target(r, "/", header=headers(x_a="1")) is None
    assert target(r, "/", header=headers(x_a="12", x_b="yes")) is None


def test_match_headers_lookup_uses_lower_case_name():
    seen = []

    def header(name):
        seen.append(name)
        return "v"

    r = router_for(route("/", "http://b/", extra='match_headers = {"X-Mixed-Case" = "v"}'))
    assert target(r, "/", header=header) == "/"
    assert seen == ["x-mixed-case"]


def test_match_headers_on_exclusion():
    r = router_for(route("/", extra='match_headers = {"X-Block" = "."}')
                   + route("/", "http://b/"))
    assert target(r, "/x", header=headers(x_block="1")) is None
    assert target(r, "/x") == "/x"


def test_match_headers_not_consulted_when_path_differs():
    def header(name):
        raise AssertionError("header looked up")

    r = router_for(route("/a", "http://b/", extra='match_headers = {"X" = "."}')
                   + route("/", "http://c/"))
    assert target(r, "/z", header=header) == "/z"


# ---------------------------------------------------------------------------
# query


@pytest.mark.parametrize("query", [
    "", "a=1", "a=1;b=2", "x=%2F%2f&y=%25", "a=%zz", "?odd", "a=/../b", "k=v&&k2",
])
def test_query_kept_byte_for_byte(query):
    r = router_for(route("/a", "http://b/c"))
    assert target(r, "/a/x", query) == f"/c/x?{query}"


def test_query_none_means_no_question_mark():
    assert target(router_for(route("/a", "http://b/c")), "/a") == "/c"


# ---------------------------------------------------------------------------
# balancer routes


def test_balancer_route():
    extra = '[balancer.pool]\n[[balancer.pool.member]]\nurl = "http://10.0.0.1:8000"\n'
    router, vhost = router_for(route("/app/", "balancer://pool/svc/"), extra)
    m = router.route_for(vhost, "/app/x", "a=1", no_headers)
    assert m.route.url.is_balancer
    assert m.target == "/svc/x?a=1"


# ---------------------------------------------------------------------------
# vhost selection

VHOSTS = LISTEN + '''
[[vhost]]
server_name = "default.test"

[[vhost]]
server_name = "example.org"
server_alias = ["www.example.org", "*.example.net"]

[[vhost]]
server_name = "other.test"
server_alias = "EXAMPLE.COM"

[[vhost]]
server_name = "a.example.net"

[[vhost]]
server_name = "[::1]"
'''


@pytest.fixture(scope="module")
def vhosts():
    config = loads(VHOSTS)
    return Router(config), {v.server_name: v for v in config.vhosts}


@pytest.mark.parametrize("host, name", [
    ("example.org", "example.org"),
    ("www.example.org", "example.org"),
    ("other.test", "other.test"),
    ("example.com", "other.test"),
    ("x.example.net", "example.org"),
    ("a.b.example.net", "example.org"),
    ("a.example.net", "example.org"),       # the wildcard comes first in the file
    ("example.net", "default.test"),         # "*.example.net" needs a label before it
    ("xexample.net", "default.test"),
    ("example.org:8080", "example.org"),
    ("EXAMPLE.Org", "example.org"),
    ("WWW.EXAMPLE.ORG:80", "example.org"),
    ("example.org.", "example.org"),
    ("example.org.:8080", "example.org"),
    ("[::1]:8080", "[::1]"),
    ("[::1]", "[::1]"),
    ("unknown.test", "default.test"),
    ("", "default.test"),
    ("127.0.0.1:8080", "default.test"),
    (None, "default.test"),
])
def test_vhost_for(vhosts, host, name):
    router, by_name = vhosts
    assert router.vhost_for(KEY, host) is by_name[name]
    assert router.vhost_for(KEY, host) is by_name[name]    # again, from the cache


def test_vhost_cache_is_bounded(vhosts):
    router, by_name = vhosts
    for i in range(3000):
        assert router.vhost_for(KEY, f"h{i}.example.net") is by_name["example.org"]
    assert len(router._listeners[KEY].cache) <= 1024
    assert router.vhost_for(KEY, "other.test") is by_name["other.test"]


PER_LISTENER = '''
[[listen]]
address = "127.0.0.2"
port = 80

[[listen]]
address = "127.0.0.3"
port = 80

[[vhost]]
server_name = "two.test"
listen = "127.0.0.2:80"

[[vhost]]
server_name = "three.test"
listen = ["127.0.0.3:80"]

[[vhost]]
server_name = "both.test"

[[vhost]]
server_name = "three-b.test"
listen = "127.0.0.3:80"
'''


def test_vhosts_per_listener():
    config = loads(PER_LISTENER)
    router = Router(config)
    two, three, both, three_b = config.vhosts
    a, b = "127.0.0.2:80", "127.0.0.3:80"
    assert router.vhost_for(a, "two.test") is two
    assert router.vhost_for(a, "both.test") is both
    assert router.vhost_for(a, "three.test") is two      # not served here: first vhost
    assert router.vhost_for(a, "three-b.test") is two
    assert router.vhost_for(a, None) is two
    assert router.vhost_for(b, "three.test") is three
    assert router.vhost_for(b, "three-b.test") is three_b
    assert router.vhost_for(b, "both.test") is both
    assert router.vhost_for(b, "two.test") is three
    assert router.vhost_for(b, "nope") is three


def test_routes_follow_the_chosen_vhost():
    config = loads(LISTEN + '''
[[vhost]]
server_name = "a.test"
[[vhost.route]]
path = "/"
url = "http://a/"

[[vhost]]
server_name = "b.test"
[[vhost.route]]
path = "/"
url = "http://b/x/"
''')
    router = Router(config)
    va = router.vhost_for(KEY, "a.test")
    vb = router.vhost_for(KEY, "b.test")
    assert router.route_for(va, "/p", None, no_headers).route.url.host == "a"
    assert router.route_for(vb, "/p", None, no_headers).target == "/x/p"


def test_ipv6_listener_key():
    config = loads('''
[[listen]]
address = "::1"
port = 8080

[[vhost]]
server_name = "localhost"

[[vhost]]
server_name = "six.test"
listen = "[::1]:8080"
''')
    router = Router(config)
    assert router.vhost_for("[::1]:8080", "[::1]:8080") is config.vhosts[0]
    assert router.vhost_for("[::1]:8080", "SIX.test.") is config.vhosts[1]

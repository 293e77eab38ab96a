"""twistproxy.apache.parser: Apache 2.4's httpd.conf syntax, rule by rule, and the fixtures."""

import os
import shutil
from pathlib import Path

import pytest

from twistproxy.apache import ApacheConfigError, Node, Parsed, parse, parse_text

FIXTURES = Path(__file__).parent / "fixtures" / "apache"


def nodes(text, **kw):
    return parse_text(text, file="/c.conf", **kw).nodes


def one(text, **kw):
    (node,) = nodes(text, **kw)
    return node


def error(text, **kw):
    with pytest.raises(ApacheConfigError) as e:
        parse_text(text, file="/c.conf", **kw)
    return str(e.value)


def write(root, name, text):
    p = Path(root) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


# -- the API's shapes ----------------------------------------------------------


def test_node_and_error_shapes():
    n = one("ProxyPass / http://a/\n")
    assert n == Node("ProxyPass", ("/", "http://a/"), "/c.conf", 1, None, "/ http://a/")
    assert (n.key, n.where, n.is_section) == ("proxypass", "/c.conf:1", False)
    e = ApacheConfigError("/f", 3, "bad")
    assert (e.file, e.line, e.message, str(e)) == ("/f", 3, "bad", "/f:3: bad")
    p = parse_text("", server_root="/")
    assert isinstance(p, Parsed) and p.nodes == () and p.server_root == "/"


# -- lines ---------------------------------------------------------------------


def test_continuation_joins_and_keeps_next_lines_leading_blanks():
    n = one("ServerAlias a \\\n    b\\\nc\n")
    assert n.args == ("a", "bc") and n.line == 1 and n.raw == "a     bc"


def test_continuation_line_numbers_and_crlf():
    ns = nodes("A 1 \\\r\n 2\r\nB 3\r\n")
    assert [(n.name, n.args, n.line) for n in ns] == [("A", ("1", "2"), 1), ("B", ("3",), 3)]


def test_backslash_then_blank_is_not_a_continuation():
    ns = nodes("A x\\ \nB y\n")
    assert [(n.name, n.args) for n in ns] == [("A", ("x\\",)), ("B", ("y",))]


def test_comments_only_at_line_start():
    ns = nodes("# a comment\n   # indented comment\nHeader set X a#b # c\n\n\t\n")
    assert [(n.name, n.args) for n in ns] == [("Header", ("set", "X", "a#b", "#", "c"))]
    assert ns[0].line == 3


def test_a_continued_comment_swallows_the_next_line():
    # checked with apache2 -t: the joined line is one comment
    assert nodes("# comment \\\nServerName a b c\nX 1\n")[0].name == "X"


def test_utf8_bom_and_no_trailing_newline():
    assert one("\ufeffA 1").args == ("1",)


# -- words ---------------------------------------------------------------------


def test_quotes_group_and_are_removed():
    assert one('A "x y" \'p q\' z\n').args == ("x y", "p q", "z")
    assert one('A "" \'\'\n').args == ("", "")


def test_escapes_inside_and_outside_quotes():
    n = one(r'''A "a\"b" 'c\'d' "e\\f" "g\nh" 'i\"j' k\\l m\"n''' + "\n")
    assert n.args == ('a"b', "c'd", "e\\f", "g\\nh", 'i\\"j', "k\\l", 'm\\"n')


def test_quote_ends_a_word_and_midword_quotes_are_literal():
    assert one('A "a"b c"d e"\n').args == ("a", "b", 'c"d', 'e"')


def test_unterminated_quote_takes_the_rest_of_the_line():
    # checked with apache2 -t: not an error
    assert one('ServerName "abc def\n').args == ("abc def",)


def test_directive_names_case_insensitive_args_as_written():
    n = one("proxyPASS /A/ HTTP://X/\n")
    assert (n.name, n.key, n.args) == ("proxyPASS", "proxypass", ("/A/", "HTTP://X/"))


# -- sections ------------------------------------------------------------------


def test_nested_sections():
    (vh,) = nodes(
        "<VirtualHost *:80 [::1]:80>\n"
        "  ServerName a\n"
        '  <Proxy "balancer://x">\n'
        "    BalancerMember http://b\n"
        "  </proxy>\n"
        "  <Location />\n  </Location>\n"
        "</VIRTUALHOST>\n"
    )
    assert (vh.name, vh.key, vh.args, vh.line, vh.raw) == (
        "VirtualHost", "virtualhost", ("*:80", "[::1]:80"), 1, "*:80 [::1]:80")
    assert vh.is_section
    assert [c.name for c in vh.children] == ["ServerName", "Proxy", "Location"]
    proxy = vh.children[1]
    assert proxy.args == ("balancer://x",) and proxy.line == 3
    assert proxy.children[0].args == ("http://b",)
    assert vh.children[2].children == ()


def test_section_without_args_and_text_after_the_bracket():
    n = one("<Foo>\n</Foo>\n")
    assert (n.name, n.args, n.children) == ("Foo", (), ())
    assert one("<Location /x> ignored\n</Location>\n").args == ("/x",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<VirtualHost *:80>\n</Location>\n",
         "/c.conf:2: Expected </VirtualHost> but saw </Location>"),
        ("</Location>\n", "/c.conf:1: </Location> without matching <Location> section"),
        ("<VirtualHost *:80>\nA\n", "/c.conf:1: <VirtualHost> was not closed."),
        ("<A>\n<B>\n</B>\n", "/c.conf:1: <A> was not closed."),
        ("<Location /x\n</Location>\n", "/c.conf:1: <Location> directive missing closing '>'"),
        ("<A>\n</A\n", "/c.conf:2: </A> directive missing closing '>'"),
    ],
)
def test_section_errors(text, message):
    assert error(text) == message


def test_a_section_does_not_span_files(tmp_path):
    write(tmp_path, "in.conf", "</VirtualHost>\n")
    assert error("<VirtualHost *>\nInclude in.conf\n</VirtualHost>\n",
                 server_root=str(tmp_path)) == (
        f"{tmp_path}/in.conf:1: </VirtualHost> without matching <VirtualHost> section")


# -- Include -------------------------------------------------------------------


def test_include_relative_to_server_root_spliced_in_order(tmp_path):
    write(tmp_path, "conf.d/b.conf", "B 1\n")
    write(tmp_path, "conf.d/a.conf", "A 1\n")
    write(tmp_path, "conf.d/.hidden.conf", "H 1\n")
    write(tmp_path, "conf.d/c.txt", "C 1\n")
    write(tmp_path, "one.conf", "O 1\n")
    p = parse_text("X\nInclude conf.d/*.conf\ninclude one.conf\nY\n", file="/c.conf",
                   server_root=str(tmp_path))
    assert [(n.name, os.path.basename(n.file), n.line) for n in p.nodes] == [
        ("X", "c.conf", 1), ("A", "a.conf", 1), ("B", "b.conf", 1), ("O", "one.conf", 1),
        ("Y", "c.conf", 4)]
    assert p.files == ("/c.conf", f"{tmp_path}/conf.d/a.conf", f"{tmp_path}/conf.d/b.conf",
                       f"{tmp_path}/one.conf")


def test_include_sorts_bytewise_and_absolute_paths(tmp_path):
    for name in ["b.conf", "B.conf", "a10.conf", "a9.conf"]:
        write(tmp_path, name, f"N {name}\n")
    ns = nodes(f"Include {tmp_path}/*.conf\n")
    assert [n.args[0] for n in ns] == ["B.conf", "a10.conf", "a9.conf", "b.conf"]


def test_include_wildcard_in_a_directory_component(tmp_path):
    write(tmp_path, "sites/x/a.conf", "A\n")
    write(tmp_path, "sites/y/a.conf", "B\n")
    write(tmp_path, "sites/zfile", "not a dir\n")
    ns = nodes("Include sites/*/a.conf\n", server_root=str(tmp_path))
    assert [n.name for n in ns] == ["A", "B"]


def test_include_directory_is_recursive_and_sorted(tmp_path):
    write(tmp_path, "d/b", "B\n")
    write(tmp_path, "d/a/z.conf", "Z\n")
    write(tmp_path, "d/.h", "H\n")
    assert [n.name for n in nodes("Include d\n", server_root=str(tmp_path))] == ["H", "Z", "B"]


def test_include_in_a_section_and_in_a_conditional(tmp_path):
    write(tmp_path, "in.conf", "ProxyPass / http://x/\n")
    (vh,) = nodes("<VirtualHost *>\n<IfModule core.c>\nInclude in.conf\n</IfModule>\n"
                  "</VirtualHost>\n", server_root=str(tmp_path))
    assert [c.name for c in vh.children] == ["ProxyPass"]


def test_include_optional_skips_what_is_missing(tmp_path):
    write(tmp_path, "d/x.txt", "X\n")
    text = ("IncludeOptional nothere.conf\nIncludeOptional nothere/*.conf\n"
            "IncludeOptional d/*.conf\nIncludeOptional */nothere.conf\nA\n")
    assert [n.name for n in nodes(text, server_root=str(tmp_path))] == ["A"]


def test_include_errors(tmp_path):
    root = str(tmp_path)
    write(tmp_path, "d/x.txt", "X\n")
    assert error("A\nInclude nothere.conf\n", server_root=root) == (
        f"/c.conf:2: Could not open configuration file {root}/nothere.conf: "
        "No such file or directory")
    assert error("Include d/*.conf\n", server_root=root) == (
        f"/c.conf:1: Include/IncludeOptional: No matches for the wildcard '*.conf' in "
        f"'{root}/d', failing")
    assert error("Include nothere/*.conf\n", server_root=root) == (
        f"/c.conf:1: Include/IncludeOptional: Could not open directory {root}/nothere: "
        "No such file or directory")
    assert error("Include n*/x.conf\n", server_root=root) == (
        f"/c.conf:1: Include/IncludeOptional: No matches for the wildcard 'n*' in "
        f"'{root}', failing")
    assert error("Include\n") == "/c.conf:1: Include takes one argument"
    assert error("IncludeOptional a b\n") == "/c.conf:1: IncludeOptional takes one argument"


def test_include_loop_is_an_error_at_the_include_line(tmp_path):
    a = write(tmp_path, "a.conf", "A\nInclude b.conf\n")
    b = write(tmp_path, "b.conf", "B\n\nInclude a.conf\n")
    with pytest.raises(ApacheConfigError) as e:
        parse(a)
    assert str(e.value) == f"{b}:3: Include loop: {a} -> {b} -> {a}"
    write(tmp_path, "self.conf", "Include self.conf\n")
    assert error("Include self.conf\n", server_root=str(tmp_path)) == (
        f"{tmp_path}/self.conf:1: Include loop: {tmp_path}/self.conf -> {tmp_path}/self.conf")


def test_the_same_file_twice_is_not_a_loop(tmp_path):
    write(tmp_path, "x.conf", "X\n")
    assert len(nodes("Include x.conf\nInclude x.conf\n", server_root=str(tmp_path))) == 2


def test_server_root_directive_moves_later_includes(tmp_path):
    write(tmp_path, "one/x.conf", "ONE\n")
    write(tmp_path, "two/x.conf", "TWO\n")
    p = parse_text(f"Include x.conf\nServerRoot {tmp_path}/two\nInclude x.conf\n",
                   file="/c.conf", server_root=str(tmp_path / "one"))
    assert [n.name for n in p.nodes] == ["ONE", "ServerRoot", "TWO"]
    assert p.server_root == f"{tmp_path}/two"
    assert error(f"ServerRoot {tmp_path}/nothere\n") == (
        "/c.conf:1: ServerRoot must be a valid directory")


def test_main_file_unreadable(tmp_path):
    missing = str(tmp_path / "nothere.conf")
    with pytest.raises(ApacheConfigError) as e:
        parse(missing)
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"
    assert (e.value.file, e.value.line) == (missing, 0)


def test_parse_defaults_server_root_to_the_files_folder(tmp_path):
    write(tmp_path, "x.conf", "X\n")
    main = write(tmp_path, "main.conf", "Include x.conf\n")
    p = parse(os.path.relpath(main))
    assert p.server_root == str(tmp_path) and p.files[0] == main
    assert p.nodes[0].file == f"{tmp_path}/x.conf"


# -- Define and ${VAR} -----------------------------------------------------------


def test_define_and_expansion():
    p = parse_text('Define H 10.0.0.1\nDefine P "80 81"\nDefine FLAG\n'
                   "<VirtualHost ${H}:80>\nListen ${H}:${P}\n</VirtualHost>\n"
                   "A ${H?=x} ${NOPE?=dflt} $H $ ${}\n", file="/c.conf")
    vh, a = p.nodes
    assert vh.args == ("10.0.0.1:80",) and vh.raw == "${H}:80"
    # expanded before the line is split into words, as Apache does
    assert vh.children[0].args == ("10.0.0.1:80", "81")
    assert vh.children[0].raw == "${H}:${P}"
    assert a.args == ("10.0.0.1", "dflt", "$H", "$", "${}")
    assert p.defines == {"H": "10.0.0.1", "P": "80 81", "FLAG": ""}


def test_undefined_variable_kept_with_a_warning():
    p = parse_text("Define FLAG\nA ${NOPE} ${FLAG} ${x:y}\n", file="/c.conf")
    assert p.nodes[0].args == ("${NOPE}", "${FLAG}", "${x:y}")
    assert p.warnings == ("/c.conf:2: Config variable ${NOPE} is not defined",
                          "/c.conf:2: Config variable ${FLAG} is not defined")


def test_define_applies_from_where_it_is_read():
    assert [n.args for n in nodes("A ${V}\nDefine V 1\nA ${V}\nUnDefine V\nA ${V}\n")] == [
        ("${V}",), ("1",), ("${V}",)]


def test_undefine_and_command_line_defines():
    p = parse_text("UnDefine D1\nDefine D3 x\nUnDefine D3\n", defines=["D1", "D2"])
    assert p.defines == {"D2": ""}


@pytest.mark.parametrize(
    "text, message",
    [
        ("Define\n", "/c.conf:1: Define takes 1-2 arguments"),
        ("Define a b c\n", "/c.conf:1: Define takes 1-2 arguments"),
        ("UnDefine\n", "/c.conf:1: UnDefine takes one argument"),
        ("Define a:b 1\n", "/c.conf:1: Variable name must not contain ':'"),
        ("UnDefine a:b\n", "/c.conf:1: Variable name must not contain ':'"),
    ],
)
def test_define_errors(text, message):
    assert error(text) == message


# -- conditionals ----------------------------------------------------------------


def test_ifmodule_builtins_and_loadmodule():
    text = ("<IfModule proxy_module>\nA\n</IfModule>\n"
            "LoadModule proxy_module /usr/lib/apache2/modules/mod_proxy.so\n"
            "<IfModule proxy_module>\nB\n</IfModule>\n"
            "<IfModule mod_proxy.c>\nC\n</IfModule>\n"
            "<ifmodule !mod_proxy.c>\nD\n</ifmodule>\n"
            "<IfModule mod_version.c>\nE\n</IfModule>\n"
            "<IfModule log_config_module>\nF\n</IfModule>\n"
            "<IfModule !mod_ssl.c>\nG\n</IfModule>\n")
    p = parse_text(text)
    assert [n.name for n in p.nodes] == ["LoadModule", "B", "C", "E", "F", "G"]
    assert {"proxy_module", "mod_proxy.c", "core.c", "mod_so.c"} <= p.modules
    assert "ssl_module" not in p.modules


def test_conditionals_splice_in_place_and_nest():
    (vh,) = nodes("<VirtualHost *>\nA\n<IfDefine X>\nB\n<IfDefine !Y>\nC\n</IfDefine>\n"
                  "</IfDefine>\nD\n</VirtualHost>\n", defines=["X"])
    assert [c.name for c in vh.children] == ["A", "B", "C", "D"]


def test_false_conditional_body_is_skipped_unread(tmp_path):
    text = ("<IfDefine NOPE>\nInclude nothere.conf\nDefine V 1\n<Location x>\nLoadModule a b.so\n"
            "</Location>\n${V}\n</IfDefine>\nA ${V}\n")
    p = parse_text(text, server_root=str(tmp_path))
    assert [(n.name, n.args) for n in p.nodes] == [("A", ("${V}",))]
    assert "a" not in p.modules and p.defines == {}


def test_ifdefine_with_define_and_command_line():
    text = "Define ONE\n<IfDefine ONE>\nA\n</IfDefine>\n<IfDefine TWO>\nB\n</IfDefine>\n" \
           "<IfDefine !TWO>\nC\n</IfDefine>\n"
    assert [n.name for n in nodes(text)] == ["A", "C"]
    assert [n.name for n in nodes(text, defines=["TWO"])] == ["A", "B"]


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("2.4", False), ("2.4.62", True), ("= 2.4.62", True), ("== 2.4.62", True),
        ("> 2.4", True), (">= 2.4.62", True), ("< 2.5", True), ("<= 2.4.61", False),
        ("!= 2.4.62", False), ("!< 2.4", True),
        ("~ ^2\\.4", True), ("~ ^2\\.2", False), ("/^2\\.4\\./", True), ("= /^3/", False),
        ("!~ ^2\\.2", True), ('"2.4.62"', True),
    ],
)
def test_ifversion(arg, expected):
    ns = nodes(f"<IfVersion {arg}>\nA\n</IfVersion>\n")
    assert bool(ns) is expected


def test_ifversion_uses_the_given_version():
    assert nodes("<IfVersion < 2.4>\nA\n</IfVersion>\n", version=(2, 2, 34))


@pytest.mark.parametrize(
    "text, message",
    [
        ("<IfVersion foo 2.4>\n</IfVersion>\n", "/c.conf:1: unrecognized operator 'foo'"),
        # mod_version: a lone "!" is not an operator
        ("<IfVersion ! 2.4>\n</IfVersion>\n", "/c.conf:1: unrecognized operator '!'"),
        ("<IfVersion 2.x>\n</IfVersion>\n",
         "/c.conf:1: Version appears to be invalid. It must have the format "
         "major[.minor[.patch]] where major, minor and patch are numbers."),
        ("<IfVersion = /2.4>\n</IfVersion>\n",
         "/c.conf:1: Missing delimiting / of regular expression."),
        ("<IfVersion>\n</IfVersion>\n", "/c.conf:1: <IfVersion> takes one or two arguments"),
        ("<IfVersion < 2 4>\n</IfVersion>\n",
         "/c.conf:1: <IfVersion> takes one or two arguments"),
        ("<IfModule>\n</IfModule>\n",
         "/c.conf:1: <IfModule> directive requires exactly one argument"),
        ("<IfDefine !>\n</IfDefine>\n",
         "/c.conf:1: <IfDefine> directive requires exactly one argument"),
        ("<IfDefine A B>\n</IfDefine>\n",
         "/c.conf:1: <IfDefine> directive requires exactly one argument"),
        ("<IfDefine X\n</IfDefine>\n", "/c.conf:1: <IfDefine> directive missing closing '>'"),
        ("A\n<IfDefine X>\nB\n", "/c.conf:2: Expected </IfDefine> before end of configuration"),
        ("<IfDefine !X>\nB\n", "/c.conf:1: Expected </IfDefine> before end of configuration"),
        ("<IfDefine X>\n<A>\n", "/c.conf:2: Expected </A> before end of configuration"),
        ("<IfDefine X>\n<A>\n</B>\n</IfDefine>\n", "/c.conf:3: Expected </A> but saw </B>"),
        ("<IfDefine X>\n</IfModule>\n", "/c.conf:2: Expected </IfDefine> but saw </IfModule>"),
        ("<IfDefine X>\n</IfDefine\n", "/c.conf:2: </IfDefine> directive missing closing '>'"),
        ("<IfDefine !X>\n</IfModule>\n",
         "/c.conf:2: Expected </IfDefine> but saw </IfModule>"),
        ("<IfModule core.c>\n<A>\n</IfModule>\n",
         "/c.conf:3: Expected </A> but saw </IfModule>"),
    ],
)
def test_conditional_errors(text, message):
    assert error(text) == message


# -- the fixtures (each passes apache2 -t; see fixtures/apache/check-with-apache.sh) ------


def debian(tmp_path=None, **kw):
    root = FIXTURES / "debian"
    return parse(str(root / "apache2.conf"), server_root=str(root), **kw)


def walk(ns):
    for n in ns:
        yield n
        if n.children:
            yield from walk(n.children)


def test_fixture_debian_includes_in_order():
    p = debian()
    root = str(FIXTURES / "debian")
    rel = [os.path.relpath(f, root) for f in p.files]
    assert rel[0] == "apache2.conf"
    assert rel[1:10] == sorted(rel[1:10]) and all(r.startswith("mods-enabled/") for r in rel[1:10])
    assert rel[10:] == ["ports.conf", "conf-enabled/security.conf",
                        "sites-enabled/000-default.conf"]
    assert [n.key for n in p.nodes][:6] == [
        "pidfile", "errorlog", "timeout", "keepalive", "maxkeepaliverequests",
        "keepalivetimeout"]
    assert p.defines == {"APP_HOST": "127.0.0.1", "APP_PORT": "8080"}
    assert {"proxy_module", "mod_proxy.c", "mod_headers.c", "mod_lbmethod_bytraffic.c"} <= p.modules
    assert p.warnings == ()


def test_fixture_debian_conditionals_and_variables():
    p = debian()
    listens = [n.args for n in p.nodes if n.key == "listen"]
    assert listens == [("127.0.0.1:18083",)]  # neither ssl_module nor mod_gnutls.c is loaded
    header = next(n for n in p.nodes if n.key == "header")
    assert header.args == ("always", "set", "X-Content-Type-Options", "nosniff")
    vh = p.nodes[-1]
    assert (vh.key, vh.args, vh.line) == ("virtualhost", ("127.0.0.1:18083",), 1)
    keys = [c.key for c in vh.children]
    assert keys[:5] == ["servername", "serveralias", "proxypreservehost", "proxyaddheaders", "proxy"]
    proxy = vh.children[4]
    assert proxy.args == ("balancer://farm",)
    member = proxy.children[0]
    assert member.args == ("http://127.0.0.1:8101", "route=a", "loadfactor=3",
                           "connectiontimeout=2", "retry=30")
    assert member.line == 8 and "\\" not in member.raw
    pp = next(c for c in vh.children if c.key == "proxypass" and c.args[0] == "/")
    assert pp.args == ("/", "http://127.0.0.1:8080/", "timeout=60")
    assert next(c for c in vh.children if c.key == "header").args == (
        "edit", "Location", "^http://app\\.internal/", "/")


def test_fixture_debian_no_farm():
    vh = debian(defines=["NO_FARM"]).nodes[-1]
    assert [c.key for c in vh.children if c.key.startswith("proxy")] == [
        "proxypreservehost", "proxyaddheaders", "proxypass", "proxypassreverse",
        "proxypassreversecookiedomain"]
    assert not any(n.key == "balancermember" for n in walk(vh.children))


def test_fixture_debian_from_another_cwd_and_copied(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "debian", tmp_path / "d")
    monkeypatch.chdir(tmp_path / "d")
    p = parse("apache2.conf")
    assert p.server_root == str(tmp_path / "d") and len(p.files) == 13


def test_fixture_iis_port80():
    p = parse(str(FIXTURES / "iis-port80.conf"))
    vhosts = [n for n in p.nodes if n.key == "virtualhost"]
    assert [v.args for v in vhosts] == [("127.0.0.1:18080",), ("127.0.0.1:18080",),
                                        ("127.0.0.2:18080",)]
    assert [c.args for c in vhosts[0].children if c.key == "proxypass"] == [
        ("/apache-apps", "!"), ("/", "http://127.0.0.1:8080/")]
    cond = [c for c in vhosts[2].children if c.key == "rewritecond"]
    assert cond[1].args == ("%{HTTP_USER_AGENT}", "MSIE [5-8]\\.")
    assert cond[1].raw == '%{HTTP_USER_AGENT} "MSIE [5-8]\\."'
    assert "rewrite_module" in p.modules and p.files == (str(FIXTURES / "iis-port80.conf"),)


def test_fixture_iis_farm_sticky():
    p = parse(str(FIXTURES / "iis-farm-sticky.conf"))
    proxy = next(n for n in p.nodes if n.key == "proxy")
    assert proxy.args == ("balancer://mycluster",)
    assert [c.key for c in proxy.children] == ["order", "allow", "balancermember",
                                               "balancermember", "balancermember"]
    assert proxy.children[0].args == ("deny,allow",)
    pp = next(n for n in p.nodes if n.key == "proxypass")
    assert pp.args[2:] == ("lbmethod=byrequests", "stickysession=BALANCEID", "nofailover=On")


def test_fixture_howto():
    p = parse(str(FIXTURES / "howto.conf"))
    vhosts = [n for n in p.nodes if n.key == "virtualhost"]
    assert len(vhosts) == 5
    match = next(n for n in walk(p.nodes) if n.key == "proxypassmatch")
    assert match.args == ("^/legacy/(.*)\\.aspx$", "http://127.0.0.1:8080/app/$1.aspx")
    cookie = next(n for n in walk(p.nodes) if n.key == "header" and n.args[0] == "add")
    assert cookie.args == ("add", "Set-Cookie", "ROUTEID=.%{BALANCER_WORKER_ROUTE}e; path=/",
                           "env=BALANCER_ROUTE_CHANGED")
    ssl = vhosts[-1]
    assert next(c for c in ssl.children if c.key == "sslcertificatefile").args == (
        "tls/secure.example.com.pem",)
    assert [n.key for n in p.nodes if n.is_section] == ["proxy"] + ["virtualhost"] * 5

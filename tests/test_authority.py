"""The one check of Host values, absolute-form authorities and CONNECT targets
(twistproxy.authority), with Apache's `HttpProtocolOptions Strict` answers as the
reference: each rejected spelling here was checked against Apache 2.4 (400)."""

from __future__ import annotations

import pytest

from twistproxy.authority import absolute_form, host_port, split_authority


@pytest.mark.parametrize("value, parts", [
    (b"example.com", (b"example.com", None)),
    (b"Example.COM:8080", (b"Example.COM", 8080)),
    (b"example.com.", (b"example.com.", None)),        # the root's dot
    (b"localhost", (b"localhost", None)),
    (b"a_b.c", (b"a_b.c", None)),
    (b"-a.b", (b"-a.b", None)),
    (b"xn--bcher-kva.de:1", (b"xn--bcher-kva.de", 1)),
    (b"1.2.3.a", (b"1.2.3.a", None)),                  # ends in a name: a name
    (b"0xdead.example", (b"0xdead.example", None)),
    (b"127.0.0.1", (b"127.0.0.1", None)),
    (b"0.0.0.0:80", (b"0.0.0.0", 80)),
    (b"255.255.255.255:65535", (b"255.255.255.255", 65535)),
    (b"a:080", (b"a", 80)),                             # Apache takes leading zeros too
    (b"[::1]", (b"[::1]", None)),
    (b"[::1]:8443", (b"[::1]", 8443)),
    (b"[2001:DB8::1]", (b"[2001:DB8::1]", None)),
    (b"[::ffff:1.2.3.4]:1", (b"[::ffff:1.2.3.4]", 1)),
])
def test_valid_authorities_split(value, parts):
    assert split_authority(value) == parts


@pytest.mark.parametrize("value", [
    # non-canonical IPv4: octal, hex, fewer or more than four parts, a bare number
    b"0177.0.0.1", b"01.2.3.4", b"1.2.3.04", b"0x7f.0.0.1", b"0x7f", b"127.1", b"127.0.1",
    b"2130706433", b"123", b"1.2.3.4.5", b"256.1.1.1", b"1.2.3.4.", b"a.1", b"1a.2.3.4",
    b"a.b.c.0x1",
    # junk after the port, doubled colons, bad ports
    b"a:80x", b"a::80", b"a:b:c", b"a:", b"a:0", b"a:65536", b"a:99999", b"a:+80", b"a: 80",
    b"a:8080:1", b"localhost:http",
    # unbracketed or broken IPv6
    b"::1", b"[::1", b"::1]", b"[::1]x", b"[::1]:", b"[::g]", b"[fe80::1%25eth0]",
    b"[fe80::1%eth0]", b"[v1.x]", b"[1:2:3:4:5:6:7:8:9]", b"[::1]:80:80", b"[]",
    # not a reg-name
    b"", b".", b"..", b".a", b"a..b", b"a b", b"a%41", b"a~b", b"a!b", b"u@a", b"a/b",
    b"a\\b", b":80",
])
def test_invalid_authorities_refused(value):
    assert split_authority(value) is None


def test_host_port_needs_a_port_unless_given_a_default():
    assert host_port(b"example.com:443") == ("example.com", 443)
    assert host_port(b"[::1]:8443") == ("::1", 8443)
    assert host_port(b"example.com") is None
    assert host_port(b"example.com", 80) == ("example.com", 80)
    assert host_port(b"[::1]", 443) == ("::1", 443)
    assert host_port(b"0177.0.0.1:443") is None


@pytest.mark.parametrize("target, parts", [
    (b"http://example.com/a?b", (b"http", b"example.com", b"/a?b")),
    (b"HTTPS://example.com:8443", (b"https", b"example.com:8443", b"/")),
    (b"http://example.com?x=1", (b"http", b"example.com", b"/?x=1")),
    (b"http://[::1]:80/x", (b"http", b"[::1]:80", b"/x")),
])
def test_absolute_form_split(target, parts):
    assert absolute_form(target) == parts


@pytest.mark.parametrize("target", [
    b"http:///x", b"http://u@example.com/", b"http://0177.0.0.1/", b"http://a:80x/",
    b"http://a::80/", b"http://::1/", b"http://a:/", b"ftp://example.com/", b"http:/a/",
])
def test_bad_absolute_form_refused(target):
    assert absolute_form(target) is None

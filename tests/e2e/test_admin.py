"""The admin listener and balancer-manager end to end: real proxy, real echo members,
real HTTP POSTs with Apache's form fields and the nonce read from the page.

Every change is checked by the next requests' distribution (the echo backends name
themselves in "server") and by the manager's JSON; every refusal path checks that the
JSON and the distribution did not change.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
from collections import Counter
from urllib.parse import urlencode

import pytest

from clients import fetch
from harness import ROOT, Lab, free_port


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def config(ports, members, admin: str = "", balancer: str = "", routes: str = "") -> str:
    """A master and its worker (the default): the master owns the admin pages, the
    worker applies what they change (several workers: test_reload.py)."""
    out = [f"""
[server]
access_log = "-"
worker_processes = 1

[[listen]]
address = "127.0.0.1"
port = {ports[0]}

[admin]
port = {ports['admin']}
{admin}

[[vhost]]
server_name = "proxy.test"
{routes}
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"

[balancer.farm]
stickysession = "ROUTEID"
{balancer}
"""]
    for name, url in members:
        out.append(f'  [[balancer.farm.member]]\n  url = "{url}"\n  route = "{name}"\n')
    return "".join(out)


class Manager:
    """A client of the manager: JSON state, the nonce, POSTs as a browser sends them."""

    def __init__(self, port: int, path: str = "/balancer-manager", auth=None):
        self.port = port
        self.path = path
        self.host = f"127.0.0.1:{port}"
        self.auth = auth

    def headers(self, extra=None) -> dict:
        h = {}
        if self.auth:
            h["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        h.update(extra or {})
        return h

    def get(self, query: str = "", headers=None):
        return fetch(self.port, self.path + query, self.headers(headers), host=self.host)

    def state(self) -> dict:
        r = self.get("?format=json")
        assert r.status == 200, r
        return r.json()

    def members(self) -> dict:
        (b,) = self.state()["balancers"]
        return {m["route"] or m["name"]: (m["status"], m["loadfactor"], m["lbset"])
                for m in b["members"]}

    def nonce(self) -> str:
        return self.state()["balancers"][0]["nonce"]

    def member_url(self, route: str) -> str:
        (b,) = self.state()["balancers"]
        return next(m["name"] for m in b["members"] if m["route"] == route)

    def post(self, fields: dict, referer: str | None = "self", headers=None):
        h = {"Content-Type": "application/x-www-form-urlencoded"}
        if referer == "self":
            h["Referer"] = f"http://{self.host}{self.path}"
        elif referer:
            h["Referer"] = referer
        h.update(headers or {})
        return fetch(self.port, self.path, self.headers(h), host=self.host, method="POST",
                     body=urlencode(fields).encode())

    def change(self, route: str | None = None, **fields):
        form = {"b": "farm", "nonce": self.nonce(), **fields}
        if route is not None:
            form["w"] = self.member_url(route)
        r = self.post(form)
        assert r.status == 200, r.body
        return r


def spread(port: int, n: int = 12, cookie: str | None = None) -> Counter:
    headers = {"Cookie": f"ROUTEID=x.{cookie}"} if cookie else None
    return Counter(fetch(port, "/", headers).echo["server"] for _ in range(n))


@pytest.fixture
def farm(lab):
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)],
                                           balancer="growth = 1"))
    return proxy, Manager(proxy.ports["admin"]), lab


def test_drain_takes_no_new_clients_keeps_sticky_ones_and_comes_back(farm):
    proxy, mgr, _ = farm
    assert set(spread(proxy.port)) == {"a", "b"}
    mgr.change("a", w_status_N="1")
    assert mgr.members()["a"][0] == "Init Drn Ok"
    assert spread(proxy.port) == Counter(b=12)
    assert spread(proxy.port, 4, cookie="a") == Counter(a=4)       # sticky clients stay
    mgr.change("a", w_status_N="0")
    assert set(spread(proxy.port)) == {"a", "b"}
    line = proxy.wait_for_line("manager: 127.0.0.1 -", "status.N True -> False")
    assert "balancer://farm member http://127.0.0.1:" in line


def test_disable_and_enable_a_member_by_post(farm):
    proxy, mgr, _ = farm
    mgr.change("b", w_status_D="1")
    assert mgr.members()["b"][0] == "Init Dis"
    assert spread(proxy.port) == Counter(a=12)
    mgr.change("b", w_status_D="0")
    assert spread(proxy.port) == Counter(a=6, b=6)


def test_loadfactor_changes_the_next_requests_share(farm):
    proxy, mgr, _ = farm
    mgr.change("a", w_lf="3")
    assert mgr.members()["a"][1] == 3.0
    got = spread(proxy.port, 40)
    assert 27 <= got["a"] <= 33 and got["a"] + got["b"] == 40, got


def test_added_member_starts_disabled_then_takes_requests_when_enabled(farm):
    proxy, mgr, lab = farm
    c = lab.echo("c")
    mgr.change(b_wyes="1", b_nwrkr=c.url)
    assert mgr.members()[c.url][0] == "Init Dis"
    assert "c" not in spread(proxy.port)
    mgr.change(w=c.url, w_status_D="0")
    assert spread(proxy.port) == Counter(a=4, b=4, c=4)
    r = mgr.post({"b": "farm", "nonce": mgr.nonce(), "b_wyes": "1",
                  "b_nwrkr": "http://127.0.0.1:9"})
    assert r.status == 400 and b"b_nwrkr" in r.body and b"growth 1" in r.body


def test_a_post_that_changes_nothing_answers_200(farm):
    _, mgr, _ = farm
    before = mgr.members()
    r = mgr.post({"b": "farm", "w": mgr.member_url("a"), "nonce": mgr.nonce(),
                  "w_lf": "1", "w_status_D": "0"})
    assert r.status == 200 and b"LoadBalancer Status for" in r.body
    assert mgr.members() == before


def test_balancer_form_sent_back_unchanged_changes_nothing(farm):
    """The form shows the derived failover attempts (members - 1): sent back as it
    was, that must not pin the default to a number."""
    proxy, mgr, _ = farm
    b = mgr.state()["balancers"][0]
    r = mgr.post({"b": "farm", "nonce": b["nonce"], "b_lbm": b["lbmethod"],
                  "b_tmo": "0", "b_max": str(b["maxattempts"]), "b_sforce": "0",
                  "b_ss": "ROUTEID"})
    assert r.status == 200, r.body
    assert not proxy.log_lines("manager: "), "an unchanged form made a change"


def form(**fields):
    """A refused form: the nonce read from the page unless `nonce` is given."""
    return lambda m: {"b": "farm", "nonce": m.nonce(), **fields}


REFUSALS = [   # (id, form, Referer, status, what the message names)
    ("no-nonce", lambda m: {"b": "farm", "w_status_D": "1"}, "self", 403, b"nonce"),
    ("wrong-nonce", form(nonce="guess", w_status_D="1"), "self", 403, b"nonce"),
    ("foreign-referer", form(w_status_D="1"), "http://evil.example/page", 403, b"Referer"),
    ("no-referer", form(w_status_D="1"), None, 403, b"Referer"),
    ("lf-out-of-range", form(w_status_D="1", w_lf="500"), "self", 400, b"w_lf"),
    ("lbset-out-of-range", form(w_ls="100"), "self", 400, b"w_ls"),
    ("status-not-0-or-1", form(w_status_D="2"), "self", 400, b"w_status_D"),
    ("unknown-field", form(w_status_D="1", w_color="red"), "self", 400, b"w_color"),
    ("unknown-lbmethod", form(b_lbm="random"), "self", 400, b"b_lbm"),
    ("timeout-out-of-range", form(b_tmo="9000"), "self", 400, b"b_tmo"),
]


@pytest.mark.parametrize("make, referer, status, named", [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refused_post_changes_nothing(farm, make, referer, status, named):
    proxy, mgr, _ = farm
    before = mgr.state()["balancers"][0]
    fields = make(mgr)
    if "w_status_D" in fields or "w_lf" in fields or "w_ls" in fields:
        fields["w"] = mgr.member_url("a")
    r = mgr.post(fields, referer=referer)
    assert r.status == status and named in r.body, r.body
    after = mgr.state()["balancers"][0]
    assert [(m["status"], m["loadfactor"], m["lbset"]) for m in after["members"]] == \
        [(m["status"], m["loadfactor"], m["lbset"]) for m in before["members"]]
    assert (after["lbmethod"], after["timeout"]) == (before["lbmethod"], before["timeout"])
    assert spread(proxy.port) == Counter(a=6, b=6)


def test_get_with_change_fields_changes_nothing(farm):
    proxy, mgr, _ = farm
    before = mgr.members()
    r = mgr.get(f"?b=farm&w={mgr.member_url('a')}&nonce={mgr.nonce()}&w_status_D=1",
                {"Referer": f"http://{mgr.host}/balancer-manager"})
    assert r.status == 405 and b"POST" in r.body
    assert mgr.members() == before and spread(proxy.port) == Counter(a=6, b=6)


def test_page_in_apaches_shape_for_tools_that_scrape_it(farm):
    _, mgr, _ = farm
    nonce, url = mgr.nonce(), mgr.member_url("a")
    for path in ("/balancer-manager", "/balancer-manager/"):
        page = fetch(mgr.port, path, host=mgr.host).body.decode()
        assert re.search(r"Server Version: Apache/2\.4\.\d+ \(twistproxy [^;]+; compatible\)",
                         page)
        assert f'href="{path}?b=farm&amp;w={url}&amp;nonce={nonce}"' in page
        assert page.index("<th>MaxMembers</th>") < page.index("<th>Worker URL</th>")
        assert "<td>Init Ok </td>" in page and "<td>3 [2 Used]</td>" in page
    edit = mgr.get(f"?b=farm&w={url}&nonce={nonce}").body.decode()
    assert edit.index("<th>MaxMembers</th>") < edit.index("<th>Worker URL</th>") < \
        edit.index("Edit worker settings for") < edit.index("name=\"w_lf\"")
    xml = mgr.get("?xml=1").body.decode()
    assert f"<httpd:nonce>{nonce}</httpd:nonce>" in xml and \
        f"<httpd:name>{url}</httpd:name>" in xml
    r = fetch(mgr.port, "/balancer-manager", {"Accept": "application/json"}, host=mgr.host)
    (m, _) = r.json()["balancers"][0]["members"]
    assert {"elected", "busy", "transferred", "read", "responses", "errors", "pool"} <= set(m)


def test_page_is_escaped(lab):
    a = lab.echo("a")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url + "/x<y>")]))
    page = fetch(proxy.ports["admin"], "/balancer-manager",
                 host=f"127.0.0.1:{proxy.ports['admin']}").body
    assert b"x<y>" not in page and b"x&lt;y&gt;" in page


def test_client_outside_admin_allow_is_refused_and_changes_nothing(lab):
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)],
                                           admin='allow = ["10.0.0.0/8"]'))
    mgr = Manager(proxy.ports["admin"])
    r = mgr.get("?format=json")
    assert r.status == 403 and b"admin.allow" in r.body
    r = mgr.post({"b": "farm", "nonce": "x", "w": a.url, "w_status_D": "1"})
    assert r.status == 403
    assert spread(proxy.port) == Counter(a=6, b=6)


def test_wrong_password_is_refused_and_the_right_one_is_logged_with_changes(lab, tmp_path):
    sha = base64.b64encode(hashlib.sha1(b"secret").digest()).decode()
    (tmp_path / "admin.htpasswd").write_text(f"alice:{{SHA}}{sha}\n")
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)],
                                           admin='auth = { file = "admin.htpasswd" }'))
    port = proxy.ports["admin"]
    for auth in (None, "alice:wrong", "mallory:secret"):
        r = Manager(port, auth=auth).get("?format=json")
        assert r.status == 401 and "Basic realm=" in r.header("WWW-Authenticate")
        r = Manager(port, auth=auth).post({"b": "farm", "nonce": "x", "w": a.url,
                                           "w_status_D": "1"})
        assert r.status == 401
    assert spread(proxy.port) == Counter(a=6, b=6)
    good = Manager(port, auth="alice:secret")
    good.change("a", w_status_D="1")
    assert spread(proxy.port) == Counter(b=12)
    proxy.wait_for_line("manager: 127.0.0.1 alice:", "status.D False -> True")


def test_vhost_route_handler_serves_the_manager_with_the_same_rules(lab):
    a, b = lab.echos("a", "b")
    route = '  [[vhost.route]]\n  path = "/balancer-manager"\n  handler = "balancer-manager"\n'
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)],
                                           routes=route))
    mgr = Manager(proxy.port)             # the proxy's own listener
    assert mgr.members()["a"][0] == "Init Ok"
    mgr.change("a", w_status_D="1")
    assert spread(proxy.port) == Counter(b=12)
    assert Manager(proxy.ports["admin"]).members()["a"][0] == "Init Dis"   # one state
    r = fetch(proxy.port, "/balancer-manager?format=json", host="evil.example")
    assert r.status == 403 and b"Host" in r.body
    r = mgr.post({"b": "farm", "nonce": mgr.nonce(), "w": a.url, "w_status_D": "0"},
                 referer="http://evil.example/")
    assert r.status == 403 and spread(proxy.port) == Counter(b=12)


def test_state_file_keeps_changes_across_a_restart_and_a_stale_one_is_ignored(lab, tmp_path):
    a, b = lab.echos("a", "b")
    text = {}

    def cfg(ports):
        text["t"] = config(ports, [("a", a.url), ("b", b.url)], admin='state_file = "bm.state"')
        return text["t"]
    proxy = lab.proxy(cfg)
    mgr = Manager(proxy.ports["admin"])
    mgr.change("a", w_status_N="1", w_lf="4")
    assert (tmp_path / "bm.state").exists()
    proxy.stop()
    again = lab.proxy(text["t"], name="again.toml")
    mgr2 = Manager(proxy.ports["admin"])          # the same ports, from the same text
    assert mgr2.members()["a"][:2] == ("Init Drn Ok", 4.0)
    assert spread(again.port) == Counter(b=12)
    again.wait_for_line("admin.state_file", "applied again")
    again.stop()
    c = lab.echo("c")
    stale = text["t"].replace(a.url, c.url)
    third = lab.proxy(stale, name="third.toml")
    third.wait_for_line("admin.state_file", "ignored")
    assert set(spread(third.port)) == {"c", "b"}


def test_admin_port_taken_stops_start_up_with_one_line(tmp_path):
    busy = free_port()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen(1)
        path = tmp_path / "p.toml"
        path.write_text(config({0: free_port(), "admin": busy}, [("a", "http://127.0.0.1:9")]))
        r = subprocess.run([sys.executable, "-m", "twistproxy.cli", "run", str(path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == f"admin: cannot listen on 127.0.0.1:{busy}: address already " \
                               "in use (another process owns it)"


def test_admin_port_equal_to_a_proxy_port_is_a_config_error(tmp_path):
    port = free_port()
    path = tmp_path / "p.toml"
    path.write_text(config({0: port, "admin": port}, [("a", "http://127.0.0.1:9")]))
    r = subprocess.run([sys.executable, "-m", "twistproxy.cli", "check", str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"admin.port: {port} is taken by listen[0]" in r.stderr


def test_admin_over_tls_serves_the_manager_and_refuses_plain_http(lab, tmp_path):
    """[admin] tls uses the listeners' TLS code: a client that trusts the CA reads the
    page and changes a member over HTTPS; plain HTTP on that port gets no page."""
    import http.client
    import json

    from clients import PKI

    pki = PKI(tmp_path).leaf("admin", "localhost", "127.0.0.1")
    a, b = lab.echos("a", "b")
    tls = f'tls = {{ cert = "{pki.path("admin.pem")}", key = "{pki.path("admin.key")}" }}'
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)], admin=tls))
    port = proxy.ports["admin"]

    def https(method: str, path: str, body: bytes | None = None, headers=None):
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                        context=pki.client_context())
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    status, page = https("GET", "/balancer-manager?format=json")
    assert status == 200
    state = json.loads(page)["balancers"][0]
    member = next(m["name"] for m in state["members"] if m["route"] == "a")
    status, _ = https("POST", "/balancer-manager",
                      urlencode({"b": "farm", "w": member, "nonce": state["nonce"],
                                 "w_status_N": "1"}).encode(),
                      {"Content-Type": "application/x-www-form-urlencoded",
                       "Referer": f"https://127.0.0.1:{port}/balancer-manager"})
    assert status == 200
    assert spread(proxy.port, 6) == Counter(b=6)
    try:
        r = fetch(port, "/balancer-manager", host=f"127.0.0.1:{port}", timeout=5)
    except (OSError, http.client.HTTPException):
        pass                          # the TLS port hung up on plain HTTP
    else:
        assert r.status != 200 and b"LoadBalancer" not in r.body, "served without TLS"

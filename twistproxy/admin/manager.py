"""balancer-manager: Apache's page for balancers and members, and its form's changes.

Owns the page (HTML in Apache's table shape, `?xml=1` in Apache's XML, JSON with every
field and counter), the edit forms, and turning a POSTed form (Apache's field names
and ranges) into one batch of runtime Edits: a per-balancer nonce and a same-host
Origin/Referer are required, GET changes nothing, a bad field is a 400 naming it and
nothing of the batch is applied. Who may reach the page at all is site.py's concern.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

from twisted.web.resource import Resource
from twisted.web.template import flattenString, tags

from .. import __version__
from ..runtime.state import Edit, Invalid

SERVER_VERSION = f"Apache/2.4.0 (twistproxy {__version__}; compatible)"

# form field -> runtime field (Apache's mod_proxy_balancer names)
MEMBER_FIELDS = {"w_lf": "loadfactor", "w_ls": "lbset", "w_wr": "route", "w_rr": "redirect",
                 **{f"w_status_{f}": f"status.{f}" for f in "IDHRSNC"}}
BALANCER_FIELDS = {"b_lbm": "lbmethod", "b_tmo": "timeout", "b_max": "maxattempts",
                   "b_sforce": "nofailover", "b_ss": "stickysession"}
FORM_NAME = {v: k for k, v in {**MEMBER_FIELDS, **BALANCER_FIELDS}.items()}
FORM_NAME["add_member"] = "b_nwrkr"
SELECTORS = ("b", "w", "nonce", "xml", "format")
CHANGE_FIELDS = (*MEMBER_FIELDS, *BALANCER_FIELDS, "b_nwrkr", "b_wyes")
# Apache's fields we do not take (health-check settings live in the config file)
UNSUPPORTED = ("w_hm", "w_hi", "w_hp", "w_hf", "w_hu", "w_he")

# status words in Apache's order; "Ok" follows when the member is usable
_WORDS = (("I", "Ign"), ("N", "Drn"), ("D", "Dis"), ("S", "Stop"), ("E", "Err"),
          ("H", "Stby"), ("R", "Spar"), ("C", "HcFl"))
_STATUS_TITLES = (("I", "Ignore Errors"), ("N", "Draining Mode"), ("D", "Disabled"),
                  ("H", "Hot Standby"), ("R", "Hot Spare"), ("S", "Stopped"))

_STYLE = """
table { border-width: 1px; border-spacing: 3px; border-style: solid; border-color: gray;
 border-collapse: collapse; background-color: white; text-align: center; }
th { border-width: 1px; padding: 2px; border-style: dotted; border-color: gray;
 background-color: lightgray; text-align: center; }
td { border-width: 1px; padding: 2px; border-style: dotted; border-color: gray;
 background-color: white; text-align: center; }
"""
_DOCTYPE = (b'<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN" '
            b'"http://www.w3.org/TR/html4/strict.dtd">\n')


class Refused(Exception):
    """A request the manager answers with `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_words(m) -> str:
    """As Apache shows a worker's status: "Init Drn Ok ", "Init Dis Stby "."""
    words = ["Init"] + [w for flag, w in _WORDS if flag in m.flags]
    if m.usable():
        words.append("Ok")
    return " ".join(words) + " "


def size_text(n: int) -> str:
    """Bytes as Apache's manager shows them (apr_strfsize: "  0 ", "1.2K", " 12M")."""
    if n < 973:
        return f"{n:3d} "
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        if value < 973:
            return f"{value:3.1f}{unit}" if value < 9.95 else f"{value:3.0f}{unit}"
    return f"{value:3.0f}E"


def max_attempts(b) -> int:
    n = len(b.members)
    return b.maxattempts if b.maxattempts is not None else (n - 1 if n >= 2 else 0)


def _flat(tag) -> bytes:
    out: list = []
    flattenString(None, tag).addCallback(out.append)   # synchronous: no Deferreds inside
    return out[0]


class BalancerManager(Resource):
    """/balancer-manager and /balancer-manager/ (a leaf: what follows is ignored)."""

    isLeaf = True

    def __init__(self, admin):
        super().__init__()
        self.admin = admin
        self.ctx = admin.ctx

    # -- the model, for every output ---------------------------------------------------

    def paths(self, name: str) -> list[str]:
        return [r.path or r.regex for v in self.ctx.config.vhosts for r in v.routes
                if r.url is not None and r.url.is_balancer and r.url.host == name]

    def snapshot(self) -> dict:
        """Every balancer and member field the page shows, and the counters (JSON)."""
        out = []
        for name, b in self.ctx.runtime.balancers.items():
            members = []
            for m in b.members:
                members.append({
                    "name": m.name, "route": m.route, "redirect": m.redirect,
                    "loadfactor": m.lbfactor / 100, "lbset": m.lbset,
                    "status": status_words(m).strip(), "flags": "".join(sorted(m.flags)),
                    "usable": m.usable(), "elected": m.elected, "busy": m.busy,
                    "lbstatus": m.lbstatus, "transferred": m.transferred, "read": m.read,
                    "responses": {f"{i}xx" if i else "other": n
                                  for i, n in enumerate(m.responses)},
                    "errors": dict(m.errors), "retries": m.retries,
                    "failovers": m.failovers, "hc_passed": m.hc_passed,
                    "hc_failed": m.hc_failed, "error_seconds": round(m.error_seconds, 3),
                    "pool": self.ctx.pool_stats(m.pool) if m.pool is not None else None,
                    "edit": self.member_link("/balancer-manager", b, m),
                })
            out.append({
                "name": f"balancer://{name}", "nonce": self.admin.nonces[name],
                "lbmethod": b.lbmethod, "timeout": b.timeout,
                "maxattempts": max_attempts(b), "nofailover": b.nofailover,
                "stickysession": b.stickysession, "growth": b.config.growth,
                "max_members": max_members(b),
                "paths": self.paths(name), "members": members,
            })
            found = next((d for d in getattr(self.ctx, "discoveries", ())
                          if d.balancer == name), None)
            if found is not None:
                out[-1]["members_from"] = found.snapshot()
        snap = {"server_version": SERVER_VERSION, "persisted": self.admin.persisted,
                "balancers": out}
        if self.ctx.cluster is not None:
            snap["cluster"] = self.ctx.cluster.summary()
        return snap

    def member_link(self, path: str, b, m) -> str:
        # b, w, nonce in that order and the URL as written: what scrapers of Apache expect
        return f"{path}?b={b.name}&w={m.name}&nonce={self.admin.nonces[b.name]}"

    # -- answering ---------------------------------------------------------------------

    def render_GET(self, request):
        args = self._query(request)
        changing = [k for k in args if k in CHANGE_FIELDS or k in UNSUPPORTED]
        if changing:
            request.setHeader(b"Allow", b"GET, HEAD, POST")
            return self._refuse(request, Refused(
                405, f"changes are POSTed; a GET changes nothing ({', '.join(changing)})"))
        return self._page(request, args, 200)

    def render_POST(self, request):
        try:
            args = self._form(request)
            edits = self._edits(request, args)
            who = f"{request.getClientAddress().host} {getattr(request, 'admin_user', '-')}"
            self.ctx.runtime.apply(edits, source="manager", who=who,
                                   now=self.ctx.reactor.seconds())
        except Refused as e:
            return self._refuse(request, e)
        except Invalid as e:
            return self._refuse(request, Refused(400, self._invalid_text(e)))
        return self._page(request, args, 200)

    def _invalid_text(self, e: Invalid) -> str:
        name = FORM_NAME.get(e.field, e.field)
        if e.field in ("balancer", "member"):
            name = {"balancer": "b", "member": "w"}[e.field]
        return f"{name}: {e.value!r} {e.why}; nothing was changed"

    def _refuse(self, request, e: Refused) -> bytes:
        request.setResponseCode(e.status)
        if self._wants(request, self._query(request)) == "json":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"error": str(e), "status": e.status}).encode() + b"\n"
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return f"{e}\n".encode()

    # -- reading the request -----------------------------------------------------------

    @staticmethod
    def _query(request) -> dict[str, str]:
        query = urlsplit(request.uri.decode("latin-1")).query
        return dict(parse_qsl(query, keep_blank_values=True))

    def _form(self, request) -> dict[str, str]:
        """POST fields, from the body (the query may carry the selectors b, w, nonce)."""
        raw = request.content.read() if request.content is not None else b""
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if raw and ctype not in (b"application/x-www-form-urlencoded", b""):
            raise Refused(415, "send the form as application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                              strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "the form is not valid application/x-www-form-urlencoded")
        form: dict[str, str] = {}
        for k, v in pairs:
            if k in form and form[k] != v:
                raise Refused(400, f"{k}: given twice with different values")
            form[k] = v
        for k, v in self._query(request).items():
            if k in SELECTORS:
                form.setdefault(k, v)
        return form

    def _edits(self, request, form: dict[str, str]) -> list[Edit]:
        """The form as one batch, once the nonce and Origin/Referer are right."""
        unknown = [k for k in form if k not in SELECTORS and k not in CHANGE_FIELDS]
        if unknown:
            kind = "is not supported here (health checks are set in the config file)" \
                if unknown[0] in UNSUPPORTED else "is not a balancer-manager field"
            raise Refused(400, f"{unknown[0]}: {kind}; nothing was changed")
        name = form.get("b", "")
        if name.startswith("balancer://"):
            name = name[len("balancer://"):]
        if name not in self.ctx.runtime.balancers:
            raise Refused(400, f"b: {name!r} is not a balancer here; nothing was changed")
        nonce = self.admin.nonces[name]
        if form.get("nonce") != nonce:
            raise Refused(403, f"nonce: missing or not balancer://{name}'s (read it from "
                          "the page); nothing was changed")
        why = self.admin.foreign_origin(request)
        if why:
            raise Refused(403, f"{why}; nothing was changed")
        edits = []
        member = form.get("w") or None
        for key, value in form.items():
            if key in MEMBER_FIELDS:
                if member is None:
                    raise Refused(400, f"{key}: needs w (the member's URL); nothing was "
                                  "changed")
                if key.startswith("w_status_") and value not in ("0", "1"):
                    raise Refused(400, f"{key}: {value!r} must be 0 or 1; nothing was "
                                  "changed")
                edits.append(Edit(name, MEMBER_FIELDS[key], value, member=member))
            elif key in BALANCER_FIELDS:
                if key == "b_max":
                    self._whole(key, value, 0, 99)
                    b = self.ctx.runtime.balancer(name)
                    if b.maxattempts is None and int(value) == max_attempts(b):
                        continue       # the derived default the form shows, posted back
                elif key == "b_sforce" and value not in ("0", "1"):
                    raise Refused(400, f"{key}: {value!r} must be 0 or 1; nothing was changed")
                elif key == "b_ss" and value.strip() == "-":
                    value = ""                     # Apache: "-" deletes it
                edits.append(Edit(name, BALANCER_FIELDS[key], value))
        added = form.get("b_nwrkr", "").strip()
        if added:
            if form.get("b_wyes") != "1":
                raise Refused(400, "b_nwrkr: adding a member needs b_wyes=1 (Apache's "
                              "\"Are you sure?\"); nothing was changed")
            edits.append(Edit(name, "add_member", added))
        if member is not None:
            self.ctx.runtime.member(name, member)      # Invalid "w: ..." when it is not one
        return edits

    @staticmethod
    def _whole(key: str, value: str, low: int, high: int) -> None:
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or not low <= int(digits) <= high:
            raise Refused(400, f"{key}: {value!r} must be a whole number from {low} to "
                          f"{high}; nothing was changed")

    # -- output --------------------------------------------------------------------------

    @staticmethod
    def _wants(request, args) -> str:
        if args.get("format") == "json" or \
                b"application/json" in (request.getHeader(b"accept") or b""):
            return "json"
        if "xml" in args:
            return "xml"
        return "html"

    def _page(self, request, args: dict, status: int) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Cache-Control", b"no-store")
        kind = self._wants(request, args)
        if kind == "json":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(self.snapshot(), indent=1).encode() + b"\n"
        if kind == "xml":
            request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
            return self.xml()
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self.html(request, args)

    def html(self, request, args: dict) -> bytes:
        path = request.path.decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        persisted = "" if self.admin.persisted else "NOT "
        body = tags.body(
            tags.h1(f"Load Balancer Manager for {host}"), "\n",
            tags.dl(tags.dt(f"Server Version: {SERVER_VERSION}"), "\n",
                    tags.dt(f"Balancer changes will {persisted}be persisted on restart.")),
            "\n", tags.hr(), "\n")
        if self.ctx.cluster is not None:
            from ..cluster.pages import cluster_html
            body(cluster_html(self.ctx.cluster))
        for b in self.ctx.runtime.balancers.values():
            body(self._balancer_tables(path, b))
        b = self.ctx.runtime.balancers.get(args.get("b", "").removeprefix("balancer://"))
        if b is not None:
            member = None
            if args.get("w"):
                try:
                    member = self.ctx.runtime.member(b.name, args["w"])
                except Invalid:
                    member = None
            # an edit page repeats its balancer's header and member tables, then the form
            body(self._member_form(request, b, member) if member is not None
                 else self._balancer_form(request, b))
        page = tags.html(tags.head(tags.title("Balancer Manager"), "\n",
                                   tags.style(_STYLE, type="text/css")), "\n", body)
        return _DOCTYPE + _flat(page) + b"\n"

    def _balancer_tables(self, path: str, b) -> list:
        nonce = self.admin.nonces[b.name]
        head = tags.tr(*(tags.th(t) for t in ("MaxMembers", "StickySession", "DisableFailover",
                                             "Timeout", "FailoverAttempts", "Method", "Path",
                                             "Active")))
        row = tags.tr(
            tags.td(f"{max_members(b)} [{len(b.members)} Used]"),
            tags.td(b.stickysession or "(None)"), tags.td("On" if b.nofailover else "Off"),
            tags.td(f"{b.timeout:g}"), tags.td(str(max_attempts(b))), tags.td(b.lbmethod),
            tags.td(", ".join(self.paths(b.name))), tags.td("Yes"))
        members = [tags.tr(*(tags.th(t) for t in ("Worker URL", "Route", "RouteRedir",
                                                  "Factor", "Set", "Status", "Elected", "Busy",
                                                  "Load", "To", "From")))]
        for m in b.members:
            members += ["\n", tags.tr(
                tags.td(tags.a(m.name, href=self.member_link(path, b, m))),
                tags.td(m.route), tags.td(m.redirect), tags.td(f"{m.lbfactor / 100:.2f}"),
                tags.td(str(m.lbset)), tags.td(status_words(m)), tags.td(str(m.elected)),
                tags.td(str(m.busy)), tags.td(str(m.lbstatus)),
                tags.td(size_text(m.transferred)), tags.td(size_text(m.read)))]
        return [tags.h3("LoadBalancer Status for ",
                        tags.a(f"balancer://{b.name}", href=f"{path}?b={b.name}&nonce={nonce}")),
                "\n", tags.table(head, "\n", row), "\n", tags.br(), "\n",
                tags.table(*members), "\n", tags.hr(), "\n"]

    def _form_tag(self, request, b, *rows, member=None):
        hidden = [tags.input(type="hidden", name="w", id="w", value=member.name)] \
            if member is not None else []
        hidden += [tags.input(type="hidden", name="b", id="b", value=b.name),
                   tags.input(type="hidden", name="nonce", id="nonce",
                              value=self.admin.nonces[b.name])]
        return tags.form(tags.table(*rows, tags.tr(tags.td(tags.input(type="submit",
                                                                       value="Submit"),
                                                            colspan="2"))),
                         *hidden, method="POST", enctype="application/x-www-form-urlencoded",
                         action=request.path.decode("latin-1"))

    @staticmethod
    def _text_row(label: str, name: str, value: str, **kw):
        return tags.tr(tags.td(label), tags.td(tags.input(name=name, id=name, type="text",
                                                          value=value, **kw)))

    @staticmethod
    def _on_off(name: str, on: bool):
        def radio(v: str, checked: bool):
            attrs = {"checked": "checked"} if checked else {}
            return [tags.label("On" if v == "1" else "Off", **{"for": f"{name}{v}"}), " ",
                    tags.input(name=name, id=f"{name}{v}", value=v, type="radio", **attrs)]
        return tags.td(radio("1", on), tags.br(), radio("0", not on))

    def _member_form(self, request, b, m) -> list:
        status = tags.table(tags.tr(*(tags.th(t) for _, t in _STATUS_TITLES)),
                            tags.tr(*(self._on_off(f"w_status_{f}", f in m.flags)
                                      for f, _ in _STATUS_TITLES)))
        return [tags.h3(f"Edit worker settings for {m.name}"), "\n", self._form_tag(
            request, b,
            self._text_row("Load factor:", "w_lf", f"{m.lbfactor / 100:.2f}"),
            self._text_row("LB Set:", "w_ls", str(m.lbset)),
            self._text_row("Route:", "w_wr", m.route),
            self._text_row("Route Redirect:", "w_rr", m.redirect),
            tags.tr(tags.td("Status:"), tags.td(status)), member=m), "\n", tags.hr()]

    def _balancer_form(self, request, b) -> list:
        from ..runtime.state import LBMETHODS
        options = [tags.option(lb, value=lb, **({"selected": "selected"}
                                                 if lb == b.lbmethod else {}))
                   for lb in LBMETHODS]
        return [tags.h3(f"Edit balancer settings for balancer://{b.name}"), "\n",
                self._form_tag(
                    request, b,
                    tags.tr(tags.td("LBmethod:"),
                            tags.td(tags.select(*options, name="b_lbm", id="b_lbm"))),
                    self._text_row("Timeout:", "b_tmo", f"{b.timeout:g}"),
                    self._text_row("Failover Attempts:", "b_max", str(max_attempts(b))),
                    tags.tr(tags.td("Disable Failover:"), self._on_off("b_sforce",
                                                                       b.nofailover)),
                    tags.tr(tags.td("Sticky Session:"),
                            tags.td(tags.input(name="b_ss", id="b_ss", size="64", type="text",
                                               value=b.stickysession),
                                    " (Use '-' to delete)")),
                    tags.tr(tags.td("Add New Worker:"),
                            tags.td(tags.input(name="b_nwrkr", id="b_nwrkr", size="32",
                                               type="text"), " Are you sure? ",
                                    tags.input(name="b_wyes", id="b_wyes", type="checkbox",
                                               value="1")))), "\n", tags.hr()]

    def xml(self) -> bytes:
        """Apache's ?xml=1 document (its element names), with our counters beside."""
        from xml.sax.saxutils import escape

        def el(name: str, value, indent: int) -> str:
            return f"{' ' * indent}<httpd:{name}>{escape(str(value))}</httpd:{name}>\n"
        out = ["<?xml version='1.0' encoding='UTF-8' ?>\n",
               "<httpd:manager xmlns:httpd='http://httpd.apache.org'>\n",
               "  <httpd:balancers>\n"]
        for name, b in self.ctx.runtime.balancers.items():
            out.append("    <httpd:balancer>\n")
            for k, v in (("name", f"balancer://{name}"), ("nonce", self.admin.nonces[name]),
                         ("stickysession", b.stickysession or "(None)"),
                         ("nofailover", "On" if b.nofailover else "Off"),
                         ("timeout", f"{b.timeout:g}"), ("maxattempts", max_attempts(b)),
                         ("lbmethod", b.lbmethod),
                         ("scolonpathdelim", "On" if b.config.scolonpathdelim else "Off")):
                out.append(el(k, v, 6))
            out.append("      <httpd:workers>\n")
            for m in b.members:
                url = m.config.url
                out.append("        <httpd:worker>\n")
                for k, v in (("name", m.name), ("scheme", url.scheme),
                             ("hostname", url.host), ("loadfactor", f"{m.lbfactor / 100:.2f}"),
                             ("port", url.port), ("status", status_words(m)),
                             ("retries", m.retries), ("lbstatus", m.lbstatus),
                             ("transferred", m.transferred), ("read", m.read),
                             ("elected", m.elected), ("route", m.route),
                             ("redirect", m.redirect), ("busy", m.busy), ("lbset", m.lbset),
                             ("failovers", m.failovers), ("hc_passed", m.hc_passed),
                             ("hc_failed", m.hc_failed)):
                    out.append(el(k, v, 10))
                out.append("        </httpd:worker>\n")
            out.append("      </httpd:workers>\n    </httpd:balancer>\n")
        out.append("  </httpd:balancers>\n</httpd:manager>\n")
        return "".join(out).encode("utf-8")


def max_members(b) -> int:
    """Apache's MaxMembers: the configured members and the growth slots, and here the
    members found by DNS (members_from), which take no slot."""
    return len(b.config.members) + b.config.growth + sum(1 for m in b.members if m.discovered)

"""The admin listener and the rules every admin page is behind.

Owns `Admin` (one per proxy: the allowed networks, Basic auth against an htpasswd
file, the admin host names, the per-balancer nonces, the change log and the state
file), the twisted.web Site of the admin listener (/balancer-manager, /server-status,
/metrics), and serving the same pages on a proxy listener for vhost routes with a
`handler`: such a request is handed, whole, to an in-memory twisted.web channel and
its answer sent back on the client's connection. The listener is bound with the
proxy's (service.py); nothing here runs for proxied requests.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import time
import uuid
from urllib.parse import urlsplit

from twisted.internet import address as taddress
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, ITransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.template import tags
from zope.interface import implementer

from ..access import BasicUsers, basic_credentials, in_networks, load_htpasswd
from ..config import AdminConfig
from ..runtime.state import changes_text
from . import persist
from .manager import BalancerManager, _flat

log = Logger(namespace="twistproxy.admin")

MAX_FORM = 64 * 1024          # a POSTed form larger than this is refused (413)


class Admin(BasicUsers):
    """What every admin page shares, on the admin listener and on vhost routes."""

    def __init__(self, ctx, config: AdminConfig | None, started: float | None = None):
        self.ctx = ctx
        self.config = config or AdminConfig()
        self.started = started if started is not None else time.time()
        self.networks = [ipaddress.ip_network(n, strict=False) for n in self.config.allow]
        auth = dict(self.config.auth)
        self.realm = auth.get("realm", "twistproxy admin")
        super().__init__(load_htpasswd(auth["file"], "admin.auth.file", ctx.config.path)
                         if auth else None)
        self.nonces = {name: str(uuid.uuid4()) for name in ctx.runtime.balancers}
        self.state_file = self.config.state_file
        self.persisted = bool(self.state_file)
        self.pages = self._pages()
        self._route_sites: dict = {}
        # in a master (process/master.py): sums the workers' counters in before a page
        # is rendered (a Deferred), and what its changes wait for (every worker's ack)
        self.refresh = None
        self.pending: list = []
        ctx.runtime.subscribe(self._changed)

    def settled(self):
        """A Deferred that fires once the workers applied every change made so far."""
        pending, self.pending = self.pending, []
        return defer.DeferredList(pending, consumeErrors=True)

    def _pages(self) -> dict[str, Resource]:
        pages: dict[str, Resource] = {"balancer-manager": BalancerManager(self)}
        try:
            from .status import ServerStatus
            pages["server-status"] = ServerStatus(self.ctx, self.started)
        except ImportError:
            pass
        try:
            from .metrics import Metrics
            pages["metrics"] = Metrics(self.ctx)
        except ImportError:
            pass
        return pages

    # -- changes: logged, and kept in the state file --------------------------------------

    def _changed(self, changes) -> None:
        if self.state_file and any(c.source == "cluster" for c in changes):
            self._save()                 # another node's change: kept here too
        mine = [c for c in changes if c.source in ("manager", "state-file")]
        if not mine:
            return
        for c in mine:
            log.info("{source}: {who}: balancer://{balancer} {what}", source=c.source,
                     who=c.who or "-", balancer=c.balancer, what=changes_text([c])())
        if self.state_file and any(c.source == "manager" for c in mine):
            self._save()

    def _save(self) -> None:
        try:
            persist.save(self.state_file, self.ctx.runtime)
        except OSError as e:
            log.error("admin.state_file: {path!r} cannot be written: {why}",
                      path=self.state_file, why=e.strerror or e)

    def restore(self) -> None:
        """At start-up, before any request: the state file's changes, or why not."""
        if not self.state_file:
            return
        n, why = persist.restore(self.state_file, self.ctx.runtime)
        if why:
            log.warn("admin.state_file: {path!r} {why}: ignored (nothing of it applied)",
                     path=self.state_file, why=why)
        elif n:
            log.info("admin.state_file: {path!r}: {n} manager change(s) applied again",
                     path=self.state_file, n=n)

    # -- who may ask ----------------------------------------------------------------------

    def client_allowed(self, ip: str) -> bool:
        return in_networks(ip, self.networks)

    def host_allowed(self, host: str, names: tuple[str, ...]) -> bool:
        """An IP literal, localhost, admin.server_name, or a name of the vhost the page
        is mounted on: not a name an attacker's DNS may point here (rebinding)."""
        name = _hostname(host)
        if not name:
            return False
        try:
            ipaddress.ip_address(name.strip("[]"))
            return True
        except ValueError:
            pass
        return name == "localhost" or name in self.config.server_name or \
            any(fnmatch.fnmatchcase(name, n) for n in names)

    def foreign_origin(self, request) -> str | None:
        """Why a change request does not come from a page of this admin host, or None:
        its Origin (else Referer) must name the host it was sent to."""
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        for header in (b"origin", b"referer"):
            value = request.getHeader(header)
            if value:
                try:
                    parts = urlsplit(value.decode("latin-1"))
                    netloc = _netloc(parts.scheme, parts.netloc.lower())
                except ValueError:
                    netloc = None
                scheme = b"https" if request.isSecure() else b"http"
                if netloc != _netloc(scheme.decode(), host):
                    return f"{header.decode().capitalize()}: {value.decode('latin-1')!r} " \
                           f"is not a page of this admin host ({host})"
                return None
        return "Referer (or Origin) is missing: changes come from the manager's own page"

    # -- sites --------------------------------------------------------------------------

    def listener_site(self) -> Site:
        root = Resource()
        root.putChild(b"", Index(self))
        for name, page in self.pages.items():
            root.putChild(name.encode(), page)
        return AdminSite(Guard(self, root, traverse=True, names=()))

    def route_site(self, handler: str, vhost) -> Site | None:
        key = (handler, id(vhost))
        site = self._route_sites.get(key)
        if site is None and handler in self.pages:
            names = (vhost.server_name, *vhost.server_alias) if vhost is not None else ()
            site = self._route_sites[key] = AdminSite(
                Guard(self, self.pages[handler], traverse=False, names=names))
        return site

    def serve(self, conn, req, handler: str) -> None:
        """A proxy listener's request for a route with `handler`: the admin page."""
        site = self.route_site(handler, req.route.vhost if req.route is not None else None)
        if site is None:
            return self.ctx.reject(conn, req, 404, f"handler {handler!r} is not available "
                                   "in this build")
        reactor = self.ctx.reactor
        _Bridge(self.ctx, lambda raw, peer, host, secure:
                run_in_memory(site, reactor, raw, peer, host, secure), conn, req)


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _netloc(scheme: str, netloc: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return netloc[:-len(default)] if default and netloc.endswith(default) else netloc


def not_allowed(request, allowed) -> bytes:
    """Our own 405 with Allow (twisted.web's default page is deprecated and unescaped)."""
    allow = b", ".join(allowed)
    request.setHeader(b"Allow", allow)
    return _text(request, 405, f"{request.method.decode('latin-1')} is not allowed here "
                               f"(allowed: {allow.decode()})")


def _text(request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return f"{message}\n".encode()


class Guard(Resource):
    """Allowed network, admin Host and Basic auth before any admin page is rendered;
    then the page (found in `inner` by the rest of the path when `traverse`)."""

    isLeaf = True

    def __init__(self, admin: Admin, inner: Resource, traverse: bool, names: tuple):
        super().__init__()
        self.admin = admin
        self.inner = inner
        self.traverse = traverse
        self.names = names

    def render(self, request):
        admin = self.admin
        peer = request.getClientAddress()
        ip = getattr(peer, "host", "")
        if not admin.client_allowed(ip):
            log.info("admin: {ip} refused: not in admin.allow", ip=ip)
            return _text(request, 403, f"{ip} may not use the admin pages (admin.allow)")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not admin.host_allowed(host, self.names):
            return _text(request, 403, f"Host {host!r} is not a name of this admin host "
                         "(admin.server_name)")
        if admin.users is None:
            return self._page(request)
        value = request.getHeader(b"authorization")
        value = value.encode("latin-1") if isinstance(value, str) else value
        user = admin.known(value) if value else None
        if user is not None:
            request.admin_user = user
            return self._page(request)
        creds = basic_credentials(value) if value else None
        if creds is None:
            return self._challenge(request)
        d = deferToThread(admin.verify, *creds)

        def checked(ok: bool):
            if request.finished or getattr(request, "_disconnected", False):
                return
            if ok:
                admin.remember(value, creds[0])
                request.admin_user = creds[0]
                body = self._page(request)
            else:
                log.info("admin: {ip} refused: wrong user or password for {user!r}",
                         ip=ip, user=creds[0])
                body = self._challenge(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()
        d.addCallback(checked)
        d.addErrback(lambda f: log.failure("admin: checking a password", f))
        return NOT_DONE_YET

    def _challenge(self, request) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Basic realm="%s"' %
                          self.admin.realm.replace('"', "").encode("latin-1"))
        return _text(request, 401, "the admin pages need a user and password")

    def _page(self, request):
        """The page; in a master, after the workers' counters are summed in, and
        answered once every worker has applied the changes it made."""
        admin = self.admin
        if admin.refresh is None:
            return self._render(request)
        d = admin.refresh()

        def render(_):
            body = self._render(request)
            settled = admin.settled()
            settled.addBoth(lambda _: self._finish(request, body))

        d.addCallback(render)
        d.addErrback(lambda f: (log.failure("admin: reading the workers", f),
                                self._finish(request, _text(request, 500, "the workers "
                                             "could not be read"))))
        return NOT_DONE_YET

    @staticmethod
    def _finish(request, body) -> None:
        if body is NOT_DONE_YET or request.finished or getattr(request, "_disconnected",
                                                                False):
            return
        request.write(body)
        request.finish()

    def _render(self, request):
        page = getChildForRequest(self.inner, request) if self.traverse else self.inner
        try:
            return page.render(request)
        except UnsupportedMethod as e:
            return not_allowed(request, e.allowedMethods)


class Index(Resource):
    """/ on the admin listener: links to the pages there are."""

    isLeaf = True

    def __init__(self, admin: Admin):
        super().__init__()
        self.admin = admin

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        links = [tags.li(tags.a(name, href=f"/{name}")) for name in self.admin.pages]
        return b"<!DOCTYPE html>\n" + _flat(tags.html(tags.head(tags.title("twistproxy admin")),
                                                     tags.body(tags.h1("twistproxy admin"),
                                                               tags.ul(*links))))


class AdminSite(Site):
    """A twisted.web Site whose request log is a twistproxy log line."""

    displayTracebacks = False

    def __init__(self, resource):
        super().__init__(resource)
        self.noisy = False

    def log(self, request) -> None:
        log.debug("admin: {ip} {method} {uri} {code}",
                  ip=getattr(request.getClientAddress(), "host", "-"),
                  method=request.method.decode("latin-1"),
                  uri=request.uri.decode("latin-1")[:200], code=request.code)


# -- a vhost route's admin page, on the proxy's own connection ----------------------------

_HOP = {b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te",
        b"trailer", b"upgrade", b"expect", b"proxy-connection"}
_DROP = {b"connection", b"content-length", b"date", b"server", b"transfer-encoding"}


@implementer(ITransport, IConsumer)
class _Memory:
    """The in-memory transport of one bridged request: collects what twisted.web writes."""

    disconnecting = False

    def __init__(self, peer, host, secure: bool, done):
        self.peer, self.host, self.secure, self.done = peer, host, secure, done
        self.data: list[bytes] = []
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def writeSequence(self, seq) -> None:
        self.data.extend(seq)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.done(b"".join(self.data))

    abortConnection = loseConnection

    def getPeer(self):
        return self.peer

    def getHost(self):
        return self.host

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def _address(ip: str, port: int):
    return taddress.IPv6Address("TCP", ip, port) if ":" in ip else \
        taddress.IPv4Address("TCP", ip, port)


def run_in_memory(site: Site, reactor, raw: bytes, peer, host, secure: bool):
    """One HTTP/1.0 request (raw bytes) through `site` on an in-memory channel: a
    Deferred of the raw answer, and the channel (to drop if the client goes)."""
    done = defer.Deferred()

    def answered(answer: bytes) -> None:
        reactor.callLater(0, channel.connectionLost, Failure(ConnectionDone("answered")))
        done.callback(answer)

    transport = _Memory(peer, host, secure, answered)
    channel = site.buildProtocol(peer)
    channel.makeConnection(transport)
    if secure:
        channel.isSecure = lambda: True       # request.isSecure() asks the channel
    channel.dataReceived(raw)
    return done, channel


class _Bridge:
    """Collects the request body from the client connection (it is the request's
    exchange), then has the request answered as HTTP/1.0 (the answer ends at close)
    by `run` (in memory here, or by the master's admin: process/worker.py) and sends
    the answer on the connection."""

    def __init__(self, ctx, run, conn, req):
        self.ctx, self.run, self.conn, self.req = ctx, run, conn, req
        self.gone = False
        self.channel = None
        early = conn.attach(req, self)
        self.body = list(early or [])
        self.size = sum(len(b) for b in self.body)
        if self.size > MAX_FORM:
            self._too_large()
        elif req.complete:
            self._run()

    # the client connection's calls (an exchange's interface)
    def client_body(self, data: bytes) -> None:
        if self.body is None:
            return
        self.size += len(data)
        if self.size > MAX_FORM:
            self._too_large()
        else:
            self.body.append(data)

    def client_body_end(self, trailers) -> None:
        if self.body is not None and not self.gone:
            self._run()

    def client_gone(self) -> None:
        self.gone = True
        if self.channel is not None:
            channel, self.channel = self.channel, None
            channel.connectionLost(Failure(ConnectionDone("client gone")))

    def _too_large(self) -> None:
        self.body = None
        self.conn.respond_error(self.req, 413)

    def _run(self) -> None:
        req, conn = self.req, self.conn
        body, self.body = b"".join(self.body), None
        head = [b"%s %s HTTP/1.0\r\n" % (req.method, req.target)]
        head += [b"%s: %s\r\n" % (n, v) for n, v in req.headers if n.lower() not in _HOP]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        sock_host = conn.transport.getHost()
        peer = _address(conn.peer_ip, getattr(conn.transport.getPeer(), "port", 0))
        d, self.channel = self.run(b"".join(head) + body, peer,
                                   _address(sock_host.host, sock_host.port),
                                   conn.scheme == b"https")
        d.addCallbacks(self._answered, self._failed)

    def _failed(self, failure) -> None:
        self.channel = None
        if not self.gone:
            log.error("admin: {handler} could not be answered: {why}",
                      handler=self.req.target.decode("latin-1")[:200],
                      why=failure.getErrorMessage())
            self.conn.respond_error(self.req, 502)

    def _answered(self, raw: bytes) -> None:
        self.channel = None
        if self.gone:
            return
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            return self.conn.respond_error(self.req, 500)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() not in _DROP:
                headers.append((name.strip(), value.strip()))
        if self.req.method == b"HEAD":
            body = b""
        self.conn.respond_error(self.req, status, headers=headers, body=body)

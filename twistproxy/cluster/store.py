"""The Redis connection of one host's cluster sync (only the master has one; with
master_process = false the one process).

Owns two connections to the server named by [cluster] redis (commands, and one
SUBSCRIBEd to the cluster's channel), made with txredisapi's protocols on Twisted
endpoints: nothing blocks the reactor and every command has a reply timeout.
Reconnecting is ours, not txredisapi's, so that what is logged is bounded: the loss
once (warn), each failed attempt at debug level and at most one summary line per
LOG_EVERY seconds, the return once. An authentication (or SELECT) failure is one
error line and no more attempts: a wrong password does not fix itself.
Nothing here is reached by proxied requests.
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

import txredisapi

log = Logger(namespace="twistproxy.cluster")

CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 2.0
RETRY_FIRST = 0.25
RETRY_MAX = 2.0
LOG_EVERY = 30.0

# compare-and-set of the cluster's state document: KEYS[1] the state key, KEYS[2] the
# changes channel; ARGV[1] the version the writer read, ARGV[2] the new version,
# ARGV[3] the document's JSON without its version ('{"state":...}'). Returns the new
# version, or -(the current one) when another node wrote in between.
WRITE = """
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(cjson.decode(cur)['version']) or 0 end
if v ~= tonumber(ARGV[1]) then return -v - 1 end
redis.call('SET', KEYS[1], '{"version":' .. ARGV[2] .. ',' .. string.sub(ARGV[3], 2))
redis.call('PUBLISH', KEYS[2], ARGV[2])
return tonumber(ARGV[2])
"""


# share_health's lease of one balancer's health checks: KEYS[1] the lease, ARGV[1]
# this node, ARGV[2] its TTL. Taken when free, renewed when held; returns the holder.
LEASE = """
local h = redis.call('GET', KEYS[1])
if not h then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return ARGV[1]
end
if h == ARGV[1] then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2])) end
return h
"""

# given up (a clean stop): deleted only if still this node's
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Factory(protocol.Factory):
    """What txredisapi's protocols ask of their factory, for one connection."""
    noisy = False
    isLazy = False

    def __init__(self, proto_class, config, link: "Link"):
        self.proto_class = proto_class
        self.config = config
        self.link = link

    def buildProtocol(self, addr):
        c = self.config
        p = self.proto_class(charset="utf-8", replyTimeout=REPLY_TIMEOUT,
                             password=c.password, dbid=c.db, username=c.username)
        p.factory = self
        return p

    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.link.refused(why)


class _Subscriber(txredisapi.SubscriberProtocol):
    on_message = None

    def messageReceived(self, pattern, channel, message):
        if self.on_message is not None:
            self.on_message(channel, message)


class Link:
    """The two connections, kept up. `up(cmd)` is called with the command connection
    each time both are (re)established; `down()` when either is lost."""

    def __init__(self, config, reactor, channel: str, up, down, on_message):
        self.config = config
        self.reactor = reactor
        self.channel = channel
        self._up, self._down, self._on_message = up, down, on_message
        self.cmd = None
        self.sub = None
        self.connected = False
        self.stopped = False
        self.failed = None            # an authentication failure: no more attempts
        self._delay = RETRY_FIRST
        self._retry = None
        self._lost_at = None
        self._attempts = 0
        self._last_log = None
        self._ever = False
        self._tls = None
        if config.tls:                   # rediss://: the project's client TLS rules
            from ..tls import redis_options
            self._tls = redis_options(config)

    # -- connecting ------------------------------------------------------------------

    def start(self) -> None:
        self._connect()

    def stop(self) -> None:
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        for p in (self.cmd, self.sub):
            if p is not None and p.transport is not None:
                p.transport.loseConnection()

    def refused(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            log.error("cluster: {url}: {why}; the cluster is off for this node until it is "
                      "restarted with a working [cluster] redis (it serves with its own "
                      "state)", url=self.config.shown_url, why=why)

    @defer.inlineCallbacks
    def _connect(self):
        self._retry = None
        if self.stopped or self.failed:
            return
        self._attempts += 1
        c = self.config
        cmd = sub = None
        try:
            cmd = yield self._open(txredisapi.RedisProtocol)
            sub = yield self._open(_Subscriber)
            sub.on_message = self._on_message
            yield sub.subscribe(self.channel).addTimeout(REPLY_TIMEOUT, self.reactor)
        except Exception as e:
            for p in (cmd, sub):
                if p is not None and p.transport is not None:
                    p.transport.abortConnection()
            if self.failed or self.stopped:
                return
            self._failed_attempt(e)
            return
        if self.stopped:
            cmd.transport.loseConnection()
            sub.transport.loseConnection()
            return
        self.cmd, self.sub, self.connected = cmd, sub, True
        for p in (cmd, sub):
            p.whenDisconnected().addCallback(self._lost)
        if self._lost_at is not None:
            log.info("cluster: {url}: connected again after {s:.1f}s ({n} attempt(s))",
                     url=c.shown_url, s=self.reactor.seconds() - self._lost_at,
                     n=self._attempts)
        else:
            log.info("cluster: {url}: connected (cluster {name}, node {node})",
                     url=c.shown_url, name=c.name, node=c.node)
        self._ever = True
        self._lost_at = None
        self._attempts = 0
        self._delay = RETRY_FIRST
        self._last_log = None
        try:
            self._up(cmd)
        except Exception:
            log.failure("cluster: applying the cluster's state failed")

    @defer.inlineCallbacks
    def _open(self, proto_class):
        c = self.config
        ep = HostnameEndpoint(self.reactor, c.host, c.port, timeout=CONNECT_TIMEOUT)
        if self._tls is not None:
            ep = wrapClientTLS(self._tls, ep)
        p = yield ep.connect(_Factory(proto_class, c, self))
        ready = p.whenConnected()
        lost = p.whenDisconnected()
        first = yield defer.DeferredList([ready, lost], fireOnOneCallback=True,
                                         consumeErrors=True)
        if first[1] == 1 or not p.connected:
            raise ConnectionError(self.failed or "the connection was closed during its "
                                  "authentication")
        return p

    def _failed_attempt(self, e) -> None:
        now = self.reactor.seconds()
        why = getattr(e, "strerror", None) or e.__class__.__name__ + (f": {e}" if str(e)
                                                                        else "")
        if self._lost_at is None:
            self._lost_at = now
            log.warn("cluster: {url}: {what} ({why}); serving with the state this node "
                     "has, trying again", url=self.config.shown_url,
                     what="cannot connect" if not self._ever else "cannot reconnect", why=why)
            self._last_log = now
        elif now - self._last_log >= LOG_EVERY:
            log.warn("cluster: {url}: still unreachable after {s:.0f}s ({n} attempt(s), last: "
                     "{why})", url=self.config.shown_url, s=now - self._lost_at,
                     n=self._attempts, why=why)
            self._last_log = now
        else:
            log.debug("cluster: {url}: attempt {n} failed: {why}", url=self.config.shown_url,
                      n=self._attempts, why=why)
        self._retry = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(RETRY_MAX, self._delay * 2)

    def _lost(self, proto) -> None:
        if not self.connected:
            return
        self.connected = False
        for p in (self.cmd, self.sub):
            if p is not None and p is not proto and p.transport is not None:
                p.transport.abortConnection()
        self.cmd = self.sub = None
        if self.stopped:
            return
        self._lost_at = self.reactor.seconds()
        self._last_log = self._lost_at
        log.warn("cluster: {url}: connection lost; serving with the state this node has, "
                 "reconnecting", url=self.config.shown_url)
        try:
            self._down()
        except Exception:
            log.failure("cluster: going offline failed")
        self._retry = self.reactor.callLater(RETRY_FIRST, self._connect)


def probe(config, timeout: float = 2.0) -> str | None:
    """At start-up, before the reactor runs (so nothing waits on it): one connection to
    check the credentials and the database. A refused password or database is the
    start-up error returned (one line); an unreachable server is not an error (the node
    starts with its own state and keeps trying), and says so."""
    import socket

    def command(*args: str) -> bytes:
        out = b"*%d\r\n" % len(args)
        for a in args:
            b = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        return out

    def reply(f) -> bytes:
        line = f.readline()
        if not line:
            raise OSError("the server closed the connection")
        return line.rstrip(b"\r\n")

    import ssl
    url = config.shown_url
    try:
        with socket.create_connection((config.host, config.port), timeout) as raw:
            s = raw
            if config.tls:
                ctx = ssl.create_default_context(cafile=config.ca_file or None)
                if not config.verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                try:
                    s = ctx.wrap_socket(raw, server_hostname=config.host)
                except ssl.SSLCertVerificationError as e:
                    return f"cluster.redis: {url}: its TLS certificate is not trusted " \
                           f"({e.verify_message}; cluster.ca_file names the CAs to trust)"
                except ssl.SSLError as e:
                    return f"cluster.redis: {url}: TLS failed ({e.reason or e})"
            s.settimeout(timeout)
            f = s.makefile("rb")
            asks = []
            if config.password is not None:
                asks.append(("AUTH", ("AUTH", config.username, config.password)
                             if config.username else ("AUTH", config.password)))
            asks.append(("SELECT", ("SELECT", str(config.db))))
            asks.append(("PING", ("PING",)))
            for what, args in asks:
                s.sendall(command(*args))
                r = reply(f)
                if r.startswith(b"-"):
                    text = r[1:].decode("utf-8", "replace")
                    if what == "AUTH" or text.startswith(("NOAUTH", "WRONGPASS")):
                        return f"cluster.redis: {url}: authentication failed ({text})"
                    return f"cluster.redis: {url}: {what} refused ({text})"
    except OSError as e:
        log.warn("cluster: {url}: not reachable at start-up ({why}); starting with this "
                 "node's own state, connecting in the background", url=url,
                 why=e.strerror or e)
    return None

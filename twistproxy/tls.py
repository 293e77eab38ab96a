"""TLS on both sides: listener contexts chosen by SNI, and verified backend connections.

Owns turning [[listen]] tls/certificate entries into pyOpenSSL contexts (safe
defaults: TLS 1.2 or newer, forward-secret AEAD ciphers, no compression, no
renegotiation, ALPN http/1.1), checking certificates, keys and chains at start-up so a
problem is one line naming the key (not a traceback at the first handshake), and the
client side for https:// and wss:// backends: system CAs or `ca_file`, host names
checked with service_identity, SNI sent, `verify = false` only when spelled out.
"""

from __future__ import annotations

import fnmatch

from OpenSSL import SSL, crypto
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator,
                                         IOpenSSLServerConnectionCreator)
from twisted.logger import Logger
from zope.interface import implementer

from .config import CertConfig, ConfigError, TLSConfig, WorkerParams

log = Logger(namespace="twistproxy.tls")

# Mozilla's "intermediate" list for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
DEFAULT_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                   "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


def _read(path: str, where: str, config_path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{config_path}: {where}: {path!r} cannot be read: "
                          f"{e.strerror or e}") from None


def _certificates(pem: bytes, path: str, where: str, config_path: str) -> list:
    """Every certificate in a PEM file, in order."""
    out = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for part in pem.split(marker)[1:]:
        try:
            out.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + part))
        except crypto.Error as e:
            raise ConfigError(f"{config_path}: {where}: {path!r} holds a certificate that "
                              f"cannot be read ({_ssl_reason(e)})") from None
    if not out:
        raise ConfigError(f"{config_path}: {where}: {path!r} holds no PEM certificate")
    return out


def _ssl_reason(e: Exception) -> str:
    try:
        return ", ".join(str(x[2]) for x in e.args[0]) or str(e)
    except (IndexError, TypeError):
        return str(e) or e.__class__.__name__


def _context(cert: CertConfig, tls: TLSConfig, config_path: str) -> SSL.Context:
    chain = _certificates(_read(cert.cert, f"{cert.where}.cert", config_path), cert.cert,
                          f"{cert.where}.cert", config_path)
    leaf = chain[0]
    if leaf.has_expired():
        after = leaf.get_notAfter().decode("ascii")
        raise ConfigError(f"{config_path}: {cert.where}.cert: {cert.cert!r} expired "
                          f"({after[:4]}-{after[4:6]}-{after[6:8]})")
    extra = chain[1:]
    if cert.chain:
        extra += _certificates(_read(cert.chain, f"{cert.where}.chain", config_path),
                               cert.chain, f"{cert.where}.chain", config_path)
    key_pem = _read(cert.key, f"{cert.where}.key", config_path)
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        raise ConfigError(f"{config_path}: {cert.where}.key: {cert.key!r} is not a PEM "
                          f"private key without a passphrase ({_ssl_reason(e)})") from None
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_VERSIONS[tls.min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION |
                    SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
    try:
        ctx.set_cipher_list((tls.ciphers or DEFAULT_CIPHERS).encode("ascii"))
    except SSL.Error:
        raise ConfigError(f"{config_path}: {tls.certificates[0].where}.ciphers: "
                          f"{tls.ciphers!r} names no cipher OpenSSL knows") from None
    ctx.use_certificate(leaf)
    for c in extra:
        ctx.add_extra_chain_cert(c)
    try:
        ctx.use_privatekey(key)          # OpenSSL 3 already refuses a mismatch here
        ctx.check_privatekey()
    except SSL.Error:
        raise ConfigError(f"{config_path}: {cert.where}.key: {cert.key!r} does not match "
                          f"the certificate {cert.cert!r}") from None
    ctx.set_alpn_select_callback(_choose_http11)
    return ctx


def _choose_http11(conn, offered):
    if b"http/1.1" in offered:
        return b"http/1.1"
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """One listener's contexts: the first certificate unless SNI names another."""

    def __init__(self, tls: TLSConfig, config_path: str):
        contexts = [(c.server_names, _context(c, tls, config_path)) for c in tls.certificates]
        self.default = contexts[0][1]
        self.exact: dict[bytes, SSL.Context] = {}
        self.wildcards: list[tuple[str, SSL.Context]] = []
        for names, ctx in contexts[1:]:
            for name in names:
                if name.startswith("*."):
                    self.wildcards.append((name, ctx))
                else:
                    self.exact.setdefault(name.encode("idna"), ctx)
        self.default.set_tlsext_servername_callback(self._servername)

    def for_name(self, name: bytes | None) -> SSL.Context:
        if not name:
            return self.default
        name = name.lower().rstrip(b".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        text = name.decode("ascii", "replace")
        for pattern, ctx in self.wildcards:
            if fnmatch.fnmatchcase(text, pattern):
                return ctx
        return self.default

    def _servername(self, conn: SSL.Connection) -> None:
        ctx = self.for_name(conn.get_servername())
        if ctx is not self.default:
            conn.set_context(ctx)

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self.default, None)


def listener_factory(server_tls: ServerTLS, wrapped):
    """The TLS-terminating factory in front of an HTTP factory."""
    from twisted.protocols.tls import TLSMemoryBIOFactory
    factory = TLSMemoryBIOFactory(server_tls, False, wrapped)
    factory.noisy = False
    return factory


# -- backends ----------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """verify = false: TLS with SNI, but the certificate is not checked."""

    def __init__(self, hostname: str):
        self.hostname = hostname.encode("idna")
        self.ctx = SSL.Context(SSL.TLS_METHOD)
        self.ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        self.ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)

    def clientConnectionForTLS(self, protocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_tlsext_host_name(self.hostname)
        conn.set_app_data(protocol)
        return conn


def client_options_for(params: WorkerParams, config_path: str = "", where: str = ""):
    """A function of the host name to check (and send as SNI) giving the TLS options."""
    if not params.verify:
        return _Unverified
    trust = None
    if params.ca_file:
        kw = f"{where}.ca_file" if where else "ca_file"
        pem = _read(params.ca_file, kw, config_path)
        cas = _certificates(pem, params.ca_file, kw, config_path)
        trust = tssl.trustRootFromCertificates([tssl.Certificate(c) for c in cas])
    cache: dict[str, object] = {}

    def options(hostname: str):
        opts = cache.get(hostname)
        if opts is None:
            opts = cache[hostname] = tssl.optionsForClientTLS(hostname, trustRoot=trust)
        return opts

    return options


def check_ca_file(path: str, where: str, config_path: str) -> None:
    """A CA file that must hold certificates (ConfigError otherwise)."""
    _certificates(_read(path, where, config_path), path, where, config_path)


def redis_options(cluster):
    """[cluster]'s rediss:// client TLS options (the project's client TLS rules: the
    system's CAs or ca_file, host name checked, SNI; verify = false checks nothing)."""
    from .config import WorkerParams
    params = WorkerParams(verify=cluster.verify, ca_file=cluster.ca_file)
    return client_options_for(params, "", "cluster")(cluster.host)


def check_files(config) -> dict:
    """Every certificate, key, chain and CA file the configuration names, checked
    (ConfigError otherwise); returns the listeners' ServerTLS by listener key."""
    servers = {l.key: ServerTLS(l.tls, config.path) for l in config.listeners
               if l.tls is not None}
    admin = getattr(config, "admin", None)
    if admin is not None and admin.tls is not None:
        servers["admin"] = ServerTLS(admin.tls, config.path)     # the admin listener's
    params = [(r.worker, r.where) for v in config.vhosts for r in v.routes
              if r.url is not None]
    params += [(m.worker, f"balancer.{name}.member[{i}]")
               for name, b in config.balancers.items() for i, m in enumerate(b.members)]
    for p, where in params:
        if p.ca_file:
            client_options_for(p, config.path, where)
    return servers

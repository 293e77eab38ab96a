"""Who may use the forward proxy, and where to: client networks, target ports and host
patterns, and Basic proxy authentication against an htpasswd file.

Pure (no reactor): a vhost's forward-proxy settings in, a decision and its reason out.
htpasswd entries may be bcrypt (`$2y$...`, as `htpasswd -B` writes) or `{SHA}` (as
`htpasswd -s` writes); the file is read at start-up.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import ipaddress

from .config import ConfigError, VhostConfig


def load_htpasswd(path: str, where: str, config_path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"{config_path}: {where}: {path!r} cannot be read: "
                          f"{e.strerror or e}") from None
    users = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not (hashed.startswith(("$2y$", "$2b$", "$2a$", "{SHA}"))):
            raise ConfigError(f"{config_path}: {where}: {path!r} line {n} is not "
                              "'user:$2y$...' (bcrypt) or 'user:{SHA}...'")
        users[user] = hashed
    return users


def check_password(password: str, hashed: str) -> bool:
    """Whether `password` matches an htpasswd entry's hash (slow for bcrypt)."""
    if hashed.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        return hmac.compare_digest(digest, hashed[5:])
    import bcrypt
    try:
        return bcrypt.checkpw(password.encode(), hashed.replace("$2y$", "$2b$", 1).encode())
    except ValueError:
        return False


def in_networks(ip: str, networks) -> bool:
    """Whether a client address (IPv4-mapped IPv6 counts as IPv4) is in one of them."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def basic_credentials(value: bytes) -> tuple[str, str] | None:
    """(user, password) from a Basic (Proxy-)Authorization value, or None."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True) \
            .decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class BasicUsers:
    """htpasswd users, and the header values already checked (bcrypt is slow)."""

    def __init__(self, users: dict[str, str] | None):
        self.users = users
        self._ok_cache: dict[bytes, str] = {}     # header value -> user, once checked

    def known(self, value: bytes) -> str | None:
        """A header value already checked: its user (bcrypt is slow on purpose)."""
        return self._ok_cache.get(value)

    def verify(self, user: str, password: str) -> bool:
        """Slow for bcrypt entries: run it off the reactor thread."""
        hashed = self.users.get(user) if self.users else None
        return hashed is not None and check_password(password, hashed)

    def remember(self, value: bytes, user: str) -> None:
        if len(self._ok_cache) > 1024:
            self._ok_cache.clear()
        self._ok_cache[value] = user


class ForwardAccess(BasicUsers):
    def __init__(self, vhost: VhostConfig, where: str, config_path: str):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in vhost.proxy_allow]
        self.ports = vhost.allow_connect
        self.allow = vhost.connect_allow
        self.deny = vhost.connect_deny
        auth = dict(vhost.proxy_auth)
        self.realm = auth.get("realm", "twistproxy")
        super().__init__(load_htpasswd(auth["file"], f"{where}.proxy_auth.file",
                                       config_path) if auth else None)

    def client_allowed(self, ip: str) -> bool:
        return in_networks(ip, self.networks)

    def port_allowed(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports)

    def target_refused(self, host: str) -> str | None:
        """Why this target host may not be reached, or None."""
        host = host.lower().strip("[]")
        for pattern in self.deny:
            if fnmatch.fnmatchcase(host, pattern):
                return f"target {host} matches connect_deny {pattern!r}"
        if self.allow and not any(fnmatch.fnmatchcase(host, p) for p in self.allow):
            return f"target {host} matches no connect_allow pattern"
        return None

    def credentials(self, headers):
        """From Proxy-Authorization: (user, password, header value), or None."""
        for name, value in headers:
            if name.lower() != b"proxy-authorization":
                continue
            creds = basic_credentials(value)
            return (*creds, value) if creds else None
        return None

    def challenge(self) -> tuple[bytes, bytes]:
        return (b"Proxy-Authenticate",
                b'Basic realm="%s"' % self.realm.replace('"', "").encode("latin-1"))
